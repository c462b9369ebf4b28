"""The package layout's promises: torch-free modules stay torch-free, modules stay short."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "nxtrec"
TORCH_FREE = [
    "nxtrec",
    "nxtrec.model.image",
    "nxtrec.model.tokenizer",
    "nxtrec.model.config",
    "nxtrec.inference.ranking",
    "nxtrec.onnx.runtime",
    "nxtrec.cli.main",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False", f"importing {module} imported torch"


def test_no_module_is_longer_than_600_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long
