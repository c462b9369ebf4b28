"""The files of a model directory and the checks of the tensors read from them, shared by the
float (model/directory.py) and the int8 (model/quantized.py) formats."""

from __future__ import annotations

import torch

from nxtrec.errors import NxtrecError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.model"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(NxtrecError):
    pass


def check_state_dict(expected: dict, got: dict, source: str, allow_missing=()) -> None:
    """Every expected tensor present with the expected shape, nothing unexpected; the error
    names the key and both shapes."""
    for key, ref in expected.items():
        if key not in got:
            if not any(key.startswith(p) for p in allow_missing):
                raise CheckpointError(f"{source}: missing tensor {key!r} (expected shape {tuple(ref.shape)})")
        elif tuple(got[key].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor {key!r} has shape {tuple(got[key].shape)}, the model expects {tuple(ref.shape)}"
            )
    extra = sorted(set(got) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
