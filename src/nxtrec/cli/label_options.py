"""The labelling options shared by `nxtrec pack` and `nxtrec labels`: `--backend`, `--compat`."""

from __future__ import annotations

import argparse
import os

BACKENDS = ("spacy", "nltk")  # nxtrec.data.labels.BACKENDS, repeated to keep spaCy out of start-up
COMPAT_HELP = "the reference's label rules: substring noise-word removal, duplicate lemmas kept"
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)  # labelling processes


def add_label_options(p, defaults=None) -> None:
    """`--backend` and `--compat`, defaulting to those of `defaults` (an already parsed namespace)."""
    defaults = defaults or argparse.Namespace(backend="spacy", compat=False)
    p.add_argument("--backend", choices=BACKENDS, default=defaults.backend, help="label backend (default spacy)")
    p.add_argument("--compat", action="store_true", default=defaults.compat, help=COMPAT_HELP)
