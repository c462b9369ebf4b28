"""`nxtrec tag --format xmp`: an XMP sidecar beside each tagged image (photo.jpg.xmp, or
photo.xmp with `--xmp-name stem`), merged with the sidecar already there (nxtrec.data.xmp).
The image files themselves are never written.

The sidecars of a part are written before the part file is committed: the part files stay
the record of what is done, so a run killed between the two writes the sidecars of that
part again, and the merge replaces nxtrec's keywords instead of adding them twice. Each
sidecar is written atomically (temporary file, fsync, rename)."""

from __future__ import annotations

import contextlib
import os
import re
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from nxtrec.data.xmp import SidecarError, SidecarTags, merged_sidecar, sidecar_path
from nxtrec.errors import NxtrecError
from nxtrec.tagging.inputs import InputItem
from nxtrec.tagging.output import write_atomic
from nxtrec.tagging.pipeline import TagResult

# write_atomic's temporary file of a sidecar: `.NAME.xmp.PID.tmp`
SIDECAR_TMP_RE = re.compile(r"^\..+\.xmp\.(\d+)\.tmp$")


def check_sidecar_inputs(items: list[InputItem], naming: str) -> None:
    """Sidecars need image files, and one sidecar per image: refuse shard samples, and two
    images that `--xmp-name stem` would give one sidecar (photo.jpg and photo.png)."""
    owner: dict[str, str] = {}
    for item in items:
        if not isinstance(item.source, str):
            raise NxtrecError(f"--format xmp writes a sidecar beside each image file, and {item.id!r} is a sample "
                              "of a shard; use --format parquet (or jsonl, csv) for shards")  # fmt: skip
        path = os.path.realpath(sidecar_path(item.source, naming))
        first = owner.setdefault(path, os.path.realpath(item.source))
        if first != os.path.realpath(item.source):
            raise NxtrecError(f"--xmp-name {naming}: {first} and {item.source} would share the sidecar {path}; "
                              "use --xmp-name image (photo.jpg.xmp)")  # fmt: skip


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class SidecarWriter:
    """Writes each result's sidecar in a background thread while the model runs (the
    merge is Python, the model mostly not); `finished` waits for a part's sidecars."""

    naming: str
    parent: str
    model: str
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    cleaned: set[Path] = field(default_factory=set)
    pending: deque = field(default_factory=deque)  # one future per result passed on, in order

    def started(self, results: Iterable[TagResult], items: list[InputItem]) -> Iterator[TagResult]:
        """`results`, passed on as they come, each tagged one's sidecar submitted."""
        sources = {item.id: item.source for item in items}
        executor = ThreadPoolExecutor(1, thread_name_prefix="nxtrec-xmp")
        try:
            for result in results:
                if result.error is None:
                    self.pending.append(executor.submit(self._write, result, sources[result.id]))
                else:
                    self.pending.append(Future())
                    self.pending[-1].set_result(result)
                yield result
        finally:
            executor.shutdown(wait=False)  # what was submitted still runs

    def finished(self, part: list[TagResult]) -> list[TagResult]:
        """The part's results once their sidecars are written; an image whose sidecar could
        not be read as XMP or written becomes a failed result (in errors.jsonl)."""
        return [self.pending.popleft().result() for _ in part]

    def _write(self, result: TagResult, image: str) -> TagResult:
        path = sidecar_path(image, self.naming)
        self._remove_stale_temporaries(path.parent)
        try:
            old = path.read_bytes() if path.exists() else None
            tags = SidecarTags(result.to_record()["labels"], self.model, self.date, self.parent)
            write_atomic(path, merged_sidecar(old, tags, str(path)))
        except SidecarError as e:
            return TagResult(result.id, None, error=str(e))
        except OSError as e:
            reason = (e.strerror or str(e)).lower()
            return TagResult(result.id, None, error=f"{path}: cannot write the sidecar ({reason})")
        return result

    def _remove_stale_temporaries(self, folder: Path) -> None:
        """Once per folder: the temporary sidecars of a killed run (its process is gone)."""
        if folder in self.cleaned:
            return
        self.cleaned.add(folder)
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if (m := SIDECAR_TMP_RE.match(entry.name)) and not _alive(int(m.group(1))):
                    Path(entry.path).unlink(missing_ok=True)
