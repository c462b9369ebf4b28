"""PEP 517 build backend of nxtrec-runtime: setuptools, run on a staged copy of the sources.

The package lives in ../src/nxtrec, outside this project folder, where setuptools cannot take
it from (and would write its egg-info into the shared source folder). So each hook copies
this folder's files and ../src/nxtrec (without `assets/`: the bundled default model is a
PyTorch model directory) into a temporary folder and runs setuptools' own hook there. From an
sdist, whose `src/nxtrec` is already beside this file, setuptools runs in place."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from setuptools import build_meta as _setuptools

HERE = Path(__file__).resolve().parent
SOURCES = HERE.parent / "src" / "nxtrec"
PROJECT_FILES = ("pyproject.toml", "README.md", "MANIFEST.in", "build_runtime.py")
LEFT_OUT = {"assets"}  # top-level folders of the package not shipped


def _ignore(folder: str, names: list[str]) -> set[str]:
    skipped = {n for n in names if n == "__pycache__" or n.endswith((".pyc", ".pyo"))}
    if Path(folder) == SOURCES:
        skipped |= LEFT_OUT & set(names)
    return skipped


@contextlib.contextmanager
def _staged():
    if (HERE / "src" / "nxtrec").is_dir():  # an sdist
        yield
        return
    with tempfile.TemporaryDirectory(prefix="nxtrec-runtime-build-") as tmp:
        stage = Path(tmp)
        for name in PROJECT_FILES:
            shutil.copy2(HERE / name, stage / name)
        shutil.copytree(SOURCES, stage / "src" / "nxtrec", ignore=_ignore)
        cwd = os.getcwd()
        os.chdir(stage)
        try:
            yield
        finally:
            os.chdir(cwd)


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def get_requires_for_build_wheel(config_settings=None):
    with _staged():
        return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_sdist(config_settings=None):
    with _staged():
        return _setuptools.get_requires_for_build_sdist(config_settings)


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    metadata_directory = _absolute(metadata_directory)
    with _staged():
        return _setuptools.prepare_metadata_for_build_wheel(metadata_directory, config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    wheel_directory, metadata_directory = _absolute(wheel_directory), _absolute(metadata_directory)
    with _staged():
        return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_sdist(sdist_directory, config_settings=None):
    sdist_directory = _absolute(sdist_directory)
    with _staged():
        return _setuptools.build_sdist(sdist_directory, config_settings)
