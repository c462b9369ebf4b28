"""nxtrec: open-vocabulary object recognition as next-token prediction."""

__version__ = "0.1.0"

# name -> module; imported on first use, so that `import nxtrec` (e.g. the ONNX path) does
# not import torch.
_PUBLIC = {
    "Recognizer": "nxtrec.inference.recognizer",
    "Label": "nxtrec.inference.ranking",
    "ModelConfig": "nxtrec.model.config",
    "load_model_dir": "nxtrec.model.directory",
    "save_model_dir": "nxtrec.model.directory",
    "OnnxRecognizer": "nxtrec.onnx.runtime",
}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(name)
