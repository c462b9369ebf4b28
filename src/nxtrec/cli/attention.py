"""`nxtrec attention IMAGE --layer L|all --head H|all --out FILE.png`: the reference's view of
the decoder's attention among the image tokens in the prefix pass (a grid of per-token maps),
with the raw [P, P] array beside each picture as .npy."""

from __future__ import annotations

import sys
from pathlib import Path

from nxtrec.cli.adapter_options import add_adapter_argument
from nxtrec.cli.notices import demo_notice, loading
from nxtrec.cli.options import device


def register(sub) -> None:
    p = sub.add_parser("attention", help="draw the decoder's attention among the image tokens (one layer and head)")
    p.add_argument("image", help="image file")
    p.add_argument("--model", help="model directory (default: the bundled default model)")
    p.add_argument("--layer", default="0", help="decoder layer, counted from 0, or 'all' (default 0)")
    p.add_argument("--head", default="0", help="attention head, counted from 0, or 'all' (default 0)")
    p.add_argument("--out", required=True, help="output PNG; FILE.npy is written beside it. With 'all', "
                   "one pair per layer and head: FILE_layerL_headH.png/.npy")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no note on stderr about the bundled demo model, no loading line")
    add_adapter_argument(p)
    p.set_defaults(func=run)


def _indices(value: str, count: int, option: str) -> list[int]:
    from nxtrec.errors import NxtrecError

    if value == "all":
        return list(range(count))
    if not value.isdigit() or int(value) >= count:
        raise NxtrecError(f"{option} {value!r}: expected 'all' or a number from 0 to {count - 1}")
    return [int(value)]


def selected(args) -> tuple[list[int], list[int]]:
    """The layers and heads asked for, checked against the model directory's config.json
    before its weights load (a missing or bad config is left to the loading to report)."""
    from nxtrec.model.config import ConfigError, ModelConfig
    from nxtrec.model.directory import default_model_dir

    try:
        dec = ModelConfig.load(Path(args.model or default_model_dir()) / "config.json").decoder
    except (ConfigError, OSError):
        return [], []
    return _indices(args.layer, dec.n_layers, "--layer"), _indices(args.head, dec.n_heads, "--head")


def output_paths(out: str, layer: int, head: int, single: bool) -> tuple[Path, Path]:
    base = Path(out)
    if base.suffix.lower() == ".png":
        base = base.with_suffix("")
    if not single:
        base = base.with_name(f"{base.name}_layer{layer}_head{head}")
    return base.with_suffix(".png"), base.with_suffix(".npy")


def run(args) -> int:
    import numpy as np

    from nxtrec.inference.attention import grid_shape, image_attention
    from nxtrec.inference.heatmaps import attention_grid
    from nxtrec.inference.recognizer import Recognizer

    layers, heads = selected(args)  # out of range: an error before the weights load
    with loading("attention", args.model, quiet=args.quiet):
        rec = Recognizer.from_pretrained(args.model, device=args.device, adapter=args.adapter)
    demo_notice(args.model, quiet=args.quiet)
    dec = rec.config.decoder
    if not layers:  # config.json was not readable before loading
        layers, heads = _indices(args.layer, dec.n_layers, "--layer"), _indices(args.head, dec.n_heads, "--head")
    blocks = image_attention(rec.model, rec.pixels([args.image]).to(rec.device), rec.prompt_ids, layers)
    single = len(layers) == len(heads) == 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        for head in heads:
            png, npy = output_paths(args.out, layer, head, single)
            block = blocks[layer][head]
            np.save(npy, block)
            attention_grid(block, grid_shape(rec.model)).save(png)
            print(f"layer {layer} head {head}: {png} {npy}")
    sys.stdout.flush()
    return 0
