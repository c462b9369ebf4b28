"""This process's place among torchrun's processes, and the few collectives nxtrec uses.

`RankInfo()` is one plain process (rank 0 of 1): its collectives return at once and importing
or using it never imports torch, so torch-free paths (ONNX) can take it as their default.
`setup_distributed` joins torchrun's processes (NCCL on GPUs, gloo on CPUs);
`current_ranks` reads the process group someone else set up (or torchrun's environment)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

REDUCE_OPS = ("sum", "min", "max")


@dataclass
class RankInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Any = "cpu"  # a torch.device once set up; a name here keeps the default torch-free
    initialised_here: bool = False  # setup_distributed created the process group: close() ends it

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        """"cpu", "cuda", ... of `device` (a torch.device or its name)."""
        return str(self.device).partition(":")[0]

    @property
    def enabled(self) -> bool:
        """A process group is initialised (torch.distributed can only have one once imported)."""
        dist = sys.modules.get("torch.distributed")
        return dist is not None and dist.is_available() and dist.is_initialized()

    def _collective(self) -> bool:
        return self.world > 1 and self.enabled

    def barrier(self) -> None:
        if self._collective():
            import torch.distributed as dist

            dist.barrier()

    def gather(self, obj, dst: int | None = None) -> list | None:
        """Every rank's `obj` in rank order ([obj] in one process). With `dst`, only that rank
        gets the list and the others None."""
        if not self._collective():
            return [obj]
        import torch.distributed as dist

        if dst is None:
            out = [None] * self.world
            dist.all_gather_object(out, obj)
            return out
        out = [None] * self.world if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def all_reduce(self, value, op: str = "sum"):
        """`value` reduced over the ranks: a tensor in place (and returned), or a number
        (returned as a float). `op`: sum, min or max."""
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {', '.join(REDUCE_OPS)}, not {op!r}")
        if not self._collective():
            return value
        import torch
        import torch.distributed as dist

        reduce_op = getattr(dist.ReduceOp, op.upper())
        if isinstance(value, torch.Tensor):
            dist.all_reduce(value, op=reduce_op)
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=reduce_op)
        return float(t.item())

    def close(self) -> None:
        """End the process group if `setup_distributed` created it; otherwise nothing."""
        if self.initialised_here and self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()
        self.initialised_here = False


def setup_distributed(device: str = "auto") -> RankInfo:
    """Join torchrun's processes (RANK, WORLD_SIZE, LOCAL_RANK); one plain process when its
    environment is absent. `device`: cpu, cuda or auto (cuda when visible). On CUDA each
    process takes its LOCAL_RANK's GPU and NCCL; on the CPU gloo."""
    import torch
    import torch.distributed as dist

    from nxtrec.errors import NxtrecError

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise NxtrecError("device 'cuda' was asked for but no CUDA device is visible")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    info = RankInfo(rank, world, local, dev)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        info.initialised_here = True
    if dist.is_initialized():
        info.rank, info.world = dist.get_rank(), dist.get_world_size()
    return info


def current_ranks() -> RankInfo:
    """This process's rank and world size without setting anything up: those of an initialised
    process group, else torchrun's environment (RANK, WORLD_SIZE), else rank 0 of 1. Its
    collectives work when a process group is initialised; `device` stays "cpu"."""
    info = RankInfo(local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if info.enabled:
        import torch.distributed as dist

        info.rank, info.world = dist.get_rank(), dist.get_world_size()
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        info.rank, info.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return info
