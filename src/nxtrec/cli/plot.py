"""`nxtrec plot RUN_DIR`: a run's loss and learning-rate curves."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("plot", help="draw a run's loss and learning-rate curves to a PNG")
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", help="output PNG (default: RUN_DIR/curves.png)")
    p.set_defaults(func=run_plot)


def run_plot(args) -> int:
    from nxtrec.training.logger import plot_run

    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0
