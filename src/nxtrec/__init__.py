"""nxtrec: open-vocabulary object recognition as next-token prediction."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so that `import nxtrec` (e.g. the ONNX path) does not import torch.
    if name == "Recognizer":
        from nxtrec.recognizer import Recognizer

        return Recognizer
    if name == "Label":
        from nxtrec.ranking import Label

        return Label
    raise AttributeError(name)
