"""`nxtrec synth`: render the synthetic-scenes dataset and pack it into shards."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("synth", help="render synthetic scenes of everyday objects and pack them into shards")
    p.add_argument("--out", required=True, help="output folder (images/, train/ and val/ shards)")
    p.add_argument("--n", type=int, default=20000, help="training scenes")
    p.add_argument("--val", type=int, help="held-out scenes (default: 5%% of --n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--workers", type=int, default=1, help="packing processes")
    p.add_argument("--backend", default="spacy", choices=["spacy", "nltk"], help="label backend for the ground truth")
    p.set_defaults(func=run)


def run(args) -> int:
    from nxtrec.data.synth import generate

    summaries = generate(args.out, args.n, args.seed, args.val, args.size, args.shard_size, args.workers, args.backend)
    for split, summary in summaries.items():
        print(f"{split}: {summary.format()}")
    return 0
