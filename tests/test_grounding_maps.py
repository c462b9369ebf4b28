"""Grounding maps that tell labels apart (the "logit" rule) and the pictures drawn from them."""

import random

import numpy as np
import torch
from conftest import tiny_model
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.data.synth import CATEGORIES, background, glyph_image
from nxtrec.inference.attention import DEFAULT_MAP_RULE, grounded_one_shot
from nxtrec.inference.heatmaps import SCALE_WIDTH, label_sheet, model_view, overlay
from nxtrec.inference.ranking import Label
from nxtrec.inference.recognizer import Recognizer
from nxtrec.model.masks import inference_mask

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


def _rotate(x, theta):
    """Meta's rotary embedding over positions 0..S-1 of x [S, H, D], with complex numbers."""
    s, d = x.shape[0], x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    rot = torch.polar(torch.ones(s, d // 2), torch.outer(torch.arange(s).float(), freqs))
    return torch.view_as_real(torch.view_as_complex(x.float().reshape(s, -1, d // 2, 2)) * rot[:, None]).flatten(-2)


def _independent_logit_map(model, image_tokens, prompt_ids, token: int) -> np.ndarray:
    """sum over layers and heads of a[last, j] * (g * w_token) . W_o^h v[j], from each layer's
    input: the last prompt position attends to every prefix token, so no mask is needed."""
    dec, cfg, p = model.language_decoder, model.language_decoder.cfg, image_tokens.shape[1]
    inputs = []
    hooks = [layer.attention.register_forward_pre_hook(lambda m, args: inputs.append(args[0][0])) for layer in dec.layers]
    with torch.inference_mode():
        h = model.prefix_embeddings(image_tokens, prompt_ids)
        dec(h, inference_mask(h.shape[1], p))
        for hook in hooks:
            hook.remove()
        direction = dec.output.weight[token] * dec.norm.weight
        total = torch.zeros(p, dtype=torch.float64)
        for layer, x in zip(dec.layers, inputs):
            att, shape = layer.attention, (x.shape[0], cfg.n_heads, cfg.head_dim)
            q, k = _rotate(att.wq(x).view(shape), cfg.rope_theta), _rotate(att.wk(x).view(shape), cfg.rope_theta)
            v = att.wv(x).view(shape)
            a = (torch.einsum("hd,khd->hk", q[-1], k) / cfg.head_dim**0.5).softmax(-1)  # [H, S]
            wo = att.wo.weight.view(cfg.dim, cfg.n_heads, cfg.head_dim)
            per_head = torch.einsum("ehd,jhd->jhe", wo, v[:p])  # W_o^h v[j]: [P, H, dim]
            total += torch.einsum("hj,jhe,e->j", a[:, :p], per_head, direction).double()
    m = total.clamp(min=0).numpy()
    return m / m.sum()


def test_logit_maps_equal_an_independent_attribution(tokenizer):
    model = tiny_model(tokenizer, n_layers=2, seed=7)
    rec = Recognizer(model, tokenizer)
    size = model.config.encoder.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        image_tokens = model.encode_images(pixels)
        branches = grounded_one_shot(model, image_tokens, rec.prompt_ids, 4, tokenizer.delimiter_id, rule="logit")
    checked = 0
    for image in range(2):
        for br in branches[image]:
            if not br.tokens:
                continue
            expected = _independent_logit_map(model, image_tokens[image : image + 1], rec.prompt_ids, br.tokens[0])
            assert np.abs(br.map.reshape(-1) - expected).max() < 1e-4
            checked += 1
    assert checked >= 4
