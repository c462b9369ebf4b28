"""The confidence options of predict, tag and serve: `--calibration`, `--min-confidence`,
`--profile` (nxtrec.inference.calibration; docs/calibration.md)."""

from __future__ import annotations

from nxtrec.cli.options import existing_file, fraction
from nxtrec.inference.calibration import PROFILES


def add_confidence_arguments(p) -> None:
    p.add_argument("--calibration", metavar="FILE", type=existing_file,
                   help="a calibration of this model (nxtrec calibrate; default: the model's own calibration.json, "
                        "when it has one): every label gets a confidence")
    p.add_argument("--min-confidence", type=fraction, default=0.0,
                   help="drop labels with a lower calibrated confidence (needs a calibration)")
    p.add_argument("--profile", choices=PROFILES,
                   help="keep the labels above the calibration's threshold for precision >= 0.9, the best F1, or "
                        "recall >= 0.9 on its calibration set (needs a calibration)")


def confidence_kwargs(args) -> dict:
    """`DecodeOptions` fields from the parsed options (only those given)."""
    out = {}
    if getattr(args, "min_confidence", 0.0):
        out["min_confidence"] = args.min_confidence
    if getattr(args, "profile", None):
        out["profile"] = args.profile
    return out


def check_engine_confidence(engine, options) -> None:
    """--min-confidence / --profile need the loaded engine to have a calibration."""
    from nxtrec.inference.calibration import check_confidence_options

    check_confidence_options(options.min_confidence, options.profile, getattr(engine, "calibration", None))
