"""`load_engine`: the one factory of engines (`nxtrec.inference.engine.Engine`). It names both
engines, PyTorch and ONNX Runtime, so it sits above both packages; predict, tag and serve call
it, and eval is handed what it returns."""

from __future__ import annotations

from nxtrec.errors import NxtrecError
from nxtrec.inference.engine import Capabilities, Engine


def load_engine(model: str | None = None, onnx: str | None = None, device: str = "cpu", dtype: str = "float32",
                threads: int | None = None, calibration: str | None = None, adapter: str | None = None) -> Engine:
    """A model directory (None: the bundled default model) on PyTorch, or an exported ONNX
    directory on ONNX Runtime, which runs on the CPU in the export's own dtype. `threads`:
    the engine's CPU threads (default: its own choice). `calibration`: a calibration file
    (default: the model's own, when it has one; nxtrec.inference.calibration). `adapter`: a
    folder of `nxtrec teach` (PyTorch only; for ONNX, export the model of `nxtrec merge-adapter`)."""
    check_engine_choice(model, onnx, device, dtype)
    if onnx and adapter:
        raise NxtrecError("--adapter needs --model; for --onnx, run `nxtrec merge-adapter` and export the merged model")
    if onnx:
        from nxtrec.onnx.recognizer import OnnxRecognizer

        return OnnxRecognizer(onnx, threads=threads, calibration=calibration)
    from nxtrec.inference.recognizer import Recognizer

    if threads:
        import torch

        torch.set_num_threads(threads)
    return Recognizer.from_pretrained(model, device=device, dtype=dtype, calibration=calibration, adapter=adapter)


def check_engine_choice(model: str | None, onnx: str | None, device: str = "cpu", dtype: str = "float32") -> None:
    """The rules of `load_engine`'s arguments, for commands that check them before loading."""
    if model and onnx:
        raise NxtrecError("give either --model or --onnx, not both")
    if onnx and (device != "cpu" or dtype != "float32"):
        raise NxtrecError("--onnx runs on the CPU in the export's own dtype; drop --device and --dtype")


def capabilities_of(onnx: bool = False) -> Capabilities:
    """What the engine of `load_engine` can do, known before its weights load."""
    if onnx:
        from nxtrec.onnx.recognizer import OnnxRecognizer

        return OnnxRecognizer.capabilities
    from nxtrec.inference.recognizer import Recognizer

    return Recognizer.capabilities
