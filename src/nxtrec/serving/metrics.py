"""Prometheus metrics in the text exposition format (version 0.0.4), written directly:
four metrics do not need a client library."""

from __future__ import annotations

import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.total += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        out.append(f'{name}_bucket{{le="+Inf"}} {self.total}')
        out.append(f"{name}_sum {_number(self.sum)}")
        out.append(f"{name}_count {self.total}")
        return out


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class Metrics:
    """Requests by path and status, request latency, batch sizes and the queue depth
    (read from `queue_depth()` at scrape time)."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0):
        self.queue_depth = queue_depth
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            key = (path, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if path.startswith("/v1/"):
                self.latency.observe(seconds)

    def observe_batch(self, size: int) -> None:
        with self._lock:
            self.batch_size.observe(size)

    def render(self) -> str:
        with self._lock:
            lines = [
                "# HELP nxtrec_requests_total HTTP requests by path and status code.",
                "# TYPE nxtrec_requests_total counter",
            ]
            for (path, status), n in sorted(self.requests.items()):
                lines.append(f'nxtrec_requests_total{{path="{_label(path)}",code="{status}"}} {n}')
            lines += [
                "# HELP nxtrec_request_seconds Latency of /v1/ requests, from arrival to response.",
                "# TYPE nxtrec_request_seconds histogram",
                *self.latency.lines("nxtrec_request_seconds"),
                "# HELP nxtrec_batch_size Images per model call.",
                "# TYPE nxtrec_batch_size histogram",
                *self.batch_size.lines("nxtrec_batch_size"),
            ]
        lines += [
            "# HELP nxtrec_queue_depth Images waiting for the inference worker.",
            "# TYPE nxtrec_queue_depth gauge",
            f"nxtrec_queue_depth {self.queue_depth()}",
        ]
        return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
