"""nxtrec: open-vocabulary object recognition as next-token prediction."""

__version__ = "0.1.0"
