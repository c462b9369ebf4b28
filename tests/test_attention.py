"""Attention maps: the reference's image-token view and the per-label grounding maps."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.errors import NxtrecError
from nxtrec.inference.attention import MAP_RULES, GroundingRecorder, image_attention, recording
from nxtrec.inference.heatmaps import SCALE_WIDTH, attention_grid
from nxtrec.inference.ranking import Branch, rank_labels
from nxtrec.inference.recognizer import Recognizer
from nxtrec.inference.sampling import one_shot
from nxtrec.model.decoder import Decoder
from nxtrec.model.masks import inference_mask


def _recognizer(tokenizer, n_layers=2, seed=0):
    return Recognizer(tiny_model(tokenizer, n_layers=n_layers, seed=seed), tokenizer)


def _pixels(model, batch=1, seed=0):
    size = model.config.encoder.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _meta_rope(x, positions, theta):
    """Meta's rotary embedding with complex numbers, written independently of the model's."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    rot = torch.polar(torch.ones(len(positions), d // 2), torch.outer(positions.float(), freqs))
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], d // 2, 2))
    return torch.view_as_real(xc * rot[:, None, :]).flatten(-2)


def _independent_image_block(model, image_tokens, prompt_ids, layer):
    """softmax(q k^T / sqrt(d)) among the image tokens of the prefix, from the layer's input."""
    dec = model.language_decoder
    inputs = {}

    def keep_input(module, args):
        inputs["x"] = args[0]

    hook = dec.layers[layer].register_forward_pre_hook(keep_input)
    with torch.inference_mode():
        h = model.prefix_embeddings(image_tokens, prompt_ids)
        dec(h, inference_mask(h.shape[1], image_tokens.shape[1]))
        hook.remove()
        block, cfg, p = dec.layers[layer], dec.cfg, image_tokens.shape[1]
        x = block.attention_norm(inputs["x"][0, :p])  # image tokens only: they see only each other
        pos = torch.arange(p)
        q = _meta_rope(block.attention.wq(x).view(p, cfg.n_heads, cfg.head_dim), pos, cfg.rope_theta)
        k = _meta_rope(block.attention.wk(x).view(p, cfg.n_heads, cfg.head_dim), pos, cfg.rope_theta)
        scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(cfg.head_dim)
    return scores.softmax(-1).numpy()


def test_reference_view_equals_an_independent_softmax(tokenizer):
    rec = _recognizer(tokenizer, n_layers=3, seed=1)
    model = rec.model
    pixels = _pixels(model)
    blocks = image_attention(model, pixels, rec.prompt_ids, [0, 1, 2])
    with torch.inference_mode():
        image_tokens = model.encode_images(pixels)
    p = model.num_image_tokens
    for layer, block in blocks.items():
        assert block.shape == (model.config.decoder.n_heads, p, p) and block.dtype == np.float32
        expected = _independent_image_block(model, image_tokens, rec.prompt_ids, layer)
        assert np.abs(block - expected).max() < 1e-5, layer
        assert np.allclose(block.sum(-1), 1.0, atol=1e-5)  # image tokens attend only to image tokens
    assert all(layer.attention.probe is None for layer in model.language_decoder.layers)


def test_attention_grid_draws_one_min_max_map_per_query():
    rng = np.random.default_rng(0)
    block = rng.random((16, 16))
    block /= block.sum(-1, keepdims=True)
    img = attention_grid(block, (4, 4), cell=5, gap=3)
    side = 4 * (4 * 5 + 3) - 3
    assert img.size == (side, side) and img.mode == "RGB"
    arr = np.asarray(img)
    # query 5's map is drawn at grid row 1, column 1; its smallest key is the lightest cell
    # (min-max normalised: 0 -> the ramp's first colour) and its largest the darkest.
    top = left = 4 * 5 + 3
    cells = arr[top : top + 20 : 5, left : left + 20 : 5].astype(int).sum(-1)
    assert np.unravel_index(cells.argmax(), (4, 4)) == np.unravel_index(block[5].argmin(), (4, 4))
    assert np.unravel_index(cells.argmin(), (4, 4)) == np.unravel_index(block[5].argmax(), (4, 4))
    with pytest.raises(ValueError):
        attention_grid(block[:8], (4, 4))


def test_attention_cli_writes_png_and_npy(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (80, 90, 3), dtype=np.uint8)).save(img)
    assert main(["attention", str(img), "--model", str(tiny_model_dir), "--layer", "1", "--head", "2",
                 "--out", str(tmp_path / "one.png")]) == 0
    block = np.load(tmp_path / "one.npy")
    rec = Recognizer.from_pretrained(tiny_model_dir)
    expected = image_attention(rec.model, rec.pixels([str(img)]), rec.prompt_ids, [1])[1][2]
    assert np.array_equal(block, expected)
    assert Image.open(tmp_path / "one.png").size[0] > 16
    assert main(["attention", str(img), "--model", str(tiny_model_dir), "--layer", "all", "--head", "all",
                 "--out", str(tmp_path / "all" / "m.png")]) == 0
    cfg = rec.config.decoder
    assert len(list((tmp_path / "all").glob("m_layer*_head*.png"))) == cfg.n_layers * cfg.n_heads
    assert len(list((tmp_path / "all").glob("m_layer*_head*.npy"))) == cfg.n_layers * cfg.n_heads
    capsys.readouterr()
    assert main(["attention", str(img), "--model", str(tiny_model_dir), "--head", "99", "--out", str(tmp_path / "x.png")]) == 2
    assert "--head '99'" in capsys.readouterr().err


def _count_prefix_passes(monkeypatch):
    calls = []
    forward = Decoder.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Decoder, "forward", counting)
    return calls


@pytest.mark.parametrize("rule", MAP_RULES)
def test_label_maps_come_from_the_same_single_pass(tokenizer, monkeypatch, rule):
    rec = _recognizer(tokenizer)
    pixels = _pixels(rec.model, batch=2, seed=3)
    plain = rec.predict_batch(pixels, top_k=8)
    calls = _count_prefix_passes(monkeypatch)
    mapped = rec.predict_batch(pixels, top_k=8, maps=True, map_rule=rule)
    assert len(calls) == 1  # one prefix pass for the batch, as without maps
    grid = (rec.config.encoder.image_size // rec.config.encoder.patch_size,) * 2
    for a, b in zip(plain, mapped):
        assert [(x.label, x.prob) for x in a] == [(x.label, x.prob) for x in b]
        for lab in b:
            assert lab.map.shape == grid and np.isfinite(lab.map).all() and (lab.map >= 0).all()
            assert lab.map.sum() == pytest.approx(1.0, abs=1e-5)
            assert a[0].map is None
    assert all(layer.attention.probe is None for layer in rec.model.language_decoder.layers)


def test_recorded_step_rows_equal_a_full_forward_of_each_branch(tokenizer):
    """Each branch's recorded attention at step s equals the attention of its (s+1)-th token
    in a plain forward over the prefix and the branch's tokens: rows go to the right branch."""
    rec = _recognizer(tokenizer, n_layers=2, seed=5)
    model, k = rec.model, 12
    with torch.inference_mode():
        image_tokens = model.encode_images(_pixels(model, batch=2, seed=4))
        recorder = GroundingRecorder(model.config.decoder.n_layers, image_tokens.shape[1])
        with recording(model, recorder):
            branches = one_shot(model, image_tokens, rec.prompt_ids, k, tokenizer.delimiter_id, recorder=recorder)
        prefix = model.prefix_embeddings(image_tokens, rec.prompt_ids)
        checked = 0
        for image, j in [(0, 0), (0, k - 1), (1, 3), (1, k // 2)]:
            br = branches[image][j]
            n_queries = len(br.probs)
            rows = recorder.queries(image * k + j, image, n_queries)
            assert rows.shape[0] == n_queries
            for s in range(1, n_queries):
                tokens = torch.tensor(br.tokens + [tokenizer.delimiter_id])[:s]
                h = torch.cat([prefix[image : image + 1], model.language_decoder.embed(tokens)[None]], dim=1)
                full = GroundingRecorder(model.config.decoder.n_layers, image_tokens.shape[1])
                with recording(model, full):
                    model.language_decoder(h, inference_mask(h.shape[1], image_tokens.shape[1]))
                expected = torch.stack([r[0, : prefix.shape[1]] for r in full.prefix_rows])
                assert torch.allclose(rows[s], expected, atol=1e-5), (image, j, s)
                checked += 1
    assert checked >= 4


def test_merged_branches_weight_their_maps_by_probability():
    a, b = np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32)
    a[0, 0], b[1, 1] = 1.0, 1.0
    branches = [Branch([7], [0.6, 1.0], a), Branch([7], [0.2, 1.0], b), Branch([8], [0.1, 1.0], b)]
    labels = rank_labels(branches, lambda ids: f"t{ids[0]}")
    assert labels[0].label == "t7" and labels[0].map[0, 0] == pytest.approx(0.75) and labels[0].map[1, 1] == pytest.approx(0.25)
    assert labels[0].to_dict()["map"] == [[0.75, 0.0], [0.0, 0.25]]
    assert rank_labels([Branch([7], [0.5])], lambda ids: "x")[0].map is None


def test_maps_need_one_shot_and_a_known_rule(tokenizer):
    rec = _recognizer(tokenizer)
    pixels = _pixels(rec.model)
    with pytest.raises(NxtrecError, match="one-shot"):
        rec.predict_batch(pixels, top_k=3, sampler="beam", maps=True)
    with pytest.raises(NxtrecError, match="rollout"):
        rec.predict_batch(pixels, top_k=3, maps=True, map_rule="nope")


def test_predict_maps_cli_writes_overlays_and_grids(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(img)
    out = tmp_path / "maps"
    assert main(["predict", str(img), "--model", str(tiny_model_dir), "--top-k", "4", "--json", "--maps", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "photo" / "maps.json").read_text())
    assert [x["label"] for x in saved["labels"]] == [x["label"] for x in printed["labels"]]
    assert all("map" not in x for x in printed["labels"])  # grids go to files, not to stdout
    pngs = sorted((out / "photo").glob("[0-9][0-9]_*.png"))
    assert len(pngs) == len(saved["labels"]) >= 1
    assert Image.open(out / "photo" / "sheet.png").width > 2 * 336  # the image and every label side by side
    for entry in saved["labels"]:
        grid = np.array(entry["map"])
        assert list(grid.shape) == saved["grid"] and abs(grid.sum() - 1) < 1e-4
    assert Image.open(pngs[0]).size == (336 + SCALE_WIDTH, 336)  # the overlay and its colour scale
    assert main(["predict", str(img), "--model", str(tiny_model_dir), "--sampler", "greedy", "--maps", str(out)]) == 2


def test_tag_maps_stores_grids_in_the_records(tiny_model_dir, tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img)
    base = ["tag", str(img), "--model", str(tiny_model_dir), "--workers", "1", "--top-k", "3"]
    assert main([*base, "--out", str(tmp_path / "tags"), "--maps"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "tags" / "part-00000.jsonl").read_text().splitlines()]
    rec = Recognizer.from_pretrained(tiny_model_dir)
    expected = rec.predict([str(img)], top_k=3, maps=True)[0]
    assert [x["label"] for x in record["labels"]] == [x.label for x in expected]
    for saved, lab in zip(record["labels"], expected):
        assert np.allclose(saved["map"], lab.map, atol=1e-6) and abs(np.sum(saved["map"]) - 1) < 1e-4
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "csv"), "--maps", "--format", "csv"]) == 2
    assert "--maps" in capsys.readouterr().err
