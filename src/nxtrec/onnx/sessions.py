"""ONNX Runtime sessions on the CPU, and the numpy arithmetic the decoding loops share
(torch-free)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nxtrec.errors import NxtrecError

ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}
NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class OnnxRuntimeError(NxtrecError):
    pass


def make_session(path: str | Path, threads: int | None = None, disable_prepacking: bool = False, arena: bool = True):
    """A CPU session. `arena=False` returns activation memory to the system after each run
    (for graphs whose activation sizes keep growing, like the released no-cache decoder)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OnnxRuntimeError(f"{path}: file not found")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not arena:
        opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
    if disable_prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxRuntimeError(f"{path}: cannot load ONNX model ({msg})") from None


def input_dtype(session, index: int = 0):
    return ORT_TYPES.get(session.get_inputs()[index].type, np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis (what the PyTorch path computes)."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def topk(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k values and indices of each row, highest first."""
    if k > p.shape[-1]:
        raise OnnxRuntimeError(f"k={k} is larger than the vocabulary ({p.shape[-1]})")
    idx = np.argpartition(-p, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(p, idx, -1), axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, -1)
    return np.take_along_axis(p, idx, -1), idx


def inference_mask(seq_len: int, num_image_tokens: int, dtype=np.float32) -> np.ndarray:
    """Additive [S, S]: causal, plus full attention among the image tokens [0, P)."""
    i = np.arange(seq_len)
    allowed = (i[None, :] <= i[:, None]) | ((i[:, None] < num_image_tokens) & (i[None, :] < num_image_tokens))
    return np.where(allowed, 0.0, -np.inf).astype(dtype)
