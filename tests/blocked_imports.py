"""Run `nxtrec` as a real process in which some packages are "not installed": a
`sitecustomize` on PYTHONPATH installs an import hook that raises ModuleNotFoundError for the
blocked top-level names, exactly as an absent package does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nxtrec.extras import CORE_DISTRIBUTIONS, MODULE_EXTRAS

# what the torch-free install has: the [runtime] extra and the packages those pull in
RUNTIME_MODULES = {"onnxruntime", "numpy", "PIL", "sentencepiece", "braceexpand", "webdataset", "yaml", "google"}
TORCH_FREE_BLOCK = sorted((set(CORE_DISTRIBUTIONS) | set(MODULE_EXTRAS)) - RUNTIME_MODULES)

SITECUSTOMIZE = '''\
import importlib.abc, os, sys

BLOCKED = frozenset(os.environ["NXTREC_TEST_BLOCK"].split(","))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
'''


def run_nxtrec(args: list[str], blocked: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run this environment's `nxtrec` entry point with `blocked` made unimportable."""
    site = tmp_path / "blocked-imports"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ, NXTREC_TEST_BLOCK=",".join(blocked), PYTHONPATH=str(site))
    script = Path(sys.executable).parent / "nxtrec"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "nxtrec"]
    return subprocess.run([*command, *args], check=False, capture_output=True, text=True, env=env, timeout=120)
