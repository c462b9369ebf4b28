"""`nxtrec synth`: render the synthetic-scenes dataset and pack it into shards."""

from __future__ import annotations

from nxtrec.cli.options import int_at_least, non_negative_int, positive_int
from nxtrec.errors import NxtrecError


def register(sub) -> None:
    p = sub.add_parser("synth", help="render synthetic scenes of everyday objects and pack them into shards")
    p.add_argument("--out", help="output folder (images/, train/ and val/ shards)")
    p.add_argument("--tag-list", metavar="FILE", help="write the categories (with synonyms) as a tag list for "
                   "--vocab / --map-to; without --out, only that")
    p.add_argument("--n", type=non_negative_int, default=20000, help="training scenes")
    p.add_argument("--val", type=non_negative_int, help="held-out scenes (default: 5%% of --n)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the training scenes (the held-out split has its own)")
    p.add_argument("--size", type=int_at_least(16), default=256, help="image side in pixels")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="scenes per shard")
    p.add_argument("--workers", type=positive_int, default=1, help="packing processes")
    p.add_argument("--backend", default="spacy", choices=["spacy", "nltk"], help="label backend for the ground truth")
    p.add_argument("--new-categories", metavar="N|NAMES", help="instead: --n scenes per emoji category the bundled "
                   "model never saw (the first N, or names such as octopus,robot), one folder per label (the "
                   "input of nxtrec teach) plus scenes.jsonl with every scene's objects")
    p.set_defaults(func=run)


def run(args) -> int:
    from nxtrec.data.synth import generate, write_tag_list

    if args.tag_list:
        print(f"tag list: {write_tag_list(args.tag_list)}")
    if not args.out:
        if args.tag_list:
            return 0
        raise NxtrecError("give --out DIR (the scenes) and/or --tag-list FILE (the categories)")
    if args.new_categories:
        from nxtrec.data.synth_new import new_categories, render_new

        listing = render_new(args.out, new_categories(args.new_categories), args.n, args.seed, args.size)
        print(f"new categories: {listing} (teach with: nxtrec teach --examples {args.out} --out ADAPTER_DIR)")
        return 0
    summaries = generate(args.out, args.n, args.seed, args.val, args.size, args.shard_size, args.workers, args.backend)
    for split, summary in summaries.items():
        print(f"{split}: {summary.format()}")
    return 0
