"""`nxtrec quantize --model DIR --out DIR`: save the int8 model once (docs/int8.md), instead of
quantising the float32 one at every `--dtype int8` load."""

from __future__ import annotations

from nxtrec.cli.options import existing_dir


def register(sub) -> None:
    p = sub.add_parser(
        "quantize",
        help="write an int8 model directory (Linear weights quantised once, as --dtype int8 does at load time)",
        description="Quantise every Linear layer of a float model directory as `--dtype int8` does at load time "
        "(dynamic int8, one scale per output channel) and write the result as a model directory that loads "
        "without the float32 weights: faster, in less memory, with the same labels.",
    )
    p.add_argument("--model", type=existing_dir, help="float model directory (default: the bundled default model)")
    p.add_argument("--out", required=True, help="output model directory (new, or a previous one to replace)")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from nxtrec.model.directory import WEIGHTS_FILE, default_model_dir, quantize_model_dir

    model = Path(args.model) if args.model else default_model_dir()
    out = quantize_model_dir(model, args.out)
    before, after = ((d / WEIGHTS_FILE).stat().st_size / 2**20 for d in (model, out))
    print(f"wrote {out} (int8 Linear weights: {after:.1f} MB, the float model {before:.1f} MB)")
    print(f"load it as any model directory: nxtrec predict --model {out} IMAGE...")
    return 0
