"""nxtrec: open-vocabulary object recognition as next-token prediction."""

import os

__version__ = "0.1.0"

# PyTorch's OpenMP threads otherwise spin while they wait for work. On a CPU shared with
# other processes the spinning threads take the time slices the working ones need (figures:
# docs/speed.md). Takes effect when nxtrec is imported before torch; an OMP_WAIT_POLICY set
# by the user wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# name -> module; imported on first use, so that `import nxtrec` (e.g. the ONNX path) does
# not import torch.
_PUBLIC = {
    "Recognizer": "nxtrec.inference.recognizer",
    "Label": "nxtrec.inference.ranking",
    "ModelConfig": "nxtrec.model.config",
    "load_model_dir": "nxtrec.model.directory",
    "save_model_dir": "nxtrec.model.directory",
    "OnnxRecognizer": "nxtrec.onnx.recognizer",
    "DecodeOptions": "nxtrec.inference.engine",
    "load_engine": "nxtrec.engines",
    "tag_images": "nxtrec.tagging.pipeline",
}


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(name)
