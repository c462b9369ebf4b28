"""A model's calibration in its ONNX export (torch-free): `nxtrec export-onnx` copies the
model directory's calibration.json into the export and records, in the manifest, the source
model's digest (what a calibration is checked against) and the copy's SHA-256; the ONNX
engine reads it from there (nxtrec.inference.calibration applies it)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nxtrec.digests import file_sha256, model_digest
from nxtrec.inference.calibration import (
    CALIBRATION_FILE,
    Calibration,
    CalibrationError,
    calibration_for,
)
from nxtrec.onnx.format import MANIFEST


def copy_calibration(model_dir: str | Path, out_dir: str | Path) -> Calibration | None:
    """Record the model's digest in the export's manifest and copy its calibration (when it
    has one, checked first) with its size and SHA-256; the manifest is replaced atomically."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    manifest = json.loads((out_dir / MANIFEST).read_text())
    manifest["model_digest"] = digest = model_digest(model_dir)
    calibration = calibration_for(model_dir, digest=digest)
    target = out_dir / CALIBRATION_FILE
    target.unlink(missing_ok=True)  # a previous export's, for another model
    for key in ("sizes", "sha256"):
        manifest.get(key, {}).pop(CALIBRATION_FILE, None)
    manifest.pop("calibration", None)
    if calibration is not None:
        shutil.copyfile(model_dir / CALIBRATION_FILE, target)
        sha = file_sha256(target)
        manifest["calibration"] = {"file": CALIBRATION_FILE, "sha256": sha}
        manifest.setdefault("sizes", {})[CALIBRATION_FILE] = target.stat().st_size
        manifest.setdefault("sha256", {})[CALIBRATION_FILE] = sha
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    return calibration


def export_calibration(path: Path, manifest: dict | None, file: str | Path | None = None) -> Calibration | None:
    """The calibration of an ONNX export: `file`, else the one the manifest records (its
    SHA-256 checked), else None (also for `file=False`). Either must be the exported model's
    (its digest)."""
    recorded = (manifest or {}).get("calibration")
    if file is False or (file is None and recorded is None):  # False: none wanted
        return None
    digest = (manifest or {}).get("model_digest")
    if digest is None:
        raise CalibrationError(f"{path}: this export records no model digest (the released layout, or an export by "
                               "an older nxtrec); re-export with nxtrec export-onnx to use a calibration")
    if file is None:
        file = Path(path) / recorded["file"]
        if not file.is_file() or file_sha256(file) != recorded["sha256"]:
            raise CalibrationError(f"{file}: missing or its SHA-256 differs from {MANIFEST} (damaged or replaced); "
                                   "re-export")
    return calibration_for(None, file, digest=digest)
