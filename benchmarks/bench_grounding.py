"""Pointing game and discriminative score for the per-label grounding maps, on held-out
synthetic scenes.

For every held-out scene (`nxtrec synth` keeps each object's box in the sample metadata) the
model predicts its top-k labels with maps. A predicted label is correct when it names an
object of the scene (category name, plural or synonym).
- Pointing game: for each correct label, a hit is a map whose maximum patch has its centre
  inside a box of that object.
- Discriminative score: over scenes with at least two correct labels of different
  categories, a hit is a map whose maximum patch lies inside a box of the label's object and
  outside every box of the objects that the scene's other correct labels name (a map that
  ignores its label cannot do well on both labels of one scene).
Baselines: the image centre; a uniform random patch (the expected hit rate, computed exactly
over the patches); for the discriminative score also "the other label's map": the map of
another correct label of the same scene (averaged over them), scored as if it were this
label's, which scores as well as the label's own map when the maps ignore their labels.
One row per map combination rule (`nxtrec.inference.attention.MAP_RULES`).

    python benchmarks/bench_grounding.py --scenes 1000            # bundled model, seed-0 scenes
    python benchmarks/bench_grounding.py --data data/synth/val --model runs/demo-stage2/final
"""

from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nxtrec.data.shards import list_tars, member_ext, read_member, tar_samples
from nxtrec.data.synth import CATEGORIES, generate
from nxtrec.inference.attention import (
    DEFAULT_MAP_RULE,
    MAP_RULES,
    attach_maps,
    recorded_one_shot,
)
from nxtrec.inference.heatmaps import label_sheet
from nxtrec.inference.ranking import rank_labels
from nxtrec.inference.recognizer import Recognizer


def category_names() -> dict[str, str]:
    """Every word that names a category (name, plural, synonyms and their plurals) -> name."""
    names = {}
    for c in CATEGORIES:
        for word in (c.name, c.plural, *c.synonyms, *(s + "s" for s in c.synonyms)):
            names.setdefault(word, c.name)
    return names


def held_out_scenes(folder: Path, limit: int) -> list[tuple[Image.Image, list[dict]]]:
    """(image, boxes) of the first `limit` samples of the shards in `folder`."""
    scenes = []
    for tar in list_tars(folder):
        for _, members, tf in tar_samples(tar):
            parts = {member_ext(m): m for m in members}
            meta = json.loads(read_member(tf, parts["json"]))
            image = Image.open(io.BytesIO(read_member(tf, parts["jpg"]))).convert("RGB")
            scenes.append((image, meta["boxes"]))
            if len(scenes) == limit:
                return scenes
    return scenes


def patch_centres(grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """[rows, cols, 2] (x, y) centres of the patches in image pixels (square scenes: the
    model's centre crop is the whole image)."""
    rows, cols = grid
    ys = (np.arange(rows) + 0.5) * size[1] / rows
    xs = (np.arange(cols) + 0.5) * size[0] / cols
    return np.stack(np.meshgrid(xs, ys), axis=-1)


def inside(points: np.ndarray, boxes: list[list[int]]) -> np.ndarray:
    """Whether each (x, y) point lies inside any of the boxes."""
    hit = np.zeros(points.shape[:-1], dtype=bool)
    for x0, y0, x1, y1 in boxes:
        hit |= (points[..., 0] >= x0) & (points[..., 0] < x1) & (points[..., 1] >= y0) & (points[..., 1] < y1)
    return hit


def peak_point(grid_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[1, 2]: the centre of the map's maximum patch, in image pixels."""
    return patch_centres(grid_map.shape, size)[np.unravel_index(np.argmax(grid_map), grid_map.shape)][None]


def separates(points: np.ndarray, own: list[list[int]], others: list[list[int]]) -> np.ndarray:
    """Whether each point lies inside one of `own` and outside all of `others`."""
    return inside(points, own) & ~inside(points, others)


@dataclass
class Tally:
    """Counts for one combination rule: the pointing game over every correct label, the
    discriminative score over the correct labels of scenes with two or more named objects."""

    correct: int = 0
    hits: int = 0
    centre: int = 0
    random_patch: float = 0.0
    contested: int = 0
    separated: int = 0
    centre_separated: int = 0
    random_separated: float = 0.0
    other_map_separated: float = 0.0

    def add(self, grid_map: np.ndarray, size: tuple[int, int], own: list[list[int]]) -> None:
        self.correct += 1
        points = patch_centres(grid_map.shape, size)
        self.hits += bool(inside(peak_point(grid_map, size), own)[0])
        self.centre += bool(inside(np.array([[size[0] / 2, size[1] / 2]]), own)[0])
        self.random_patch += float(inside(points, own).mean())

    def add_contested(self, grid_map, size, own, others: list[list[int]], other_maps: list[np.ndarray]) -> None:
        self.contested += 1
        self.separated += bool(separates(peak_point(grid_map, size), own, others)[0])
        self.centre_separated += bool(separates(np.array([[size[0] / 2, size[1] / 2]]), own, others)[0])
        self.random_separated += float(separates(patch_centres(grid_map.shape, size), own, others).mean())
        self.other_map_separated += float(np.mean([separates(peak_point(m, size), own, others)[0] for m in other_maps]))


def score_image(tally: Tally, labels, size: tuple[int, int], boxes: list[dict], names: dict[str, str]) -> None:
    """Add one image's labels (with maps) to `tally`. The objects a label's map must avoid are
    those the image's other correct labels name (objects no label names are left out)."""
    named = [(lab, names[lab.label]) for lab in labels if names.get(lab.label) in {b["object"] for b in boxes}]
    categories = {cat for _, cat in named}
    for lab, cat in named:
        own = [b["box"] for b in boxes if b["object"] == cat]
        tally.add(lab.map, size, own)
        if len(categories) >= 2:
            others = [b["box"] for b in boxes if b["object"] != cat and b["object"] in categories]
            tally.add_contested(lab.map, size, own, others, [m.map for m, c in named if c != cat])


def pointing_game(rec: Recognizer, scenes, k: int, rules: list[str], batch_size: int) -> tuple[dict, int, float]:
    """One one-shot pass per batch; every rule's maps come from the same recorded pass."""
    names = category_names()
    tallies = {rule: Tally() for rule in rules}
    predicted = 0
    start = time.perf_counter()
    for i in range(0, len(scenes), batch_size):
        batch = scenes[i : i + batch_size]
        with torch.inference_mode():
            image_tokens = rec.model.encode_images(rec.pixels([img for img, _ in batch]).to(rec.device, rec.dtype))
        delimiter = rec.tokenizer.delimiter_id
        branches, recorder = recorded_one_shot(rec.model, image_tokens, rec.prompt_ids, k, delimiter, rules=rules)
        for rule in rules:
            attach_maps(rec.model, branches, recorder, k, rule, delimiter)
            for (image, boxes), image_branches in zip(batch, branches):
                labels = rank_labels(image_branches, rec.tokenizer.decode, "prob", k)
                predicted += len(labels) if rule == rules[0] else 0
                score_image(tallies[rule], labels, image.size, boxes, names)
    return tallies, predicted, time.perf_counter() - start


def figure(rec: Recognizer, scenes, rule: str, out: Path, panel: int = 240) -> None:
    """The first held-out scene whose top 3 labels name two different objects of the scene,
    each label's map pointing at its own object and not at the other's (as the discriminative
    score counts a hit): the scene and those two labels' overlays side by side (a small palette
    PNG for the README)."""
    names = category_names()
    for image, boxes in scenes:
        labels = rec.predict([image], top_k=3, maps=True, map_rule=rule)[0]
        chosen = [lab for lab in labels if names.get(lab.label) in {b["object"] for b in boxes}]
        tally = Tally()
        score_image(tally, chosen, image.size, boxes, names)
        if tally.contested >= 2 and tally.separated == tally.contested:
            break
    else:
        raise SystemExit("no held-out scene whose top 3 labels are two objects with separate maps")
    out.parent.mkdir(parents=True, exist_ok=True)
    label_sheet(image, chosen[:2], panel).quantize(colors=192).save(out, optimize=True)
    print(f"figure: {out} ({out.stat().st_size // 1024} KB): {', '.join(f'{lab.label} ({lab.prob:.2f})' for lab in chosen[:2])}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the bundled demo model)")
    ap.add_argument("--data", help="held-out shards of `nxtrec synth` (default: render --scenes of seed 0)")
    ap.add_argument("--scenes", type=int, default=1000)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--rules", nargs="+", default=list(MAP_RULES), choices=MAP_RULES)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--figure", type=Path, help="also draw a README picture (PNG) with the default rule")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.data) if args.data else Path(tmp) / "val"
        if not args.data:
            generate(tmp, n=0, seed=0, n_val=args.scenes, size=256, progress=False)
        scenes = held_out_scenes(folder, args.scenes)
    rec = Recognizer.from_pretrained(args.model)
    if args.figure:
        figure(rec, scenes, DEFAULT_MAP_RULE, args.figure)
    tallies, predicted, seconds = pointing_game(rec, scenes, args.top_k, args.rules, args.batch_size)
    print(f"{len(scenes)} held-out scenes, top-{args.top_k} labels: {predicted} predicted, "
          f"{tallies[args.rules[0]].correct} correct ({seconds:.0f} s)")
    t0 = tallies[args.rules[0]]
    print(f"discriminative score: {t0.contested} correct labels in scenes with two or more named objects")
    print("| rule | pointing game | discriminative score | other label's map |")
    print("|---|---|---|---|")
    for rule, t in tallies.items():
        n, c = max(t.correct, 1), max(t.contested, 1)
        print(f"| `{rule}` | {t.hits / n:.3f} | {t.separated / c:.3f} | {t.other_map_separated / c:.3f} |")
    n, c = max(t0.correct, 1), max(t0.contested, 1)
    print(f"| image centre | {t0.centre / n:.3f} | {t0.centre_separated / c:.3f} | |")
    print(f"| random patch | {t0.random_patch / n:.3f} | {t0.random_separated / c:.3f} | |")

if __name__ == "__main__":
    main()
