"""Measuring and fitting calibration (`nxtrec eval`, `nxtrec calibrate`; the map is applied by
nxtrec.inference.calibration).

- ECE: the labels' scores in 15 equal-width bins over [0, 1]; the expected calibration error
  is the mean over labels of |accuracy - mean score| of their bin.
- The fit: a monotone map from a label's prob to P(right), isotonic regression (SciPy's
  pool-adjacent-violators, its knots interpolated linearly) or Platt scaling (a logistic
  regression on logit(prob), which contains temperature scaling), whichever has the lower ECE
  in 5-fold cross-validation over images. Folds come from a fixed seed, so a fit is
  deterministic. (SciPy rather than scikit-learn: the same two fits, in a dependency that
  scikit-learn would bring anyway.)
- Profiles: confidence thresholds picked on the calibration set (`profile_thresholds`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from nxtrec.inference.calibration import PROFILES, Calibration, logit
from nxtrec.inference.ranking import rounded

N_BINS = 15
CV_FOLDS = 5
SEED = 0
TARGET = 0.9  # the precision profile's precision and the recall profile's recall


@dataclass
class Bin:
    lo: float
    hi: float
    n: int
    score: float  # mean score of the bin's labels (0 when empty)
    accuracy: float  # fraction right (0 when empty)


def reliability_bins(scores, correct, n_bins: int = N_BINS) -> list[Bin]:
    """Labels in `n_bins` equal-width bins of their score (1.0 in the last bin)."""
    scores, correct = np.clip(np.asarray(scores, dtype=np.float64), 0, 1), np.asarray(correct, dtype=np.float64)
    index = np.minimum((scores * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        mask = index == b
        n = int(mask.sum())
        bins.append(Bin(b / n_bins, (b + 1) / n_bins, n, float(scores[mask].mean()) if n else 0.0,
                        float(correct[mask].mean()) if n else 0.0))  # fmt: skip
    return bins


def ece(scores, correct, n_bins: int = N_BINS) -> float:
    bins = reliability_bins(scores, correct, n_bins)
    total = max(sum(b.n for b in bins), 1)
    return float(sum(b.n / total * abs(b.accuracy - b.score) for b in bins))


def bins_table(bins: list[Bin]) -> str:
    lines = [f"{'bin':>11} {'labels':>7} {'score':>7} {'right':>7}"]
    lines += [f"{b.lo:.3f}-{b.hi:.3f} {b.n:>7} {b.score:>7.3f} {b.accuracy:>7.3f}" for b in bins]
    return "\n".join(lines)


def fit_map(method: str, probs, correct) -> dict:
    """The parameters of `method` fitted to (prob, right) pairs."""
    probs, correct = np.clip(np.asarray(probs, dtype=np.float64), 0, 1), np.asarray(correct, dtype=np.float64)
    return fit_isotonic(probs, correct) if method == "isotonic" else fit_platt(probs, correct)


def fit_isotonic(probs: np.ndarray, correct: np.ndarray) -> dict:
    """SciPy's pool-adjacent-violators fit over the distinct probs (ties averaged, weighted by
    their count); only the ends of each constant run are kept as knots."""
    from scipy.optimize import isotonic_regression

    x, index, counts = np.unique(probs, return_inverse=True, return_counts=True)
    means = np.bincount(index, weights=correct, minlength=len(x)) / counts
    y = np.clip(isotonic_regression(means, weights=counts.astype(np.float64), increasing=True).x, 0, 1)
    keep = np.ones(len(x), dtype=bool)
    keep[1:-1] = (y[1:-1] != y[:-2]) | (y[1:-1] != y[2:])
    return {"x": x[keep].tolist(), "y": y[keep].tolist()}


def fit_platt(probs: np.ndarray, correct: np.ndarray) -> dict:
    """sigmoid(a logit(p) + b) by maximum likelihood (SciPy's L-BFGS-B from a = 1, b = 0, a >= 0:
    a monotone map)."""
    from scipy.optimize import minimize

    z = logit(probs)

    def loss(ab):
        s = ab[0] * z + ab[1]
        # log(1 + e^s) - y s, and its gradient (sigmoid(s) - y) * (z, 1)
        residual = 1.0 / (1.0 + np.exp(-s)) - correct
        return np.mean(np.logaddexp(0, s) - correct * s), np.array([np.mean(residual * z), np.mean(residual)])

    fit = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B", bounds=[(0, None), (None, None)])
    return {"a": float(fit.x[0]), "b": float(fit.x[1])}


def apply_map(method: str, params: dict, probs) -> np.ndarray:
    return Calibration(method, params, {}, "").confidence(probs)


def folds_of(groups, folds: int = CV_FOLDS) -> np.ndarray:
    """The fold of each label: its image's (images shuffled with a fixed seed)."""
    images, index = np.unique(np.asarray(groups), return_inverse=True)
    order = np.random.default_rng(SEED).permutation(len(images))
    return (order % folds)[index]


def cross_validated(method: str, probs, correct, groups, folds: int = CV_FOLDS) -> np.ndarray:
    """Each label's confidence from a map fitted without its image's fold."""
    probs, correct = np.asarray(probs, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    fold = folds_of(groups, folds)
    out = np.empty_like(probs)
    for f in range(folds):
        held = fold == f
        if held.any():
            out[held] = apply_map(method, fit_map(method, probs[~held], correct[~held]), probs[held])
    return out


def profile_thresholds(conf, correct, target: float = TARGET) -> dict[str, dict]:
    """For each profile, the confidence threshold (labels at or above it are kept) and the
    precision, recall (of the right labels among those scored) and fraction kept it gave:
    precision, the lowest threshold with precision >= target (else the highest confidence);
    balanced, the highest F1; recall, the highest threshold with recall >= target."""
    conf, correct = np.asarray(conf, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    c, hits = conf[order], np.cumsum(correct[order])
    last = np.r_[c[1:] != c[:-1], True]  # the end of each run of equal confidences
    kept = np.arange(1, len(c) + 1)[last]
    t, hits = c[last], hits[last]
    precision, recall = hits / kept, hits / max(correct.sum(), 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0)
    ok = np.nonzero(precision >= target)[0]
    full = np.nonzero(recall >= target)[0]
    picks = {"precision": ok[-1] if len(ok) else 0, "balanced": int(np.argmax(f1)), "recall": full[0] if len(full) else len(t) - 1}
    # thresholds as written out (`rounded`), as the labels' confidences are compared
    return {name: {"threshold": rounded(float(t[i])), "precision": float(precision[i]), "recall": float(recall[i]),
                   "kept": float(kept[i] / len(c))} for name, i in picks.items()}  # fmt: skip


def fit_calibration(probs, correct, groups, model_digest: str, info: dict | None = None) -> Calibration:
    """Choose and fit the map, pick the profiles' thresholds; `info` (data digest, decoding
    options, ...) is recorded in the file too."""
    probs, correct = np.asarray(probs, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    cv = {m: cross_validated(m, probs, correct, groups) for m in ("isotonic", "platt")}
    cv_ece = {m: ece(v, correct) for m, v in cv.items()}
    method = min(cv_ece, key=lambda m: (cv_ece[m], m))
    params = fit_map(method, probs, correct)
    conf = apply_map(method, params, probs)
    profiles = profile_thresholds(conf, correct)
    record = {**(info or {}), "n": len(probs), "n_images": len(np.unique(groups)),
              "right": int(correct.sum()), "signal": "prob", "ece_bins": N_BINS,
              "ece_raw": round(ece(probs, correct), 6), "ece_calibrated": round(cv_ece[method], 6),
              "cv": {"folds": CV_FOLDS, "seed": SEED, "ece": {m: round(v, 6) for m, v in cv_ece.items()}},
              "profiles": profiles,
              "bins_raw": [asdict(b) for b in reliability_bins(probs, correct)],
              "bins_calibrated": [asdict(b) for b in reliability_bins(cv[method], correct)]}  # fmt: skip
    thresholds = {name: profiles[name]["threshold"] for name in PROFILES}
    calibration = Calibration(method, params, thresholds, model_digest, record)
    return Calibration(method, params, thresholds, model_digest, calibration.to_dict())


def confidence_report(records: list[dict], right: list[list[bool]]) -> dict:
    """ECE and bins of the labels' prob, and of their confidence when they carry one (a
    calibrated model), for `nxtrec eval`."""
    preds = [p for r in records for p in r["pred"]]
    correct = np.array([c for row in right for c in row], dtype=np.float64)
    report = {"labels": len(preds), "right": int(correct.sum()), "ece_bins": N_BINS}
    scores = {"prob": [p["prob"] for p in preds]}
    if preds and all("confidence" in p for p in preds):
        scores["confidence"] = [p["confidence"] for p in preds]
    for name, values in scores.items():
        report[name] = {"ece": round(ece(values, correct), 6), "bins": [asdict(b) for b in reliability_bins(values, correct)]}
    return report
