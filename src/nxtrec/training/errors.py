"""Errors of a training run (bad configs raise `TrainConfigError` from config.py)."""

from nxtrec.errors import NxtrecError


class TrainError(NxtrecError):
    pass


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite; the update was not applied."""
