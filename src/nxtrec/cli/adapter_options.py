"""`--adapter DIR`, shared by the commands that load a model (predict, tag, serve, eval,
attention)."""

from __future__ import annotations

from nxtrec.cli.options import existing_dir


def add_adapter_argument(p) -> None:
    p.add_argument("--adapter", type=existing_dir, metavar="DIR",
                   help="adapter folder of `nxtrec teach`, merged into the model's weights when it loads "
                   "(PyTorch path; for --onnx bake it in with merge-adapter)")
