"""`nxtrec export-onnx --model DIR --out DIR`: ONNX export for deployment without PyTorch
(run it with `nxtrec predict --onnx DIR`; see docs/onnx.md)."""

from __future__ import annotations

from nxtrec.cli.options import existing_file, positive_float


def register(sub) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a model directory to ONNX (encoder, embeddings, KV-cache decoder) and validate it",
        description="Write the vision encoder, the token embedding table and the decoder as a prefill graph and a "
        "one-token step graph with explicit past keys/values (ONNX external data, any model size), plus "
        "nxtrec-onnx.json; then run ONNX Runtime against PyTorch on a sample and report the max difference.",
    )
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer.model)")
    p.add_argument("--out", required=True, help="output ONNX directory (new or empty, or a previous export to replace)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="weights and activations")
    p.add_argument("--quantize", choices=["int8"], help="int8 dynamic quantization of the encoder and decoder MatMuls")
    p.add_argument("--layout", default="nxtrec", choices=["nxtrec", "released"],
                   help="nxtrec: KV-cache decoder (default); released: the reference's encoder.onnx, Wte.npz, "
                   "decoder_p1-p3.onnx (no cache), e.g. for tools written for those files")
    p.add_argument("--image", type=existing_file, help="sample image for the validation (default: seeded noise)")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch comparison")
    p.add_argument("--tolerance", type=positive_float,
                   help="fail when the max difference exceeds this (default: 1e-2 for float32; float16 and int8 "
                   "differences are reported, not enforced)")
    p.set_defaults(func=run_export)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run_export(args) -> int:
    from pathlib import Path

    from nxtrec.errors import NxtrecError
    from nxtrec.extras import require
    from nxtrec.onnx.export import export_onnx
    from nxtrec.onnx.released import export_released_layout_dir

    require("onnx", "onnxscript", "onnxruntime", command="export-onnx")  # torch.onnx would wrap the error
    if args.layout == "released":
        if args.quantize or args.dtype != "float32":
            raise NxtrecError("--layout released is float32 only (as the released files)")
        out = export_released_layout_dir(args.model, args.out)
        sizes = {p.name: p.stat().st_size for p in sorted(Path(out).iterdir()) if p.is_file()}
        validation = None
    else:
        manifest = export_onnx(args.model, args.out, dtype=args.dtype, quantize=args.quantize,
                               validate=not args.no_validate, image=args.image, tolerance=args.tolerance)
        sizes, validation = manifest["sizes"], manifest.get("validation")
        from nxtrec.onnx.calibration import copy_calibration

        if copy_calibration(args.model, args.out) is not None:  # with its SHA-256 in the manifest
            sizes["calibration.json"] = (Path(args.out) / "calibration.json").stat().st_size
    print(f"wrote {args.out}:")
    for name, n in sizes.items():
        print(f"  {name:<24}{_size(n):>10}")
    print(f"  {'total':<24}{_size(sum(sizes.values())):>10}")
    if validation:
        diffs = validation["max_abs_diff"]
        print("max |ONNX Runtime - PyTorch| on " + validation["sample"] + ": "
              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    print(f"run it with: nxtrec predict --onnx {args.out} IMAGE...")
    return 0
