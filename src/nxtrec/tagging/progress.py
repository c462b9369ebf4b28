"""Progress of a tagging job: a tqdm bar on a terminal, plain lines every few seconds
otherwise (a log file), and the one-line summary."""

from __future__ import annotations

import sys
import time


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, total: int, initial: int, enabled: bool = True, log_every: float = 30.0, stream=None,
                 desc: str = "tag"):
        self.stream = stream or sys.stderr
        self.desc = desc
        self.total, self.done, self.failed = total, initial, 0
        self.start = self.last_log = time.monotonic()
        self.new = 0  # images done by this run
        self.log_every = log_every
        self.enabled = enabled
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="img", desc=desc, dynamic_ncols=True, file=self.stream)

    def update(self, images: int, failed: int) -> None:
        self.done += images
        self.new += images
        self.failed += failed
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(images)
            if failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
        elif time.monotonic() - self.last_log >= self.log_every:
            self.last_log = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def rate(self) -> float:
        return self.new / max(time.monotonic() - self.start, 1e-9)

    def line(self) -> str:
        rate = self.rate()
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        return (f"{self.desc}: {self.done}/{self.total} images, {rate:.1f} images/s, "
                f"ETA {_duration(eta)}, {self.failed} failed")  # fmt: skip

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
