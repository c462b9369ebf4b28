"""Fast CPU inference for a loaded model (`Recognizer.from_pretrained(..., device="cpu")`).

Each fast kernel is used only where a probe shows that it exists on this CPU; elsewhere the
plain PyTorch path runs (`cpu_kernels` says which, `nxtrec info` prints it):

- float32 / bfloat16: every `nn.Linear` runs on oneDNN (`torch.ops.mkldnn._linear_pointwise`).
  PyTorch's x86 wheels send float32 Linear layers to MKL, whose kernels for a few rows (a
  decoding step computes one row per branch) read the weights at a fraction of the memory
  bandwidth oneDNN reaches; the numbers differ from MKL's only in the last bits (float32 sums
  in another order). oneDNN has no bfloat16 inner product on CPUs without AVX-512 (or with
  `ONEDNN_MAX_CPU_ISA=AVX2`): there bfloat16 stays on PyTorch's own kernels, correct but
  slower than float32, and loading says so in one line.
- int8: dynamic quantisation of every `nn.Linear` of the encoder and the decoder (weights int8
  per output channel, activations quantised per call), the same scheme as the int8 ONNX
  export (`nxtrec.onnx.quantize`). The encoder's fused q/k/v projection (a parameter, not a
  Linear) stays float32.

The weights stay the model's own tensors (no copy) in float32 / bfloat16; int8 replaces the
float32 weights of the Linear layers by their int8 copies.

The process's allocator is tuned too (`keep_freed_memory`): glibc returns large freed blocks
to the kernel at once, so every batch's activations would arrive in fresh pages, each one a
page fault (benchmarks: docs/speed.md).
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from nxtrec.inference.isa import cpu_info
from nxtrec.model.network import NxtpModel
from nxtrec.model.quantized import quantize_int8

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


@cache
def onednn_linear_works(dtype: torch.dtype) -> bool:
    """oneDNN creates its inner-product primitive for `dtype` on this CPU and computes what
    `F.linear` does: probed once per dtype on a tiny input, never assumed from the CPU's name."""
    if not onednn_available():
        return False
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((3, 32), (16, 32), (16,)))
    try:
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    except RuntimeError:  # "could not create a primitive descriptor ..."
        return False
    return torch.allclose(got.float(), F.linear(x, w, b).float(), rtol=1e-2, atol=1e-2)


def cpu_kernels() -> dict[str, str]:
    """The kernel each `--dtype` uses for its Linear layers on this CPU."""
    bf16 = "oneDNN" if onednn_linear_works(torch.bfloat16) else "PyTorch"
    bf16 += f" ({cpu_info().bf16_missing()}: slower than float32)" if not cpu_info().native_bf16 else ""
    return {
        "float32": "oneDNN" if onednn_linear_works(torch.float32) else "PyTorch (MKL/OpenBLAS)",
        "bfloat16": bf16,
        "float16": "PyTorch",
        "int8": f"dynamic int8 ({torch.backends.quantized.engine})",
    }


def fastest_dtype() -> str:
    """The dtype to recommend on this CPU: bfloat16 where it has native instructions and
    oneDNN kernels, else float32 (int8 is faster still on large models, but changes labels)."""
    return "bfloat16" if cpu_info().native_bf16 and onednn_linear_works(torch.bfloat16) else "float32"


_noted: set[str] = set()


def note_slow_dtype(dtype: str) -> None:
    """One line on stderr, once per process, when `dtype` has no fast kernels on this CPU."""
    if dtype != "bfloat16" or dtype in _noted or fastest_dtype() == "bfloat16":
        return
    _noted.add(dtype)
    print(f"nxtrec: note: no fast bfloat16 kernels on this CPU ({cpu_info().bf16_missing()}): bfloat16 runs, but "
          f"slower than float32; the fastest dtype here is {fastest_dtype()} (`nxtrec info` tells more)", file=sys.stderr)


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


def optimize_for_cpu(model: NxtpModel, dtype: str = "float32") -> NxtpModel:
    """Prepare a model loaded in float32 (for "int8") or in `dtype` for CPU inference, in
    place; other dtypes are left as they are. Only for inference: these layers have no
    autograd, so training uses a model that did not go through here."""
    model.eval()
    keep_freed_memory()
    if dtype == "int8" or model.config.quantization is not None:  # a saved int8 model is int8 whatever is asked
        return quantize_int8(model)
    note_slow_dtype(dtype)
    if dtype in ONEDNN_DTYPES and onednn_linear_works(getattr(torch, dtype)):
        _replace_linears(model, OneDnnLinear)
    return model
