"""`nxtrec verify DIR...`: check model, ONNX and checkpoint directories before they are used.

- model directory (`config.json`): every config value, the tokenizer, every tensor's name and
  shape (read from the safetensors header; a truncated file fails), every tensor a float type
  and finite (no NaN, no infinity; read one tensor at a time); an int8 one (`nxtrec
  quantize`) also every tensor's dtype and every scale and zero point;
- ONNX export (`nxtrec-onnx.json`): every file's size and SHA-256 against the manifest, and
  the embedding table;
- a calibration (calibration.json, `nxtrec calibrate`) in either: its values, and that it was
  fitted for this model (the model's digest);
- an adapter folder (`adapter.json`, nxtrec teach): its description, every tensor named there
  present with a consistent shape, float and finite;
- training checkpoint (`ckpt-STEP/`) or run directory (`checkpoints/`): each checkpoint's
  tensors and state are read, its tensors float and finite.

Exit code 0 when all are good, 1 when one is not (each named on stderr with its reason).
"""

from __future__ import annotations

import sys
from pathlib import Path

from nxtrec.cli.options import existing_dir
from nxtrec.errors import NxtrecError


def register(sub) -> None:
    p = sub.add_parser("verify", help="check model, ONNX export, adapter and checkpoint directories (sizes, hashes, shapes)")
    p.add_argument("dirs", nargs="+", type=existing_dir, metavar="DIR", help="directories to check")
    p.set_defaults(func=run)


def verify_dir(path: Path) -> str:
    """A one-line summary of what was checked, or NxtrecError with what is wrong."""
    if (path / "nxtrec-onnx.json").is_file():
        from nxtrec.onnx.integrity import check_hashes, load_embeddings, read_manifest

        manifest = read_manifest(path)
        n = check_hashes(path, manifest)
        from nxtrec.onnx.calibration import export_calibration

        table = load_embeddings(path / manifest.get("files", {}).get("embeddings", "embeddings.npy"))
        return (f"ONNX export: {n} files match their size and SHA-256, embeddings {table.shape[0]}x{table.shape[1]}"
                + calibration_note(export_calibration(path, manifest)))
    if (path / "adapter.json").is_file():
        from nxtrec.model.adapter import verify_adapter

        return verify_adapter(path)
    if (path / "config.json").is_file():
        from nxtrec.inference.calibration import calibration_for
        from nxtrec.model.directory import verify_model_dir

        return f"model directory: {verify_model_dir(path)}" + calibration_note(calibration_for(path))
    from nxtrec.model.files import check_weights
    from nxtrec.training.checkpoint import STATE_FILE, checkpoint_dirs, read_checkpoint

    if (path / STATE_FILE).exists():
        tensors, state = read_checkpoint(path)
        dtypes = check_weights(tensors, str(path))
        return f"checkpoint: {len(tensors)} tensors ({dtypes}, all finite), step {state.get('step', '?')}"
    ckpts = checkpoint_dirs(path)
    if ckpts:
        for _, ckpt in ckpts:
            check_weights(read_checkpoint(ckpt)[0], str(ckpt))
        return f"run directory: {len(ckpts)} checkpoints readable (steps {', '.join(str(s) for s, _ in ckpts)})"
    raise NxtrecError(f"{path}: not a model directory, ONNX export, checkpoint or run directory")


def calibration_note(calibration) -> str:
    """", calibration.json: ..." when the folder has a calibration (read and checked: its
    values, and that it is this model's)."""
    if calibration is None:
        return ""
    return (f", {calibration.source.rsplit('/', 1)[-1]}: this model's, {calibration.method}, "
            f"{calibration.record.get('n')} labels, ECE {calibration.record.get('ece_raw')} -> "
            f"{calibration.record.get('ece_calibrated')}")


def run(args) -> int:
    bad = 0
    for name in args.dirs:
        try:
            print(f"{name}: ok, {verify_dir(Path(name))}")
        except NxtrecError as e:
            bad += 1
            print(f"nxtrec verify: FAILED {e}", file=sys.stderr)
        sys.stdout.flush()
    return 1 if bad else 0
