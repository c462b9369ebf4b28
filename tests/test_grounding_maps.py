"""Grounding maps that tell labels apart (the "logit" rule) and the pictures drawn from them."""

import random

import numpy as np
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.data.synth import CATEGORIES, background, glyph_image
from nxtrec.inference.attention import DEFAULT_MAP_RULE
from nxtrec.inference.heatmaps import SCALE_WIDTH, label_sheet, model_view, overlay
from nxtrec.inference.ranking import Label
from nxtrec.inference.recognizer import Recognizer

SIZE = 224
# A dress top left, a peach bottom right, on the seed-0 background: the bundled model names both.
OBJECTS = {"dress": (8, 8, 104, 104), "peach": (120, 120, 216, 216)}


def two_object_scene() -> Image.Image:
    img = background(random.Random(0), SIZE)
    glyphs = {c.name: c.glyph for c in CATEGORIES}
    for name, (x0, y0, x1, y1) in OBJECTS.items():
        g = glyph_image(glyphs[name]).resize((x1 - x0, y1 - y0), Image.LANCZOS)
        img.paste(g, (x0, y0), g)
    return img


def peak_centre(grid_map: np.ndarray) -> tuple[float, float]:
    r, c = np.unravel_index(np.argmax(grid_map), grid_map.shape)
    return (c + 0.5) * SIZE / grid_map.shape[1], (r + 0.5) * SIZE / grid_map.shape[0]


def in_box(point, box) -> bool:
    return box[0] <= point[0] < box[2] and box[1] <= point[1] < box[3]


def test_two_labels_of_a_two_object_scene_point_at_their_own_objects():
    assert DEFAULT_MAP_RULE == "logit"
    labels = {lab.label: lab for lab in Recognizer.from_pretrained().predict(two_object_scene(), top_k=3, maps=True)[0]}
    assert set(OBJECTS) <= set(labels), list(labels)
    for name, box in OBJECTS.items():
        other = next(b for n, b in OBJECTS.items() if n != name)
        peak = peak_centre(labels[name].map)
        assert in_box(peak, box) and not in_box(peak, other), (name, peak)


def test_overlay_keeps_the_picture_where_the_map_is_low_and_writes_a_scale():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    grid_map = np.zeros((4, 4), np.float32)
    grid_map[0, 0] = 1.0
    panel = np.asarray(overlay(image, grid_map, size=64, title="cat 0.50")).astype(int)
    view = np.asarray(model_view(image, 64)).astype(int)
    assert panel.shape == (64, 64 + SCALE_WIDTH, 3)
    assert np.array_equal(panel[48:, 48:64], view[48:, 48:])  # far from the peak: the photo, full brightness
    assert np.abs(panel[4:12, 4:12] - view[4:12, 4:12]).mean() > 20  # the peak's patch is coloured
    scale = panel[:, 64:]
    assert (scale[20:-20, 4:18].std(axis=0) > 10).any()  # the colour ramp runs top to bottom


def test_label_sheet_shows_the_image_and_every_label():
    image = Image.new("RGB", (50, 40), "grey")
    labels = [Label(f"l{i}", 0.5 / (i + 1), map=np.eye(3, dtype=np.float32)[::-1] / 3) for i in range(5)]
    sheet = label_sheet(image, labels, size=60, per_row=3)
    # 6 pictures, 3 to a row: the image and two overlays, then three overlays (the widest row)
    assert sheet.size == (3 * (60 + SCALE_WIDTH) + 2 * 8, 2 * 60 + 8)


def test_attention_patch_draws_one_patch_over_the_image(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(img)
    base = ["attention", str(img), "--model", str(tiny_model_dir), "--layer", "1", "--head", "0"]
    assert main([*base, "--patch", "1,2", "--out", str(tmp_path / "p.png")]) == 0
    rec = Recognizer.from_pretrained(tiny_model_dir)
    cols = rec.config.encoder.image_size // rec.config.encoder.patch_size
    block = np.load(tmp_path / "p.npy")
    assert Image.open(tmp_path / "p.png").size == (336 + SCALE_WIDTH, 336)
    assert block.shape == (cols * cols, cols * cols)
    capsys.readouterr()
    assert main([*base, "--patch", f"{cols},0", "--out", str(tmp_path / "q.png")]) == 2
    assert f"--patch {cols},0" in capsys.readouterr().err
    assert main([*base, "--patch", "1", "--out", str(tmp_path / "q.png")]) == 2
    assert "ROW,COLUMN" in capsys.readouterr().err
