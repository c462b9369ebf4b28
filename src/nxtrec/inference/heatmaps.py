"""Pictures of attention maps with PIL + numpy (torch-free).

- `attention_grid`: the reference's drawing of a [P, P] image-token attention block: a grid
  of P small maps (one per query image token, laid out like the patches), each min-max
  normalised on its own and coloured white-to-blue.
- `overlay`: a label's map over the patch grid, upsampled to the image the model saw (the
  centre square) and blended over it as a heat map; `save_label_maps` writes them per label
  with the raw grids (`nxtrec predict --maps`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

# Colour ramps as evenly spaced anchors, interpolated linearly. BLUES is ColorBrewer's 9-class
# "Blues" (matplotlib's "Blues", which the reference's figures use); HEAT runs black-free
# from blue through green and yellow to red, so the blended photo stays visible.
BLUES = ("#f7fbff", "#deebf7", "#c6dbef", "#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
HEAT = ("#2c7bb6", "#00a6ca", "#00ccbc", "#90eb9d", "#ffff8c", "#f9d057", "#f29e2e", "#e76818", "#d7191c")


def colourise(values: np.ndarray, ramp=BLUES) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB, same shape plus a channel axis."""
    anchors = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in ramp], dtype=np.float64)
    pos = np.clip(np.nan_to_num(values), 0.0, 1.0) * (len(ramp) - 1)
    lo = np.minimum(pos.astype(int), len(ramp) - 2)
    t = (pos - lo)[..., None]
    return np.round(anchors[lo] * (1 - t) + anchors[lo + 1] * t).astype(np.uint8)


def min_max(m: np.ndarray) -> np.ndarray:
    """(m - min) / (max - min + 1e-6), the reference's per-map normalisation."""
    return (m - m.min()) / (m.max() - m.min() + 1e-6)


def attention_grid(block: np.ndarray, grid: tuple[int, int], cell: int | None = None, gap: int | None = None) -> Image.Image:
    """Draw a [P, P] block: query token i's map over the key tokens goes to row i // cols,
    column i % cols of a rows x cols grid; each map is drawn `cell` pixels per patch, with
    `gap` white pixels between maps (default a quarter of a map, as in the reference's figures)."""
    rows, cols = grid
    p = rows * cols
    if block.shape != (p, p):
        raise ValueError(f"attention block of shape {block.shape} does not fit a {rows}x{cols} grid")
    cell = cell or max(2, 64 // cols)
    h, w = rows * cell, cols * cell
    gap = max(2, w // 4) if gap is None else gap
    canvas = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i in range(p):
        small = colourise(min_max(block[i].reshape(rows, cols).astype(np.float64)))
        big = small.repeat(cell, axis=0).repeat(cell, axis=1)
        top, left = (i // cols) * (h + gap), (i % cols) * (w + gap)
        canvas[top : top + h, left : left + w] = big
    return Image.fromarray(canvas)


def model_view(image: Image.Image, size: int) -> Image.Image:
    """The centre square of `image` (the part the model's centre crop keeps), `size` px."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def overlay(image: Image.Image, grid_map: np.ndarray, size: int = 336, alpha: float = 0.65) -> Image.Image:
    """The min-max normalised map, upsampled bilinearly, as a heat colour over a greyed copy of
    the model's view of `image`; the colour's opacity grows with the value, up to `alpha`."""
    heat = Image.fromarray(min_max(grid_map.astype(np.float64)).astype(np.float32), mode="F")
    heat = np.clip(np.asarray(heat.resize((size, size), Image.BILINEAR), dtype=np.float64), 0.0, 1.0)
    view = model_view(image, size)
    base = np.asarray(Image.blend(view, view.convert("L").convert("RGB"), 0.6), dtype=np.float64)
    weight = (alpha * (0.3 + 0.7 * heat))[..., None]
    return Image.fromarray(np.round(base * (1 - weight) + colourise(heat, HEAT) * weight).astype(np.uint8))


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")[:60] or "label"


def save_label_maps(folder: str | Path, image_name: str, image: Image.Image, labels) -> Path:
    """Write one overlay PNG per label (`NN_LABEL.png`, in rank order) and `maps.json` (every
    label's probability and raw grid) into `folder`. `labels`: `Label`s with maps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for rank, lab in enumerate(labels, 1):
        overlay(image, lab.map).save(folder / f"{rank:02d}_{_file_label(lab.label)}.png")
        records.append({"label": lab.label, "prob": lab.prob, "map": np.round(lab.map.astype(np.float64), 6).tolist()})
    grid = list(labels[0].map.shape) if labels else None
    (folder / "maps.json").write_text(json.dumps({"image": image_name, "grid": grid, "labels": records}))
    return folder
