"""What each `nxtrec tag --format` writes. Every format keeps numbered part files in --out
as the resumable record of the run; xmp and hf keep JSONL parts there and write, besides,
a sidecar beside each image (before its part is committed: nxtrec.tagging.sidecars) or the
imagefolder's metadata.jsonl (at the end of each run: nxtrec.tagging.imagefolder)."""

from __future__ import annotations

from pathlib import Path

from nxtrec.data.xmp import SIDECAR_NAMES
from nxtrec.errors import NxtrecError
from nxtrec.extras import require
from nxtrec.tagging.imagefolder import check_metadata_target, write_metadata
from nxtrec.tagging.inputs import InputItem
from nxtrec.tagging.output import read_records
from nxtrec.tagging.sidecars import SidecarWriter, check_sidecar_inputs

# --format -> the format of its part files
PART_FORMATS = {"jsonl": "jsonl", "csv": "csv", "parquet": "parquet", "xmp": "jsonl", "hf": "jsonl"}


def part_format(fmt: str) -> str:
    return PART_FORMATS.get(fmt, fmt)  # an unknown one is refused by TagOutput


def check_format(fmt: str, items: list[InputItem], state: Path, xmp_name: str) -> None:
    """Before any work: the extra a format needs, and inputs it can write for."""
    if fmt == "parquet":
        require("pyarrow", command="tag")
    elif fmt == "xmp":
        if xmp_name not in SIDECAR_NAMES:
            raise NxtrecError(f"--xmp-name {xmp_name}: choose from {', '.join(SIDECAR_NAMES)}")
        check_sidecar_inputs(items, xmp_name)
    elif fmt == "hf":
        check_metadata_target(items, state)


def part_writer(fmt: str, model: str, xmp_name: str, xmp_parent: str) -> SidecarWriter | None:
    """What writes the outputs of a part's images before the part is committed (xmp:
    sidecars, see SidecarWriter.started and .finished)."""
    return SidecarWriter(xmp_name, xmp_parent, model) if fmt == "xmp" else None


def finish_format(fmt: str, folder: Path, state: Path, items: list[InputItem]) -> None:
    """Rank 0, after the manifest: hf writes metadata.jsonl from the current records."""
    if fmt == "hf":
        write_metadata(read_records(folder), items, state)
