"""Fast CPU inference for a loaded model (`Recognizer.from_pretrained(..., device="cpu")`).

- float32 / bfloat16: every `nn.Linear` runs on oneDNN (`torch.ops.mkldnn._linear_pointwise`).
  PyTorch's x86 wheels send float32 Linear layers to MKL, whose kernels for a few rows (a
  decoding step computes one row per branch) read the weights at a fraction of the memory
  bandwidth oneDNN reaches on AMD EPYC; the numbers differ from MKL's only in the last bits
  (float32 sums in another order).
- int8: dynamic quantisation of every `nn.Linear` of the encoder and the decoder (weights int8
  per output channel, activations quantised per call; fbgemm/oneDNN VNNI kernels), the same
  scheme as the int8 ONNX export (`nxtrec.onnx.quantize`). The encoder's fused q/k/v
  projection (a parameter, not a Linear) stays float32.

The weights stay the model's own tensors (no copy) in float32 / bfloat16; int8 replaces the
float32 weights of the Linear layers by their int8 copies.

The process's allocator is tuned too (`keep_freed_memory`): glibc returns large freed blocks
to the kernel at once, so every batch's activations arrived in fresh pages, each one a page
fault (batch 64 of the demo model: ~800 faults per image, 13-16% of the CPU time in the
kernel).
"""

from __future__ import annotations

import ctypes
import os
import warnings

import torch
from torch import nn

from nxtrec.model.network import NxtpModel

# float16 Linear layers are left to PyTorch (no fast float16 kernels on most CPUs).
ONEDNN_DTYPES = ("float32", "bfloat16")


# glibc's mallopt parameters, and the environment variables that set them at start-up.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
KEEP_FREED_BYTES = 256 << 20


def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks up to 256 MB instead of unmapping them (blocks up to 256 MB
    come from the heap, and up to 256 MB of free heap is kept). Left alone when the allocator
    is not glibc's or any of its variables is set (the user's choice wins). True if applied."""
    if any(name in os.environ for name in MALLOC_ENV):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(mallopt(param, KEEP_FREED_BYTES) == 1 for param in (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD))


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class OneDnnLinear(nn.Module):
    """An inference-only `nn.Linear` (same parameter names) computed by oneDNN."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def _replace_linears(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, make(child))
        else:
            _replace_linears(child, make)


def quantize_int8(model: NxtpModel) -> NxtpModel:
    """Dynamic int8 quantisation of the Linear layers, in place."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        # torch.ao.quantization is marked deprecated in favour of torchao, whose CPU int8
        # path needs torch.compile; the eager fbgemm kernels used here are still shipped.
        warnings.simplefilter("ignore")
        quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    return model


def optimize_for_cpu(model: NxtpModel, dtype: str = "float32") -> NxtpModel:
    """Prepare a model loaded in float32 (for "int8") or in `dtype` for CPU inference, in
    place; other dtypes are left as they are. Only for inference: these layers have no
    autograd, so training uses a model that did not go through here."""
    model.eval()
    keep_freed_memory()
    if dtype == "int8":
        return quantize_int8(model)
    if dtype in ONEDNN_DTYPES and onednn_available():
        _replace_linears(model, OneDnnLinear)
    return model
