"""`nxtrec teach --examples SRC --out ADAPTER_DIR`: teach new labels from a few images
(a low-rank adapter; docs/teach.md)."""

from __future__ import annotations

from nxtrec.cli.options import fraction, int_at_least, non_negative_int, positive_float, positive_int, probability
from nxtrec.data.xmp import SIDECAR_NAMES
from nxtrec.training.teach_data import SOURCES


def register(sub) -> None:
    p = sub.add_parser("teach", help="teach new labels from a few example images (writes an adapter)",
                       description="Train a low-rank adapter (LoRA) on the decoder's attention and feed-forward "
                       "layers from a few examples. Use it with --adapter DIR on predict, tag, serve, eval and "
                       "attention, or bake it in with `nxtrec merge-adapter`. Resumes after an interruption.")
    p.add_argument("--model", help="base model directory (default: the bundled default model)")
    p.add_argument("--examples", required=True, metavar="SRC",
                   help="a JSONL file of {\"image\": PATH, \"labels\": [...]}, a folder with one sub-folder "
                   "of images per label, a Label Studio JSON export, or (with --examples-from xmp) a folder of "
                   "images with XMP sidecars")
    p.add_argument("--examples-from", default="auto", choices=SOURCES,
                   help="how to read SRC (default auto: a folder is label folders, a .json file a Label Studio "
                   "export, another file JSONL); xmp: the keywords people added to the images' sidecars")
    p.add_argument("--image-root", metavar="DIR", help="Label Studio: the folder the tasks' image ids and "
                   "local-file paths are relative to (default: the current folder)")
    p.add_argument("--xmp-name", default="image", choices=SIDECAR_NAMES,
                   help="sidecar photo.jpg.xmp or photo.xmp, as `nxtrec tag --xmp-name` (default image)")
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="adapter folder to write")
    p.add_argument("--rank", type=positive_int, default=8, help="adapter rank (default 8)")
    p.add_argument("--alpha", type=positive_float, default=16.0, help="adapter scale numerator (default 16)")
    p.add_argument("--encoder-blocks", type=non_negative_int, default=0,
                   help="also adapt the last N encoder blocks and the projection (default 0)")
    p.add_argument("--no-output-rows", dest="output_rows", action="store_false",
                   help="adapt the projections only, not the output layer's rows of the taught labels' tokens")
    p.add_argument("--steps", type=positive_int, default=300, help="most optimizer steps (default 300)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per step (default 16)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed: the same seed gives the same adapter")
    p.add_argument("--held-out", type=fraction, default=0.2, help="share of each label's examples held out "
                   "for early stopping and the before/after figures (default 0.2)")
    p.add_argument("--eval-every", type=positive_int, default=25, help="steps between held-out checks and "
                   "checkpoints (default 25)")
    p.add_argument("--patience", type=positive_int, default=4, help="held-out checks without improvement "
                   "before stopping (default 4)")
    p.add_argument("--replay-scenes", type=non_negative_int, help="synthetic scenes of the old categories "
                   "mixed in (default: 400 for the bundled model, 0 otherwise)")
    p.add_argument("--distill-min-prob", type=probability, default=0.3, help="the model's own labels on "
                   "the examples kept as targets from this probability (default 0.3)")
    p.add_argument("--threads", type=int_at_least(1), default=2, help="CPU threads (fixed, for the same "
                   "adapter on every run; default 2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nxtrec.training.teach import TeachOptions, teach
    from nxtrec.training.teach_data import read_examples

    options = TeachOptions(rank=args.rank, alpha=args.alpha, encoder_blocks=args.encoder_blocks, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, held_out=args.held_out,
                           eval_every=args.eval_every, patience=args.patience, replay_scenes=args.replay_scenes,
                           distill_min_prob=args.distill_min_prob, output_rows=args.output_rows,
                           threads=args.threads)  # fmt: skip
    examples = read_examples(args.examples, args.examples_from, args.image_root, args.xmp_name)
    info = teach(args.model, examples, args.out, options)
    f = info.figures
    print(f"adapter: {args.out}  (taught {', '.join(info.labels)}; {f['steps']} steps)")
    print(f"recall@5 of the taught labels on {f['examples']} {f['split']} examples: "
          f"{f['recall@5_taught_before']:.2f} before, {f['recall@5_taught_after']:.2f} after; "
          f"old labels kept: {f['old_top5_kept_in_top10']:.2f}")
    print(f"use it: nxtrec predict IMAGE --adapter {args.out}")
    return 0
