"""The dataset registry and shard lengths.

Registry (TOML, or YAML with the same structure):

    root = "/data"                  # optional; default: the registry file's folder
    [datasets.coco_valid]
    shards = "coco/coco_valid"      # a folder (its *.tar), a file, a glob or a brace
    split = "val2017"               # pattern such as "cc3m/{000000..000331}.tar";
    weight = 1.0                    # or a list of those

Lengths come from the `manifest.json` written by `nxtrec pack` / `nxtrec labels add`, or
are counted once (tar headers only) and cached in `.nxtrec-count.json` beside the shards."""

from __future__ import annotations

import glob
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import braceexpand

from nxtrec.data.shards import (
    list_tars,
    member_ext,
    read_manifest,
    read_member,
    tar_samples,
    write_json_atomic,
)
from nxtrec.errors import NxtrecError

COUNT_CACHE = ".nxtrec-count.json"
REGISTRY_ENV = "NXTREC_REGISTRY"
DEFAULT_REGISTRY = "datasets.toml"


@dataclass
class DatasetSpec:
    name: str
    shards: list[str]  # files, folders, globs or brace patterns, absolute
    split: str = ""
    weight: float = 1.0


@dataclass
class Registry:
    path: Path
    datasets: dict[str, DatasetSpec]

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Registry":
        path = Path(path)
        try:
            raw = _parse_config(path)
        except FileNotFoundError:
            raise NxtrecError(f"{path}: no such registry file") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), dict):
            raise NxtrecError(f"{path}: a registry needs a [datasets.NAME] table per dataset")
        unknown = set(raw) - {"root", "datasets"}
        if unknown:
            raise NxtrecError(f"{path}: unknown top-level keys {sorted(unknown)} (allowed: root, datasets)")
        root = path.parent.resolve() / os.path.expanduser(str(raw.get("root", ".")))
        return cls(path, {name: _dataset_spec(path, root, name, entry) for name, entry in raw["datasets"].items()})

    def get(self, name: str) -> DatasetSpec:
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise NxtrecError(f"{self.path}: no dataset {name!r} (known: {known})")
        return self.datasets[name]


def _parse_config(path: Path):
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml  # a webdataset dependency

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise NxtrecError(f"{path}: not valid YAML ({e})".replace("\n", " ")) from None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise NxtrecError(f"{path}: reading TOML needs Python 3.11+ or `pip install tomli`; or use YAML") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise NxtrecError(f"{path}: not valid TOML ({e})") from None


def _dataset_spec(path: Path, root: Path, name: str, entry) -> DatasetSpec:
    where = f"{path}: dataset {name!r}"
    if not isinstance(entry, dict):
        raise NxtrecError(f"{where}: expected a table with shards, split, weight")
    unknown = set(entry) - {"shards", "split", "weight"}
    if unknown:
        raise NxtrecError(f"{where}: unknown keys {sorted(unknown)} (allowed: shards, split, weight)")
    shards = entry.get("shards")
    shards = [shards] if isinstance(shards, str) else shards
    if not shards or not all(isinstance(s, str) for s in shards):
        raise NxtrecError(f"{where}: 'shards' must be a path or pattern, or a list of them")
    weight = entry.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight <= 0:
        raise NxtrecError(f"{where}: 'weight' must be a positive number, not {weight!r}")
    return DatasetSpec(name, [str(root / s) for s in shards], str(entry.get("split", "")), float(weight))


def default_registry_path() -> Path:
    return Path(os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def _looks_like_shards(spec: str) -> bool:
    return os.path.exists(spec) or any(c in spec for c in "{*?[")


def resolve_dataset(name: str, registry: Union[None, str, Path, Registry] = None) -> DatasetSpec:
    """A registry entry by name, or, for a shard folder / file / pattern, an ad-hoc one."""
    if isinstance(registry, Registry):
        return registry.get(name)
    path = Path(registry) if registry else default_registry_path()
    if path.is_file():
        reg = Registry.load(path)
        if name in reg.datasets or not _looks_like_shards(name):
            return reg.get(name)
    elif registry:
        raise NxtrecError(f"{path}: no such registry file")
    if _looks_like_shards(name):
        return DatasetSpec(name, [os.path.abspath(name)])
    raise NxtrecError(
        f"{name!r} is not a shard folder or pattern, and there is no registry to look it up in "
        f"(pass --registry FILE or set {REGISTRY_ENV}; default ./{DEFAULT_REGISTRY})"
    )


def expand_shards(patterns: Sequence[str]) -> list[str]:
    """Shard paths, in order, from folders (their *.tar, sorted), brace patterns, globs and
    files; a pattern matching nothing is an error."""
    paths: list[str] = []
    for pattern in patterns:
        for item in braceexpand.braceexpand(pattern):
            if os.path.isdir(item):
                found = [str(p) for p in list_tars(Path(item))]
            elif any(c in item for c in "*?["):
                found = sorted(glob.glob(item))
            else:
                found = [item] if os.path.isfile(item) else []
            if not found:
                raise NxtrecError(f"{item}: no shards found")
            paths += found
    return list(dict.fromkeys(paths))


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int
    labelled: int  # samples whose json has a "labels" field
    damage: str = ""  # what is wrong with the file ("" when it reads to its end)
    lost: Optional[int] = None  # a damaged shard's samples that cannot be read, when its manifest says how many


def count_shard(path: Union[str, Path]) -> tuple[int, int, str]:
    """(samples, samples whose json has "labels", what is damaged or ""), from the tar headers
    and json members. A damaged shard's complete samples are counted (the loader reads them)."""
    samples = labelled = 0
    damage: list[str] = []
    for _, members, tf in tar_samples(Path(path), damage):
        samples += 1
        meta = next((m for m in members if member_ext(m) == "json"), None)
        if meta is not None:
            try:
                labelled += "labels" in json.loads(read_member(tf, meta))
            except (ValueError, TypeError):
                pass
    return samples, labelled, "; ".join(damage)


def shard_lengths(paths: Sequence[str]) -> list[Shard]:
    """Sample counts from each folder's manifest when it matches the file on disk, else
    counted once and cached in that folder's .nxtrec-count.json (keyed by size and mtime)."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        by_dir.setdefault(os.path.dirname(os.path.abspath(p)), []).append(p)
    known: dict[str, Shard] = {}
    for folder, members in by_dir.items():
        manifest = read_manifest(Path(folder)) or {"shards": {}}
        cache_path = Path(folder) / COUNT_CACHE
        cache = _read_count_cache(cache_path)
        changed = False
        for p in members:
            name, stat = os.path.basename(p), os.stat(p)
            entry = manifest["shards"].get(name)
            if entry is not None and entry.get("bytes") == stat.st_size:
                known[p] = Shard(p, entry["samples"], entry["samples"] if entry.get("labels") else 0)
                continue
            if entry is not None:
                warnings.warn(f"{p}: changed since {folder}/manifest.json was written; counting it", stacklevel=2)
            cached = cache.get(name)
            if not cached or cached["bytes"] != stat.st_size or cached["mtime_ns"] != stat.st_mtime_ns:
                samples, labelled, damage = count_shard(p)
                cache[name] = cached = {
                    "samples": samples, "labelled": labelled, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                    "damage": damage,
                }  # fmt: skip
                changed = True
            lost = None
            if cached.get("damage"):  # said every time, not only when first counted
                # The manifest knows how many samples the shard held when it was written.
                lost = max(0, int(entry["samples"]) - cached["samples"]) if entry is not None else None
                warnings.warn(f"{p}: damaged shard ({cached['damage']}); its {cached['samples']} readable samples "
                              "are used" + (f", {lost} lost" if lost is not None else ""), stacklevel=2)
            known[p] = Shard(p, cached["samples"], cached["labelled"], cached.get("damage", ""), lost)
        if changed:
            try:
                write_json_atomic(cache_path, {"shards": cache})
            except OSError:
                pass  # a read-only dataset folder: count again next time
    return [known[p] for p in paths]


def _read_count_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def dataset_shards(names: Union[str, Sequence[str]], registry=None) -> list[tuple[DatasetSpec, list[Shard]]]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise NxtrecError("no dataset given")
    out = []
    for name in names:
        spec = resolve_dataset(name, registry)
        out.append((spec, shard_lengths(expand_shards(spec.shards))))
    return out
