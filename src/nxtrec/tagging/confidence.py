"""The calibration a tag job uses, found before its model loads, for the manifest: the
calibration's summary and the confidence threshold in use (nxtrec.inference.calibration)."""

from __future__ import annotations

from pathlib import Path

from nxtrec.inference.calibration import (
    Calibration,
    calibration_for,
    confidence_settings,
)


def job_calibration(model: str | None, onnx: str | None, file: str | None,
                    adapter: str | None = None) -> Calibration | None:  # fmt: skip
    """The calibration the engine of `load_engine(model, onnx, calibration=file,
    adapter=adapter)` will use; every check is made here too, so that a bad calibration fails
    before any work."""
    if onnx:
        from nxtrec.onnx.calibration import export_calibration
        from nxtrec.onnx.format import MANIFEST
        from nxtrec.onnx.integrity import read_manifest

        manifest = read_manifest(Path(onnx)) if (Path(onnx) / MANIFEST).is_file() else None  # None: released files
        return export_calibration(Path(onnx), manifest, file)
    if model is None:
        from nxtrec.model.directory import default_model_dir

        model = str(default_model_dir())
    return calibration_for(model, file, adapted=bool(adapter))


def tag_confidence_settings(opts) -> dict:
    """{"confidence": {...}} for a job's settings when it has a calibration, else {}; the
    options need one (TagOptions: model, onnx, calibration, adapter, min_confidence, profile)."""
    from nxtrec.inference.calibration import check_confidence_options

    calibration = job_calibration(opts.model, opts.onnx, opts.calibration, opts.adapter)
    check_confidence_options(opts.min_confidence, opts.profile, calibration)
    settings = confidence_settings(calibration, opts.min_confidence, opts.profile)
    return {"confidence": settings} if settings else {}
