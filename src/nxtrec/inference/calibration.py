"""Calibrated confidence, applied (torch-free: the PyTorch and the ONNX Runtime engines both
use it). A calibration file (`nxtrec calibrate`, fitted by nxtrec.evaluation.calibration)
holds a monotone map from a label's `prob` to the chance that the label is right, and the
confidence thresholds of three profiles picked on its calibration set:

- precision: the lowest confidence at which the kept labels were right 9 times in 10;
- balanced: the confidence that gave the highest F1;
- recall: the highest confidence that still kept 9 in 10 of the right labels.

`prob` is left as the model gives it; `Label.confidence` is added beside it. A calibration
belongs to one model: its file records the model's digest (`model_digest`), and a file
fitted for another model is refused (docs/calibration.md).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nxtrec.digests import model_digest
from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import Label, rounded

CALIBRATION_FILE = "calibration.json"
FORMAT = "nxtrec-calibration"
FORMAT_VERSION = 1
METHODS = ("isotonic", "platt")
PROFILES = ("precision", "balanced", "recall")
LOGIT_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] before the logit of Platt scaling


class CalibrationError(NxtrecError):
    pass


def logit(probs) -> np.ndarray:
    p = np.clip(np.asarray(probs, dtype=np.float64), LOGIT_EPS, 1 - LOGIT_EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Calibration:
    """A calibration file as read. `params`: isotonic {"x": [...], "y": [...]}, the knots
    interpolated linearly (flat beyond the ends); platt {"a", "b"}: sigmoid(a logit(p) + b)."""

    method: str
    params: dict
    thresholds: dict  # profile -> the lowest confidence kept
    model_digest: str
    record: dict = field(default_factory=dict, compare=False)  # the whole file
    source: str = ""

    def confidence(self, probs) -> np.ndarray:
        """P(label is right) for each prob (float64, in [0, 1])."""
        p = np.asarray(probs, dtype=np.float64)
        if self.method == "isotonic":
            out = np.interp(np.clip(p, 0.0, 1.0), self.params["x"], self.params["y"])
        else:
            out = 1.0 / (1.0 + np.exp(-(self.params["a"] * logit(p) + self.params["b"])))
        return np.clip(out, 0.0, 1.0)

    def threshold(self, profile: str) -> float:
        if profile not in self.thresholds:
            raise CalibrationError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
        return float(self.thresholds[profile])

    def floor(self, min_confidence: float = 0.0, profile: str | None = None) -> float:
        """The lowest confidence kept: `min_confidence` or the profile's threshold, the higher."""
        return max(min_confidence, self.threshold(profile) if profile else 0.0)

    def summary(self) -> dict:
        """What serve's /v1/info and the tag manifest show."""
        r = self.record
        return {"method": self.method, "model_digest": self.model_digest, "n": r.get("n"),
                "ece_raw": r.get("ece_raw"), "ece_calibrated": r.get("ece_calibrated"),
                "thresholds": dict(self.thresholds)}  # fmt: skip

    def to_dict(self) -> dict:
        return {**self.record, "format": FORMAT, "version": FORMAT_VERSION, "method": self.method,
                "params": self.params, "thresholds": self.thresholds, "model": {"digest": self.model_digest}}  # fmt: skip


def read_calibration(path: str | Path) -> Calibration:
    """Read and check a calibration file; every problem is one `CalibrationError` line."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: cannot read the calibration file ({e})") from None
    except json.JSONDecodeError as e:
        raise CalibrationError(f"{path}: not a calibration file (invalid JSON: {e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CalibrationError(f"{path}: not an nxtrec calibration file (format {FORMAT!r} expected)")
    if record.get("version", 0) > FORMAT_VERSION:
        raise CalibrationError(f"{path}: calibration format {record['version']} is newer than this nxtrec reads")
    try:
        calibration = Calibration(record["method"], record["params"], record["thresholds"],
                                  record["model"]["digest"], record, str(path))  # fmt: skip
        _check_values(calibration)
    except (KeyError, TypeError, ValueError) as e:
        raise CalibrationError(f"{path}: damaged calibration file ({type(e).__name__}: {e})") from None
    return calibration


def _check_values(c: Calibration) -> None:
    """Raises ValueError where a value cannot be a calibration's (a damaged file)."""
    if c.method not in METHODS:
        raise ValueError(f"unknown method {c.method!r}")
    if c.method == "isotonic":
        x, y = np.asarray(c.params["x"], dtype=np.float64), np.asarray(c.params["y"], dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or len(x) < 1 or np.any(np.diff(x) < 0) or np.any(np.diff(y) < 0):
            raise ValueError("the isotonic knots must be two increasing lists of one length")
        values = np.concatenate([x, y])
    else:
        values = np.array([c.params["a"], c.params["b"]], dtype=np.float64)
        if c.params["a"] < 0:
            raise ValueError("Platt scaling's slope must be >= 0 (a monotone map)")
    if not np.all(np.isfinite(values)) or (c.method == "isotonic" and (values.min() < 0 or values.max() > 1)):
        raise ValueError("values out of range")
    if set(c.thresholds) != set(PROFILES) or not all(0 <= float(t) <= 1 for t in c.thresholds.values()):
        raise ValueError(f"thresholds must give each of {', '.join(PROFILES)} a confidence in [0, 1]")
    if not isinstance(c.model_digest, str) or len(c.model_digest) != 64:
        raise ValueError("model digest must be a SHA-256 hex string")


def calibration_for(model_dir: str | Path | None, file: str | Path | None = None,
                    digest: str | None = None, adapted: bool = False) -> Calibration | None:  # fmt: skip
    """The calibration of a model: `file`, else the model directory's calibration.json, else
    None (also for `file=False`: none wanted). `adapted`: the model is loaded with an adapter
    (`nxtrec teach`), which its directory's calibration does not describe: only `file` then.
    It must have been fitted for this model: its digest is compared with `digest` (default:
    the model directory's, computed here); another model's is refused."""
    if file is False or (file is None and adapted):
        return None
    if file is None:
        if model_dir is None or not (Path(model_dir) / CALIBRATION_FILE).is_file():
            return None
        file = Path(model_dir) / CALIBRATION_FILE
    calibration = read_calibration(file)
    expected = digest or model_digest(model_dir)
    if calibration.model_digest != expected:
        raise CalibrationError(f"{file}: fitted for another model (digest {calibration.model_digest[:12]}, this model "
                               f"{expected[:12]}); fit one with nxtrec calibrate, or remove the file")
    return calibration


def check_confidence_range(min_confidence: float, profile: str | None) -> None:
    """A known profile and a min_confidence in [0, 1]."""
    if profile is not None and profile not in PROFILES:
        raise CalibrationError(f"unknown profile {profile!r}; choose from {', '.join(PROFILES)}")
    if not 0.0 <= min_confidence <= 1.0 or math.isnan(min_confidence):
        raise CalibrationError(f"min_confidence must be in [0, 1] (got {min_confidence})")


def check_confidence_options(min_confidence: float, profile: str | None, calibration: Calibration | None) -> None:
    """--min-confidence and --profile need a calibration (and a known profile)."""
    check_confidence_range(min_confidence, profile)
    if calibration is None and (min_confidence > 0 or profile is not None):
        what = f"--profile {profile}" if profile is not None else "--min-confidence"
        raise CalibrationError(f"{what} needs a calibrated model: run nxtrec calibrate --model DIR --data VAL "
                               "(or give --calibration FILE)")


def add_confidence(labels: list[Label], calibration: Calibration | None, min_confidence: float = 0.0,
                   profile: str | None = None) -> list[Label]:  # fmt: skip
    """Each label with its `confidence`, those below `min_confidence` or the profile's
    threshold (the higher of the two) dropped; the labels unchanged without a calibration."""
    if calibration is None:
        return labels
    floor = calibration.floor(min_confidence, profile)
    for label, conf in zip(labels, calibration.confidence([lab.prob for lab in labels])):
        label.confidence = float(conf)
    # compared as written out (`rounded`), as keep_labels compares prob
    return [lab for lab in labels if rounded(lab.confidence) >= floor] if floor > 0 else labels


def confidence_settings(calibration: Calibration | None, min_confidence: float = 0.0, profile: str | None = None) -> dict:
    """The calibration and the thresholds in use, as serve's /v1/info and the tag manifest
    record them ({} without a calibration)."""
    if calibration is None:
        return {}
    return {"calibration": calibration.summary(), "profile": profile,
            "min_confidence": calibration.floor(min_confidence, profile)}
