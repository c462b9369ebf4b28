"""Batches of decoded images, prepared in worker processes while the model runs.

A plan is a list of index ranges (one batch each) into the input list. `BatchDecoder[b]`
decodes batch b; the PyTorch path runs it in a torch DataLoader (tensors travel through
shared memory), the ONNX path in a multiprocessing pool (no torch import). Both keep only a
few batches in flight, so memory does not grow with the number of images."""

from __future__ import annotations

import math
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nxtrec.tagging.decode import Decoded, Preprocess, decode
from nxtrec.tagging.inputs import InputItem


@dataclass
class Batch:
    items: list[Decoded]  # every input of the batch in order
    pixels: Any | None  # the decoded images stacked [n, 3, S, S]; None when all failed


class BatchDecoder:
    """Map-style dataset of whole batches (a DataLoader accepts any `__getitem__`/`__len__`)."""

    def __init__(self, items: Sequence[InputItem], plan: Sequence[range], prep: Preprocess, as_tensor: bool):
        self.items, self.plan, self.prep, self.as_tensor = items, plan, prep, as_tensor

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> Batch:
        pixels, array = self._empty_batch(len(self.plan[b]))
        decoded, good = [], 0
        for i in self.plan[b]:
            decoded.append(decode(i, self.items[i].id, self.items[i].source, self.prep, out=array[good]))
            good += decoded[-1].error is None
        return Batch(decoded, pixels[:good] if good else None)

    def _empty_batch(self, n: int):
        """The batch and a numpy view of it: images are preprocessed straight into it. A torch
        batch is allocated in shared memory, so that handing it to the model process copies
        nothing."""
        shape = (n, 3, self.prep.size, self.prep.size)
        if not self.as_tensor:
            array = np.empty(shape, dtype=np.float32)
            return array, array
        import torch
        from torch.utils.data import get_worker_info

        if get_worker_info() is None:
            tensor = torch.empty(shape, dtype=torch.float32)
        else:  # in a loader worker: shared memory, as torch's own default_collate allocates it
            empty = torch.empty(0, dtype=torch.float32)
            tensor = empty.new(empty._typed_storage()._new_shared(math.prod(shape))).view(shape)
        return tensor, tensor.numpy()


def _whole_batch(batch):
    return batch


def _lower_priority(_worker_id: int = 0) -> None:
    """Decoding yields the cores to the model's threads, which stall whenever one of them is
    descheduled: at SCHED_IDLE a worker runs only on a core that has nothing else to do
    (measured ~8% more images/s than at nice 10 on 2 cores); when the model waits for a
    batch, the workers get the cores anyway."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux
        os.nice(10)


def torch_batches(decoder: BatchDecoder, workers: int) -> Iterator[Batch]:
    from torch.utils.data import DataLoader

    loader = DataLoader(
        decoder, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_whole_batch,
        prefetch_factor=2 if workers else None, worker_init_fn=_lower_priority,
    )  # fmt: skip
    yield from loader


_POOL_DECODER: BatchDecoder | None = None


def _init_pool_worker(decoder: BatchDecoder) -> None:
    global _POOL_DECODER
    _lower_priority()
    _POOL_DECODER = decoder


def _decode_in_pool(b: int) -> Batch:
    return _POOL_DECODER[b]


def pool_batches(decoder: BatchDecoder, workers: int) -> Iterator[Batch]:
    """In order, with at most 2 batches per worker in flight (Pool.imap would queue them all)."""
    if workers == 0:
        yield from (decoder[b] for b in range(len(decoder)))
        return
    with multiprocessing.Pool(workers, initializer=_init_pool_worker, initargs=(decoder,)) as pool:
        pending: deque = deque()
        for b in range(len(decoder)):
            pending.append(pool.apply_async(_decode_in_pool, (b,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
