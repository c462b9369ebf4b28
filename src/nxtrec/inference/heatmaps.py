"""Pictures of attention maps with PIL + numpy (torch-free).

- `attention_grid`: the reference's drawing of a [P, P] image-token attention block: a grid
  of P small maps (one per query image token, laid out like the patches), each min-max
  normalised on its own and coloured white-to-blue; `titled` writes which layer and head it is
  above it, and `patch_attention` draws one patch's row over the image itself.
- `overlay`: a label's map over the patch grid, upsampled to the image the model saw (the
  centre square), drawn over it at full brightness as a heat layer with a contour, a colour
  scale and a title (label and probability); `label_sheet` puts an image's overlays side by
  side; `save_label_maps` writes both with the raw grids (`nxtrec predict --maps`).
  The serve page draws its hover maps the same way (serving/static/app.js).
PIL, not matplotlib: PIL is a core dependency, so the default install draws the same pictures.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

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


def font(size: int = 14) -> ImageFont.ImageFont:
    """PIL's bundled font (no font file needed) at `size` px."""
    return ImageFont.load_default(size=size)


def heat(grid_map: np.ndarray, size: int) -> np.ndarray:
    """The min-max normalised map upsampled bilinearly to `size` x `size`, values in [0, 1]."""
    small = Image.fromarray(min_max(grid_map.astype(np.float64)).astype(np.float32), mode="F")
    return np.clip(np.asarray(small.resize((size, size), Image.BILINEAR), dtype=np.float64), 0.0, 1.0)


def contour(values: np.ndarray, level: float) -> np.ndarray:
    """Pixels on the border of the region where `values` >= `level`, two pixels wide."""
    region = Image.fromarray(((values >= level) * 255).astype(np.uint8))
    inner = np.asarray(region.filter(ImageFilter.MinFilter(5))) > 0
    return (values >= level) & ~inner


def write_on(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, size: int = 14) -> None:
    """White text on a dark box, readable over any picture."""
    f = font(size)
    left, top, right, bottom = draw.textbbox(xy, text, font=f)
    draw.rectangle((left - 4, top - 3, right + 4, bottom + 3), fill=(0, 0, 0))
    draw.text(xy, text, fill="white", font=f)


SCALE_WIDTH = 60  # px right of each overlay for its colour scale


def colour_scale(height: int, low: float, high: float, width: int = SCALE_WIDTH) -> Image.Image:
    """A vertical bar of the heat ramp (bottom: the map's smallest value, top: its largest),
    with both values written as a share of the whole map."""
    bar = Image.new("RGB", (width, height), "white")
    ramp = colourise(np.linspace(1.0, 0.0, height - 40)[:, None].repeat(14, axis=1), HEAT)
    bar.paste(Image.fromarray(ramp), (4, 20))
    draw, f = ImageDraw.Draw(bar), font(11)
    draw.text((20, 16), f"{high:.1%}", fill="black", font=f)
    draw.text((20, height - 32), f"{low:.1%}", fill="black", font=f)
    draw.text((2, 2), "of map", fill="black", font=f)
    return bar


def overlay(image: Image.Image, grid_map: np.ndarray, size: int = 336, title: str | None = None,
            alpha: float = 0.7) -> Image.Image:  # fmt: skip
    """The model's view of `image` at full brightness, the map over it as a heat layer (colour
    and opacity grow with the value, so low values leave the picture as it is) with a contour
    at half the peak, `title` written on it (e.g. the label and its probability), and the
    colour scale on the right."""
    values = heat(grid_map, size)
    base = np.asarray(model_view(image, size), dtype=np.float64)
    weight = (alpha * values**1.5)[..., None]
    out = np.round(base * (1 - weight) + colourise(values, HEAT) * weight).astype(np.uint8)
    line = contour(values, 0.5)
    out[line] = (255, 255, 255)
    out[line & ~contour(values, 0.5 - 0.04)] = (0, 0, 0)
    panel = Image.new("RGB", (size + SCALE_WIDTH, size), "white")
    panel.paste(Image.fromarray(out), (0, 0))
    panel.paste(colour_scale(size, float(grid_map.min()), float(grid_map.max())), (size, 0))
    if title:
        write_on(ImageDraw.Draw(panel), (8, 6), title, size=max(12, size // 20))
    return panel


def label_sheet(image: Image.Image, labels, size: int = 256, per_row: int = 4) -> Image.Image:
    """One picture per image: the model's view, then every label's overlay (rank order), titled
    with the label and its probability, `per_row` pictures to a row."""
    panels = [model_view(image, size)]
    write_on(ImageDraw.Draw(panels[0]), (8, 6), "image (centre crop)", size=max(12, size // 20))
    panels += [overlay(image, lab.map, size, f"{rank}. {lab.label}  {lab.prob:.3f}") for rank, lab in enumerate(labels, 1)]
    gap = 8
    rows = [panels[i : i + per_row] for i in range(0, len(panels), per_row)]
    width = max(sum(p.width + gap for p in row) - gap for row in rows)
    sheet = Image.new("RGB", (width, len(rows) * (size + gap) - gap), "white")
    for r, row in enumerate(rows):
        x = 0
        for p in row:
            sheet.paste(p, (x, r * (size + gap)))
            x += p.width + gap
    return sheet


def titled(picture: Image.Image, text: str, size: int = 14) -> Image.Image:
    """`picture` under a white band with `text` (e.g. which layer and head it shows)."""
    band = size + 12
    out = Image.new("RGB", (max(picture.width, 8 * len(text)), picture.height + band), "white")
    out.paste(picture, (0, band))
    ImageDraw.Draw(out).text((4, 5), text, fill="black", font=font(size))
    return out


def patch_attention(image: Image.Image, row: np.ndarray, grid: tuple[int, int], patch: tuple[int, int],
                    title: str, size: int = 336) -> Image.Image:  # fmt: skip
    """One image patch's attention over the image patches (`row`, [P]) drawn over the image
    like a label's map, with that patch outlined."""
    rows, cols = grid
    picture = overlay(image, row.reshape(rows, cols), size, title)
    r, c = patch
    box = (c * size / cols, r * size / rows, (c + 1) * size / cols, (r + 1) * size / rows)
    draw = ImageDraw.Draw(picture)
    draw.rectangle(box, outline="black", width=4)
    draw.rectangle(box, outline="white", width=2)
    return picture


def _file_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", label).strip("_")[:60] or "label"


def save_label_maps(folder: str | Path, image_name: str, image: Image.Image, labels) -> Path:
    """Write one overlay PNG per label (`NN_LABEL.png`, in rank order), `sheet.png` (all of
    them side by side) and `maps.json` (every label's probability and raw grid) into `folder`.
    `labels`: `Label`s with maps."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    if labels:
        label_sheet(image, labels).save(folder / "sheet.png")
    for rank, lab in enumerate(labels, 1):
        overlay(image, lab.map, title=f"{lab.label}  {lab.prob:.3f}").save(folder / f"{rank:02d}_{_file_label(lab.label)}.png")
        records.append({"label": lab.label, "prob": lab.prob, "map": np.round(lab.map.astype(np.float64), 6).tolist()})
    grid = list(labels[0].map.shape) if labels else None
    (folder / "maps.json").write_text(json.dumps({"image": image_name, "grid": grid, "labels": records}))
    return folder
