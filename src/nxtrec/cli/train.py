"""`nxtrec train CONFIG` (also under `torchrun ... -m nxtrec train CONFIG`)."""

from __future__ import annotations

import os
import sys


def register(sub) -> None:
    from nxtrec.training.config import recipe_names  # torch-free

    recipes = ", ".join(recipe_names())
    p = sub.add_parser(
        "train",
        help="train a model (one process, or every process of torchrun / srun)",
        description=f"Train as configured by CONFIG: a TOML file, or a shipped recipe name ({recipes}). "
        "Continues from the run directory's newest checkpoint when there is one.",
    )
    p.add_argument("config", help=f"config file or shipped recipe name: {recipes}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key; VALUE is a TOML literal (2e-5, true, \"text\", [1, 2]); repeatable")
    p.add_argument("--run-dir", help="shorthand for --set run.dir=DIR")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                   help="resume from the newest checkpoint of the run directory (an error if there is none; "
                   "without this flag a run resumes when it has one), or from checkpoint folder CKPT")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run_train)


def run_train(args) -> int:
    from nxtrec.training.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.run_dir:
        cfg.run.dir = args.run_dir
    if args.print_config:
        sys.stdout.write(cfg.to_toml())
        return 0
    if int(os.environ.get("RANK", "0")) != 0:
        import warnings

        warnings.simplefilter("ignore")  # non-zero ranks stay quiet; errors still surface
    from nxtrec.training.main import train

    summary = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        if summary["loss"] is None and summary["step"] >= summary["total_steps"]:
            print(f"{summary['run_dir']} is already complete ({summary['step']} of {summary['total_steps']} steps); "
                  "nothing to train (raise train.max_steps / train.epochs to continue it)")
        else:
            print(f"trained {summary['step']} steps in {summary['run_dir']}; last loss {summary['loss']}")
        if summary["final"]:
            print(f"model: {summary['final']}  (nxtrec predict IMAGE --model {summary['final']})")
    return 0
