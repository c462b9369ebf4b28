"""Processes and devices: torchrun's environment, NCCL/gloo, collectives that are no-ops in
a single process, FSDP2."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from nxtrec.model.network import NxtpModel
from nxtrec.training.errors import TrainError


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def setup_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one plain process when
    it is absent. NCCL on GPUs, gloo on CPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise TrainError("run.device = 'cuda' but no CUDA device is visible")
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    info = DistInfo(rank, world, local, dev)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
        info.initialised_here = True
    if dist.is_initialized():
        info.rank, info.world = dist.get_rank(), dist.get_world_size()
    return info


def all_reduce(t: torch.Tensor, info: DistInfo, op=None) -> torch.Tensor:
    if info.enabled and info.world > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled and info.world > 1:
        dist.barrier()


def apply_fsdp(model: NxtpModel, step_module: nn.Module, info: DistInfo):
    from torch.distributed.fsdp import fully_shard

    # Decoder blocks also return their keys/values (views); training never modifies them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    for block in model.vision_encoder.transformer.resblocks:
        fully_shard(block)
    for layer in model.language_decoder.layers:
        fully_shard(layer)
    fully_shard(step_module)
    return step_module


def gather_objects(obj, info: DistInfo) -> list:
    if info.enabled and info.world > 1:
        out = [None] * info.world
        dist.all_gather_object(out, obj)
        return out
    return [obj]
