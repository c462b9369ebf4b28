"""Batches of decoded images, prepared in worker processes while the model runs.

A plan is a list of index ranges (one batch each) into the input list. Workers decode each
batch straight into a slot of a ring of batch buffers: one shared memory mapping, made
before the workers start and kept by all of them, so handing a batch to the model copies
nothing and maps nothing (a fresh shared-memory batch per hand-over would have its pages
created, faulted in and freed every time; docs/tag.md has the figures). At most two batches
per worker are in flight, so memory
does not grow with the number of images. Torch-free: both engines take the slot's numpy array."""

from __future__ import annotations

import math
import mmap
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from nxtrec.errors import NxtrecError
from nxtrec.inference.engine import Preprocessing
from nxtrec.tagging.decode import Decoded, decode
from nxtrec.tagging.inputs import InputItem

BATCHES_PER_WORKER = 2  # in flight while the model runs on the current batch


@dataclass
class DecodedBatch:
    items: list[Decoded]  # every input of the batch in order
    # The decoded images [n, 3, S, S] float32; None when all
    # failed. They live in the ring: valid until the next batch is asked for.
    pixels: np.ndarray | None


class BatchDecoder:
    """Decodes batch b of the plan into a given buffer."""

    def __init__(self, items: Sequence[InputItem], plan: Sequence[range], prep: Preprocessing):
        self.items, self.plan, self.prep = items, plan, prep

    def __len__(self) -> int:
        return len(self.plan)

    def decode_into(self, b: int, out: np.ndarray) -> tuple[list[Decoded], int]:
        """The batch's inputs in order, and how many were decoded: those are out[:good]."""
        decoded, good = [], 0
        for i in self.plan[b]:
            decoded.append(decode(i, self.items[i].id, self.items[i].source, self.prep, out=out[good]))
            good += decoded[-1].error is None
        return decoded, good


class _Ring:
    """`slots` batch buffers in one anonymous shared mapping, which forked workers inherit."""

    def __init__(self, slots: int, batch_size: int, size: int):
        shape = (slots, batch_size, 3, size, size)
        self.array = np.frombuffer(mmap.mmap(-1, 4 * math.prod(shape)), dtype=np.float32).reshape(shape)


_WORKER: tuple[BatchDecoder, _Ring] | None = None


def _init_worker(decoder: BatchDecoder, ring: _Ring, parent: int) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the main process to handle
    # Workers keep the normal priority: at a lower one (SCHED_IDLE, a high nice value) any
    # other busy process on the machine starves them and the model waits for every batch.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    _WORKER = (decoder, ring)


def _exit_with_parent(parent: int) -> None:
    """An idle worker waits for work that only the main process sends: when that process is
    killed (kill -9), end instead of waiting forever, as torch's DataLoader workers do."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _decode_in_worker(b: int, slot: int) -> tuple[list[Decoded], int]:
    decoder, ring = _WORKER
    return decoder.decode_into(b, ring.array[slot])


def prefetched_batches(decoder: BatchDecoder, workers: int) -> Iterator[DecodedBatch]:
    """The batches of the plan in order, decoded by `workers` processes (0: here, on demand)."""
    if not len(decoder):
        return
    if "fork" not in multiprocessing.get_all_start_methods():  # Windows: decode here instead
        workers = 0
    ahead = BATCHES_PER_WORKER * workers
    # the batch being used, plus those in flight; slot b % slots is free again once the
    # batch that used it before has been handed out and the next one asked for
    ring = _Ring(ahead + 1, max(map(len, decoder.plan)), decoder.prep.size)

    def batch(slot: int, decoded: list[Decoded], good: int) -> DecodedBatch:
        return DecodedBatch(decoded, ring.array[slot, :good] if good else None)

    if workers == 0:
        for b in range(len(decoder)):
            yield batch(0, *decoder.decode_into(b, ring.array[0]))
        return
    context = multiprocessing.get_context("fork")  # the workers inherit the ring's mapping
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                               initargs=(decoder, ring, os.getpid()))
    try:
        pending: deque = deque()
        for b in range(len(decoder)):
            slot = b % len(ring.array)
            pending.append((slot, _submit(pool, b, slot)))
            if len(pending) > ahead:
                yield batch(*_decoded(*pending.popleft()))
        while pending:
            yield batch(*_decoded(*pending.popleft()))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


WORKER_DIED = ("an image decoding worker process ended unexpectedly (killed, or out of memory?); "
               "the parts written so far are kept: run the command again to resume")


def _submit(pool: ProcessPoolExecutor, b: int, slot: int):
    try:  # a worker that died while the batches before were decoded breaks the pool here
        return pool.submit(_decode_in_worker, b, slot)
    except BrokenProcessPool:
        raise NxtrecError(WORKER_DIED) from None


def _decoded(slot: int, future) -> tuple[int, list[Decoded], int]:
    try:
        return slot, *future.result()
    except BrokenProcessPool:
        raise NxtrecError(WORKER_DIED) from None

