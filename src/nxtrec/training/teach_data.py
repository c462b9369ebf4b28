"""The examples `nxtrec teach` learns from: read from a JSONL file, a folder of label folders,
a Label Studio export or XMP sidecars, digested, split into training and held-out examples,
and completed with what the model already says about them (self-distillation) and with
replay scenes (docs/teach.md)."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from nxtrec.errors import NxtrecError
from nxtrec.model.image import list_images


class ExamplesError(NxtrecError):
    pass


@dataclass(frozen=True)
class Example:
    image: object  # a file path, or a PIL image (replay scenes)
    labels: tuple[str, ...]


SOURCES = ("auto", "jsonl", "folders", "labelstudio", "xmp")


def read_examples(source: str | Path, kind: str = "auto", image_root: str | Path | None = None,
                  xmp_name: str = "image") -> list[Example]:
    """The examples at `source`, read as `kind` ("auto": a folder is a folder of label
    folders, a `.json` file a Label Studio export, another file JSONL):
    - jsonl: `{"image": PATH, "labels": [...]}` per line, paths relative to the file;
    - folders: one sub-folder per label holding that label's images;
    - labelstudio: a Label Studio JSON export, each annotated task's choices (or taxonomy
      leaves) as its labels; images by their ids (`nxtrec export labelstudio` tasks) or
      local-file URLs, relative to `image_root` (default: the current folder);
    - xmp: the images in a folder (or the one image) whose XMP sidecars hold keywords that
      nxtrec did not write (`nxtrec import xmp`), those keywords as labels."""
    source = Path(source)
    if not source.exists():
        raise ExamplesError(f"{source}: no such file or folder (give a JSONL file, a folder of label folders, "
                            "a Label Studio export or a folder of images with XMP sidecars)")
    if kind == "auto":
        kind = "folders" if source.is_dir() else "labelstudio" if source.suffix.lower() == ".json" else "jsonl"
    if kind == "folders":
        if not source.is_dir():
            raise ExamplesError(f"{source}: not a folder (--examples-from folders reads one sub-folder per label)")
        examples = [Example(image, (_label_of(sub.name),))
                    for sub in sorted(p for p in source.iterdir() if p.is_dir()) for image in list_images([sub])]
    elif kind == "jsonl":
        examples = [_jsonl_example(source, n, line) for n, line in enumerate(_text(source).splitlines(), 1)
                    if line.strip()]  # fmt: skip
    elif kind == "labelstudio":
        examples = _labelstudio_examples(source, Path(image_root or "."))
    else:
        examples = _xmp_examples(source, xmp_name)
    if not examples:
        raise ExamplesError(f"{source}: no examples found (read as {kind}; see `nxtrec teach --help`)")
    return examples


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExamplesError(f"{path}: cannot read ({e})") from None


def _label_of(folder_name: str) -> str:
    return " ".join(folder_name.replace("_", " ").split()).lower()


def _clean(labels) -> tuple[str, ...]:
    """Lower-case, whitespace collapsed, empty ones and repeats dropped, order kept."""
    return tuple(dict.fromkeys(" ".join(str(x).split()).lower() for x in labels if str(x).strip()))


def _jsonl_example(path: Path, n: int, line: str) -> Example:
    try:
        row = json.loads(line)
        image, labels = row["image"], row["labels"]
    except (ValueError, KeyError, TypeError):
        raise ExamplesError(f"{path}:{n}: expected a JSON object with \"image\" and \"labels\"") from None
    labels = _clean([labels] if isinstance(labels, str) else labels)
    if not labels:
        raise ExamplesError(f"{path}:{n}: no labels")
    return Example(str(path.parent / image), labels)


def _labelstudio_examples(source: Path, image_root: Path) -> list[Example]:
    """Tasks without an annotation, or whose annotation chose nothing, teach nothing: left out."""
    from nxtrec.data.labelstudio import ground_truth, image_path, read_export

    rows, _ = ground_truth(read_export(source), str(source))
    return [Example(str(image_root / image_path(r["image"])), _clean(r["gt"])) for r in rows if _clean(r["gt"])]


def _xmp_examples(source: Path, naming: str) -> list[Example]:
    from nxtrec.data.xmp import ground_truth

    images = list_images([source])
    rows, _ = ground_truth([(image, image) for image in images], naming)
    return [Example(r["image"], _clean(r["gt"])) for r in rows if _clean(r["gt"])]


def taught_labels(examples: list[Example]) -> list[str]:
    return sorted({label for ex in examples for label in ex.labels})


def examples_digest(examples: list[Example]) -> str:
    """SHA-256 over each example's image bytes and labels, in order."""
    h = hashlib.sha256()
    for ex in examples:
        try:
            h.update(hashlib.sha256(Path(ex.image).read_bytes()).digest())
        except OSError as e:
            raise ExamplesError(f"{ex.image}: cannot read ({e.strerror})") from None
        h.update(json.dumps(ex.labels).encode())
    return h.hexdigest()


def split_examples(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of each label's examples (grouped by first label; at least one when
    a label has 3 or more, none below), the same for the same seed."""
    groups: dict[str, list[Example]] = {}
    for ex in examples:
        groups.setdefault(ex.labels[0], []).append(ex)
    train, held = [], []
    for label in sorted(groups):
        group = list(groups[label])
        random.Random(f"nxtrec-teach-split/{seed}/{label}").shuffle(group)
        n_held = max(1, round(fraction * len(group))) if fraction > 0 and len(group) >= 3 else 0
        held += group[:n_held]
        train += group[n_held:]
    return train, held


def distilled(examples: list[Example], predictions, min_prob: float, confusion_share: float = 0.3) -> list[Example]:
    """Each example with the model's own labels added (those with probability >= `min_prob`
    that it does not already have): what the model knew about the picture stays a target.
    A label the model gives to more than `confusion_share` of one taught label's examples is
    left out: that is most likely its old name for the new thing, not a thing beside it."""
    own = [[lab.label for lab in labels if lab.prob >= min_prob and lab.label not in ex.labels]
           for ex, labels in zip(examples, predictions)]  # fmt: skip
    counts: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    for ex, labels in zip(examples, own):
        sizes[ex.labels[0]] = sizes.get(ex.labels[0], 0) + 1
        for label in labels:
            group = counts.setdefault(ex.labels[0], {})
            group[label] = group.get(label, 0) + 1
    out = []
    for ex, labels in zip(examples, own):
        limit = max(1, confusion_share * sizes[ex.labels[0]])
        kept = [lab for lab in labels if counts[ex.labels[0]][lab] <= limit]
        out.append(Example(ex.image, ex.labels + tuple(kept)))
    return out


def replay_scenes(n: int, seed: int) -> list[Example]:
    """`n` synthetic scenes of the bundled model's own categories (nxtrec.data.synth), labelled
    with the objects drawn: what that model was trained on."""
    from nxtrec.data.synth import render_scene

    rng = random.Random(f"nxtrec-teach-replay/{seed}")
    out = []
    for _ in range(n):
        image, _, objects = render_scene(rng)
        out.append(Example(image, tuple(sorted({o.name for o in objects}))))
    return out
