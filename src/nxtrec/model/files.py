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


FINITE_CHUNK = 1 << 22  # elements checked at once: a bounded temporary, whatever the tensor's size


def check_weights(tensors, source: str) -> str:
    """Every tensor a float type and finite (no NaN, no infinity); the error names the key.
    `tensors`: a dict, or an iterable of (key, tensor) read one at a time (a memory-mapped
    file). Each tensor is reduced in chunks to its largest magnitude (NaN and inf propagate),
    about 10 ms for the bundled 20 MB model. Returns the dtypes found, e.g. "float32"."""
    dtypes = set()
    for key, t in tensors.items() if isinstance(tensors, dict) else tensors:
        if not t.is_floating_point():
            raise CheckpointError(f"{source}: tensor {key!r} has dtype {str(t.dtype).replace('torch.', '')}; model "
                                  "weights are float32, float16 or bfloat16 (a damaged or foreign file?)")
        dtypes.add(str(t.dtype).replace("torch.", ""))
        flat = t.detach().reshape(-1)
        for chunk in flat.split(FINITE_CHUNK):
            if chunk.numel() and not bool(torch.isfinite(chunk.abs().amax())):
                nan, inf = int(torch.isnan(flat).sum()), int(torch.isinf(flat).sum())
                raise CheckpointError(f"{source}: tensor {key!r} holds {nan} NaN and {inf} infinite values of "
                                      f"{flat.numel()}; the weights are damaged (re-download, re-convert or "
                                      "re-export the model)")
    return ", ".join(sorted(dtypes))
