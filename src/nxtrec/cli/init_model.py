"""`nxtrec init-model`: a randomly initialised model directory for a preset."""

from __future__ import annotations

from nxtrec.cli.options import non_negative_int


def register(sub) -> None:
    p = sub.add_parser("init-model", help="write a randomly initialised model directory for a preset")
    p.add_argument("--preset", required=True, help="nxtp-1.78b, nxtp-0.77b, small or tiny")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: a small one trained on the spot; "
                   "a synthetic 32000-piece one for the full presets)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random weights")
    p.set_defaults(func=run_init)


def run_init(args) -> int:
    from nxtrec.model.presets import init_model

    out = init_model(args.preset, args.out, tokenizer=args.tokenizer, seed=args.seed)
    print(f"wrote {out}")
    return 0
