"""Dynamic batching: concurrent requests share one model call.

Every image of every request becomes one `Job` in a bounded FIFO queue. One inference
worker thread takes the oldest job, then keeps taking jobs until it holds `max_batch` images
or `max_wait` seconds have passed since it took the first, and runs them as one batch (one
model call per distinct options value, e.g. `top_k`: the number of one-shot branches is per
call). While a
batch runs, new requests queue up, so under load batches fill without waiting at all.

Admission is all-or-nothing per request: a request whose images do not all fit in the free
queue slots is refused (`QueueFull`, answered 503). A job cancelled before the worker takes
it (client gone, timeout) leaves the queue at once, freeing its slot.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class QueueFull(Exception):
    """The queue has no room for the request's images."""


@dataclass(eq=False)  # identity comparison: deque.remove must find this very job
class Job:
    pixels: np.ndarray  # [3, S, S] float32
    options: Hashable  # what the model call needs besides pixels; jobs are grouped by it
    future: Future = field(default_factory=Future)


class Batcher:
    """`predict(pixels [B, 3, S, S], options) -> one result per image` runs on one worker
    thread. `on_batch(size)` is called for every model call (metrics)."""

    def __init__(self, predict: Callable[[np.ndarray, Any], list], max_batch: int = 16,
                 max_wait: float = 0.010, queue_size: int = 256, on_batch: Callable[[int], None] | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait < 0:
            raise ValueError("max_batch and queue_size must be >= 1, max_wait >= 0")
        self.predict = predict
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.queue_size = queue_size
        self.on_batch = on_batch or (lambda size: None)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nxtrec-inference", daemon=True)

    # -- request side --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping

    @property
    def depth(self) -> int:
        """Images waiting for the worker (not counting the batch being computed)."""
        return len(self._queue)

    def submit(self, images: list[np.ndarray], options: Hashable) -> list[Job]:
        """Queue the images of one request; raises `QueueFull` when they do not all fit."""
        jobs = [Job(pixels, options) for pixels in images]
        with self._cond:
            if self._stopping or len(self._queue) + len(jobs) > self.queue_size:
                raise QueueFull
            self._queue.extend(jobs)
            self._cond.notify()
        return jobs

    def cancel(self, jobs: list[Job]) -> None:
        """Drop jobs nobody waits for any more; queued ones leave the queue now, a running one's
        result is discarded."""
        with self._cond:
            for job in jobs:
                if job.future.cancel():
                    try:
                        self._queue.remove(job)
                    except ValueError:
                        pass  # already taken by the worker (it skips cancelled jobs)

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued jobs, then end the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    # -- worker side ---------------------------------------------------------------------

    def _take_batch(self) -> list[Job]:
        """Block for the first job, then gather more until the batch is full or the wait is over."""
        batch: list[Job] = []
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return batch
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch:
                if self._queue:
                    job = self._queue.popleft()
                    if job.future.set_running_or_notify_cancel():
                        batch.append(job)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                with self._cond:
                    if self._stopping and not self._queue:
                        return
                continue
            groups: dict[Hashable, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.options, []).append(job)
            for options, jobs in groups.items():
                self._run_jobs(jobs, options)

    def _run_jobs(self, jobs: list[Job], options: Hashable) -> None:
        self.on_batch(len(jobs))
        try:
            results = self.predict(np.stack([job.pixels for job in jobs]), options)
        except Exception as e:  # noqa: BLE001  (a model failure answers these requests with 500; the worker lives on)
            for job in jobs:
                job.future.set_exception(e)
            return
        for job, labels in zip(jobs, results):
            job.future.set_result(labels)
