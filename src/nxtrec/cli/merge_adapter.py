"""`nxtrec merge-adapter --adapter DIR --out MODEL_DIR`: a model directory with an adapter of
`nxtrec teach` baked into its weights (for export-onnx, quantize, or tools that take a model)."""

from __future__ import annotations

from nxtrec.cli.options import existing_dir


def register(sub) -> None:
    p = sub.add_parser("merge-adapter", help="write a model directory with an adapter baked into its weights")
    p.add_argument("--model", type=existing_dir, help="base model directory (default: the bundled default model)")
    p.add_argument("--adapter", required=True, type=existing_dir, help="adapter folder of nxtrec teach")
    p.add_argument("--out", required=True, help="model directory to write")
    p.set_defaults(func=run)


def run(args) -> int:
    from nxtrec.model.adapter import merge_adapter_dir

    out = merge_adapter_dir(args.model, args.adapter, args.out)
    print(f"model with the adapter: {out}  (nxtrec export-onnx --model {out} ...)")
    return 0
