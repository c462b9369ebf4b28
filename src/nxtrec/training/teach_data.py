"""The examples `nxtrec teach` learns from: read from a JSONL file or a folder of folders,
digested, split into training and held-out examples, and completed with what the model
already says about them (self-distillation) and with replay scenes (docs/teach.md)."""

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


def read_examples(source: str | Path) -> list[Example]:
    """`source`: a JSONL file of `{"image": PATH, "labels": [...]}` (paths relative to the
    file), or a folder with one sub-folder per label holding that label's images."""
    source = Path(source)
    if source.is_dir():
        examples = [Example(image, (_label_of(sub.name),))
                    for sub in sorted(p for p in source.iterdir() if p.is_dir()) for image in list_images([sub])]
    elif source.is_file():
        examples = [_jsonl_example(source, n, line) for n, line in enumerate(source.read_text().splitlines(), 1)
                    if line.strip()]  # fmt: skip
    else:
        raise ExamplesError(f"{source}: no such file or folder (give a JSONL file or a folder of label folders)")
    if not examples:
        raise ExamplesError(f"{source}: no examples found (a JSONL of {{image, labels}} or one folder per label)")
    return examples


def _label_of(folder_name: str) -> str:
    return " ".join(folder_name.replace("_", " ").split()).lower()


def _jsonl_example(path: Path, n: int, line: str) -> Example:
    try:
        row = json.loads(line)
        image, labels = row["image"], row["labels"]
    except (ValueError, KeyError, TypeError):
        raise ExamplesError(f"{path}:{n}: expected a JSON object with \"image\" and \"labels\"") from None
    if isinstance(labels, str):
        labels = [labels]
    labels = tuple(" ".join(str(x).split()).lower() for x in labels if str(x).strip())
    if not labels:
        raise ExamplesError(f"{path}:{n}: no labels")
    return Example(str(path.parent / image), labels)


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
