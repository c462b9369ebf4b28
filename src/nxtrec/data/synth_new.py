"""Emoji categories the bundled model never saw (it knows the 127 of nxtrec.data.synth), for
teaching new labels (`nxtrec synth --new-categories`, `nxtrec teach`, benchmarks/bench_teach.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from nxtrec.data.synth import CATEGORIES, Category, render_scene
from nxtrec.errors import NxtrecError

NEW_CATEGORIES: tuple[Category, ...] = (
    Category("octopus", "\U0001F419", "octopuses"),
    Category("robot", "\U0001F916", "robots"),
    Category("violin", "\U0001F3BB", "violins"),
    Category("kangaroo", "\U0001F998", "kangaroos"),
    Category("avocado", "\U0001F951", "avocados"),
    Category("flamingo", "\U0001F9A9", "flamingos"),
    Category("hedgehog", "\U0001F994", "hedgehogs"),
    Category("skateboard", "\U0001F6F9", "skateboards"),
    Category("microscope", "\U0001F52C", "microscopes"),
    Category("magnet", "\U0001F9F2", "magnets"),
)
assert not {c.name for c in NEW_CATEGORIES} & {c.name for c in CATEGORIES}


def new_categories(spec: str) -> list[Category]:
    """`spec`: a count (the first N new categories) or comma-separated names."""
    if spec.strip().isdigit():
        n = int(spec)
        if not 1 <= n <= len(NEW_CATEGORIES):
            raise NxtrecError(f"--new-categories {spec}: give 1 to {len(NEW_CATEGORIES)} or names")
        return list(NEW_CATEGORIES[:n])
    known = {c.name: c for c in NEW_CATEGORIES}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise NxtrecError(f"--new-categories: unknown {unknown[0] if unknown else spec!r}; "
                          f"the new categories are {', '.join(known)}")
    return [known[n] for n in names]


def render_new(out: str | Path, categories: list[Category], per_label: int, seed: int = 0,
               size: int = 256) -> Path:
    """`per_label` scenes for each category, each drawing it among 0-3 known objects: JPEGs
    in one folder per label (the folder layout `nxtrec teach --examples` reads), and
    `scenes.jsonl` listing every scene's objects (`{"image", "labels": [new], "objects"}`).
    The same seed gives the same scenes; another seed gives other scenes of the same labels."""
    out = Path(out)
    rows = []
    for cat in categories:
        folder = out / cat.name
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"nxtrec-synth-new/{seed}/{cat.name}")
        for i in range(per_label):
            img, _, objects = render_scene(rng, size, include=cat)
            path = folder / f"{i:05d}.jpg"
            tmp = path.with_suffix(".tmp.jpg")
            img.save(tmp, quality=92)
            tmp.replace(path)
            rows.append({"image": f"{cat.name}/{path.name}", "labels": [cat.name],
                         "objects": sorted({o.name for o in objects})})
    listing = out / "scenes.jsonl"
    tmp = listing.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(listing)
    return listing
