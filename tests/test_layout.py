"""The package layout's promises: torch-free modules stay torch-free, imports run one way
between the stage packages with no circle, names are unique, modules and functions stay short."""

from __future__ import annotations

import ast
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
    "nxtrec.onnx.recognizer",
    "nxtrec.inference.engine",
    "nxtrec.inference.isa",
    "nxtrec.distributed",
    "nxtrec.digests",
    "nxtrec.cli.info",
    "nxtrec.cli.main",
    "nxtrec.integrations.ray",  # Ray and Spark workers may run the torch-free nxtrec-runtime
    "nxtrec.integrations.spark",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_module_does_not_import_torch(module):
    code = f"import sys, {module}; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False", f"importing {module} imported torch"


def test_no_module_is_longer_than_450_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


# ---------------------------------------------------------------------------------------
# the import graph: every import counts, lazy ones and those under TYPE_CHECKING included
# ---------------------------------------------------------------------------------------

# Stage packages by rank: imports go only to a lower rank. The root modules (errors, extras,
# distributed, digests) sit below every stage; `engines` names both engines, so it sits above
# both; `integrations` (Ray, Spark) uses tagging, and cli does not import it.
RANKS = {"model": 1, "data": 2, "inference": 2, "evaluation": 3, "onnx": 3, "engines": 4,
         "training": 5, "serving": 5, "tagging": 5, "cli": 6, "integrations": 6}  # fmt: skip
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for every import of `name`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, "") if sub in MODULES else (base, alias.name))
    return [(m, n) for m, n in out if m in MODULES and m != name]


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _rank(module: str) -> tuple[int, str]:
    parts = module.split(".")
    if module == "nxtrec.__main__":
        return RANKS["cli"], "cli"
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANKS):
        return RANKS[parts[1]], parts[1]
    return 0, "root"


def test_every_stage_package_has_a_rank():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages <= set(RANKS), packages - set(RANKS)


def test_imports_go_only_to_lower_stages():
    wrong = []
    for module, imports in GRAPH.items():
        if module == "nxtrec":  # the package's lazy public names (nxtrec/__init__.py)
            continue
        rank, package = _rank(module)
        for target, _ in imports:
            target_rank, target_package = _rank(target)
            if target_package != package and target_rank >= rank:
                wrong.append(f"{module} -> {target}")
    assert not wrong, wrong


def test_no_import_circle():
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
                on_stack.discard(w)
            on_stack.discard(v)
            if component:
                circles.append(sorted([v, *component]))

    for module in GRAPH:
        if module not in index:
            visit(module)
    assert not circles, circles


def test_no_private_name_is_imported_from_another_module():
    private = [f"{m} imports {t}.{n}" for m, imports in GRAPH.items() for t, n in imports if n.startswith("_")]
    assert not private, private


def test_public_class_names_are_unique():
    seen: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                seen.setdefault(node.name, []).append(module)
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_no_function_is_longer_than_60_lines():
    long = [f"{MODULES[m].relative_to(SRC)}:{node.name} ({node.end_lineno - node.lineno + 1})"
            for m in MODULES for node in ast.walk(ast.parse(MODULES[m].read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long, long
