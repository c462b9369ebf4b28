"""The names of an ONNX export, defined once (torch-free: the runtime and the exporter both
read them): its files, the manifest's format, the released layout's files, and the names of
the decoder graphs' key/value inputs."""

from __future__ import annotations

import re

MANIFEST = "nxtrec-onnx.json"
FORMAT = "nxtrec-onnx"
FORMAT_VERSION = 1
FILES = {
    "encoder": "encoder.onnx",
    "embeddings": "embeddings.npy",
    "prefill": "decoder_prefill.onnx",
    "step": "decoder_step.onnx",
    "tokenizer": "tokenizer.model",
}
ENCODER_DATA = "encoder.onnx.data"
DECODER_DATA = "decoder.data"
# The reference project's released files; its tokenizer.model (LLaMA-2's) goes beside them.
RELEASED_FILES = ("encoder.onnx", "Wte.npz", "decoder_p1.onnx", "decoder_p2.onnx", "decoder_p3.onnx")
RELEASED_DECODER = re.compile(r"decoder_p(\d+)\.onnx$")


def kv_names(prefix: str, n_layers: int) -> list[str]:
    """Inputs/outputs of the step graph, per layer: `prefix_key_0, prefix_value_0, ...`."""
    return [f"{prefix}_{kind}_{i}" for i in range(n_layers) for kind in ("key", "value")]


def detect_layout(path) -> str:
    """'nxtrec' (`nxtrec export-onnx`) or 'released' (the reference's files); an error says
    what is missing."""
    from pathlib import Path

    from nxtrec.onnx.sessions import OnnxRuntimeError

    path = Path(path)
    if not path.is_dir():
        raise OnnxRuntimeError(f"{path}: ONNX directory not found")
    if (path / MANIFEST).is_file():
        return "nxtrec"
    if (path / "decoder_p1.onnx").is_file() or (path / "Wte.npz").is_file():
        return "released"
    raise OnnxRuntimeError(
        f"{path}: not an ONNX model directory (expected {MANIFEST} from `nxtrec export-onnx`, or the released "
        "files encoder.onnx, Wte.npz, decoder_p1.onnx ... with tokenizer.model)"
    )
