"""`nxtrec attention IMAGE --layer L|all --head H|all [--patch R,C] --out FILE.png`: the
reference's view of the decoder's attention among the image tokens in the prefix pass (a grid
of per-token maps, titled with its layer and head; or, with --patch, one patch's map over the
image), with the raw [P, P] array beside each picture as .npy."""

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
    p.add_argument("--patch", type=patch_position, metavar="R,C",
                   help="draw where image patch (row R, column C, from 0) looks, over the image itself, "
                        "instead of the grid of every patch's map (the .npy is the whole block either way)")
    p.add_argument("--device", type=device, default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no note on stderr about the bundled demo model, no loading line")
    add_adapter_argument(p)
    p.set_defaults(func=run)


def patch_position(value: str) -> tuple[int, int]:
    """'R,C' -> (R, C), two numbers from 0."""
    import argparse

    parts = value.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected ROW,COLUMN (two numbers from 0, e.g. 3,4), got {value!r}")
    return int(parts[0]), int(parts[1])


def _indices(value: str, count: int, option: str) -> list[int]:
    from nxtrec.errors import NxtrecError

    if value == "all":
        return list(range(count))
    if not value.isdigit() or int(value) >= count:
        raise NxtrecError(f"{option} {value!r}: expected 'all' or a number from 0 to {count - 1}")
    return [int(value)]


def selected(args) -> tuple[list[int], list[int]]:
    """The layers and heads asked for, checked against the model directory's config.json
    before its weights load, as is --patch (a missing or bad config is left to the loading to
    report)."""
    from nxtrec.model.config import ConfigError, ModelConfig
    from nxtrec.model.directory import default_model_dir

    try:
        config = ModelConfig.load(Path(args.model or default_model_dir()) / "config.json")
    except (ConfigError, OSError):
        return [], []
    side = config.encoder.image_size // config.encoder.patch_size
    check_patch(args.patch, (side, side))
    dec = config.decoder
    return _indices(args.layer, dec.n_layers, "--layer"), _indices(args.head, dec.n_heads, "--head")


def check_patch(patch: tuple[int, int] | None, grid: tuple[int, int]) -> None:
    from nxtrec.errors import NxtrecError

    if patch and not (patch[0] < grid[0] and patch[1] < grid[1]):
        raise NxtrecError(f"--patch {patch[0]},{patch[1]}: the image has {grid[0]} x {grid[1]} patches "
                          f"(rows from 0 to {grid[0] - 1}, columns from 0 to {grid[1] - 1})")


def output_paths(out: str, layer: int, head: int, single: bool) -> tuple[Path, Path]:
    base = Path(out)
    if base.suffix.lower() == ".png":
        base = base.with_suffix("")
    if not single:
        base = base.with_name(f"{base.name}_layer{layer}_head{head}")
    return base.with_suffix(".png"), base.with_suffix(".npy")


def picture(args, block, grid: tuple[int, int], layer: int, head: int):
    """The grid of every patch's map, or with --patch that patch's map over the image; titled."""
    from nxtrec.inference.heatmaps import attention_grid, patch_attention, titled
    from nxtrec.model.image import load_image

    if args.patch:
        r, c = args.patch
        title = f"layer {layer}, head {head}: patch ({r}, {c})"
        return patch_attention(load_image(args.image), block[r * grid[1] + c], grid, (r, c), title)
    return titled(attention_grid(block, grid), f"layer {layer}, head {head}: each patch's attention over the image patches")


def run(args) -> int:
    import numpy as np

    from nxtrec.inference.attention import grid_shape, image_attention
    from nxtrec.inference.recognizer import Recognizer

    layers, heads = selected(args)  # out of range: an error before the weights load
    with loading("attention", args.model, quiet=args.quiet):
        rec = Recognizer.from_pretrained(args.model, device=args.device, adapter=args.adapter)
    demo_notice(args.model, quiet=args.quiet)
    dec = rec.config.decoder
    if not layers:  # config.json was not readable before loading
        layers, heads = _indices(args.layer, dec.n_layers, "--layer"), _indices(args.head, dec.n_heads, "--head")
    grid = grid_shape(rec.model)
    check_patch(args.patch, grid)
    blocks = image_attention(rec.model, rec.pixels([args.image]).to(rec.device), rec.prompt_ids, layers)
    single = len(layers) == len(heads) == 1
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for layer in layers:
        for head in heads:
            png, npy = output_paths(args.out, layer, head, single)
            block = blocks[layer][head]
            np.save(npy, block)
            picture(args, block, grid, layer, head).save(png)
            print(f"layer {layer} head {head}: {png} {npy}")
    sys.stdout.flush()
    return 0
