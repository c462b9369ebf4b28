"""FSDP2 (`fully_shard`) for training: each encoder and decoder block its own unit, the rest
(embeddings, norms, output) in the root unit around the training step."""

from __future__ import annotations

import warnings

import torch.nn as nn

from nxtrec.model.network import NxtpModel


def apply_fsdp(model: NxtpModel, step_module: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    # Decoder blocks also return their keys/values (views); training never modifies them.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

    for block in model.vision_encoder.transformer.resblocks:
        fully_shard(block)
    for layer in model.language_decoder.layers:
        fully_shard(layer)
    fully_shard(step_module)
    return step_module
