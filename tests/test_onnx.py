"""ONNX export and the torch-free ONNX Runtime path, on tiny models of the real architecture.

The exports are made once per module (a few seconds each): our KV-cache layout and the
released three-part layout of the same 3-block model, whose delimiter logit is raised so
that branches end after varied numbers of tokens.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from blocked_imports import TORCH_FREE_BLOCK, run_nxtrec
from conftest import tiny_model
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.inference.recognizer import Recognizer
from nxtrec.inference.sampling import prefill
from nxtrec.model.decoder import BranchRows
from nxtrec.model.directory import load_model_dir, save_model_dir
from nxtrec.onnx.export import export_onnx
from nxtrec.onnx.format import DECODER_DATA, FILES, MANIFEST, kv_names
from nxtrec.onnx.quantize import quantize_dir
from nxtrec.onnx.released import export_released_layout_dir
from nxtrec.inference.engine import DecodeOptions, predict_files
from nxtrec.onnx.format import detect_layout
from nxtrec.onnx.recognizer import OnnxRecognizer
from nxtrec.onnx.sessions import OnnxRuntimeError


def predict_paths(onnx_dir, paths, top_k, batch_size):
    """(path, labels as dicts, None) or (path, None, error) per image."""
    rows = predict_files(OnnxRecognizer(onnx_dir), paths, DecodeOptions(top_k=top_k), batch_size)
    return [(path, labels and [lab.to_dict() for lab in labels], error) for path, labels, error in rows]

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def model_dir(tokenizer, tokenizer_file, tmp_path_factory):
    model = tiny_model(tokenizer, n_layers=3, seed=7, delimiter_bias=2.0)
    return save_model_dir(model, tokenizer_file, tmp_path_factory.mktemp("onnx") / "model")


@pytest.fixture(scope="module")
def cli_export(model_dir, tmp_path_factory):
    """`nxtrec export-onnx` (with its validation): the export the other tests use."""
    out = tmp_path_factory.mktemp("onnx") / "export"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["export-onnx", "--model", str(model_dir), "--out", str(out), "--image", str(ROOT / "examples" / "scene.jpg")])
    return out, code, buf.getvalue()


@pytest.fixture(scope="module")
def onnx_dir(cli_export):
    return cli_export[0]


@pytest.fixture(scope="module")
def released_dir(model_dir, tmp_path_factory):
    return export_released_layout_dir(model_dir, tmp_path_factory.mktemp("onnx") / "released", **QUIET)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-images")
    rng = np.random.default_rng(3)
    paths = [str(ROOT / "examples" / "scene.jpg")]
    for i, size in enumerate([(90, 70), (64, 200), (300, 120)]):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _same_labels(a, b, tol=1e-5):
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        assert [x.label for x in la] == [x.label for x in lb]
        assert max(abs(x.prob - y.prob) for x, y in zip(la, lb)) < tol


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------


def test_export_layout_manifest_and_validation(onnx_dir, model_dir, tokenizer):
    m = json.loads((onnx_dir / MANIFEST).read_text())
    for name in [*FILES.values(), DECODER_DATA]:
        assert (onnx_dir / name).is_file(), name
    assert m["validation"]["max_abs_diff"].keys() >= {"encoder", "prefill_logits", "prefill_kv", "step_logits"}
    assert max(m["validation"]["max_abs_diff"].values()) < 1e-4
    # ids recorded from the tokenizer, not constants
    model, _ = load_model_dir(model_dir)
    cfg = model.config
    assert m["prompt_ids"] == tokenizer.prompt_ids(cfg.image_token, cfg.prompt)
    assert m["special_ids"]["delimiter"] == tokenizer.delimiter_id
    assert m["num_image_tokens"] == cfg.encoder.num_patches and m["n_layers"] == 3

    # graph signatures as documented, dynamic axes symbolic
    for key in ("prefill", "step", "encoder"):
        proto = onnx.load(str(onnx_dir / FILES[key]), load_external_data=False)
        want = m["graphs"][key]
        assert [i.name for i in proto.graph.input] == [i["name"] for i in want["inputs"]]
        assert [o.name for o in proto.graph.output] == [o["name"] for o in want["outputs"]]
        for inp in proto.graph.input:
            dims = inp.type.tensor_type.shape.dim
            assert len(dims) == len(next(i for i in want["inputs"] if i["name"] == inp.name)["shape"])
            if inp.name.startswith(("past_", "prefix_")):
                assert dims[0].dim_param and dims[2].dim_param and not dims[1].dim_param
    # both decoder graphs read one weights file, in which each tensor is stored once
    decoder_bytes = sum(p.numel() * 4 for n, p in model.language_decoder.named_parameters() if "tok_embeddings" not in n)
    for key in ("prefill", "step"):
        proto = onnx.load(str(onnx_dir / FILES[key]), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {DECODER_DATA}
    assert (onnx_dir / DECODER_DATA).stat().st_size < 1.2 * decoder_bytes


def test_graphs_match_pytorch(onnx_dir, model_dir, tokenizer):
    """Prefill logits and keys/values; cached steps for 2 images x 3 branches (shared prefix
    per image, and one prefix copy per branch); the step graph used as the prefill."""
    from nxtrec.onnx.sessions import make_session

    model, _ = load_model_dir(model_dir)
    cfg, dec = model.config, model.language_decoder
    prompt = torch.tensor(tokenizer.prompt_ids(cfg.image_token, cfg.prompt))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        image_tokens = model.encode_images(pixels)
        x = model.prefix_embeddings(image_tokens, prompt)
        logits, kvs, plen = prefill(model, image_tokens, prompt)
    enc = make_session(onnx_dir / FILES["encoder"])
    np.testing.assert_allclose(enc.run(None, {"pixels": pixels.numpy()})[0], image_tokens.numpy(), atol=1e-4)
    pre = make_session(onnx_dir / FILES["prefill"])
    out = pre.run(None, {"inputs_embeds": x.numpy()})
    np.testing.assert_allclose(out[0], logits.numpy(), atol=1e-4)
    for got, want in zip(out[1:], [t for kv in kvs for t in kv]):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-4)

    step = make_session(onnx_dir / FILES["step"])
    L, (H, D) = cfg.decoder.n_layers, (cfg.decoder.n_heads, cfg.decoder.head_dim)
    empty = np.zeros((2, H, 0, D), np.float32)
    feed = {"inputs_embeds": x.numpy(), "position": np.array(0)}
    feed.update((n, empty) for n in kv_names("prefix", L) + kv_names("past", L))
    as_prefill = step.run(None, feed)
    for a, b in zip(as_prefill, out):
        np.testing.assert_allclose(a, b, atol=1e-5)

    table = dec.tok_embeddings.weight.detach().numpy()
    tokens = logits.softmax(-1).topk(3, dim=-1).indices.reshape(-1)
    rows = BranchRows.of([0, 0, 0, 1, 1, 1], 2)
    prefix = [t.numpy() for kv in kvs for t in kv]
    repeated = [np.repeat(t, 3, axis=0) for t in prefix]
    past = past_rep = [np.zeros((6, H, 0, D), np.float32)] * (2 * L)
    own = None
    for s in range(4):
        with torch.inference_mode():
            want, own = dec.step(tokens, plen + s, kvs, rows, own)
        base = {"inputs_embeds": table[tokens.numpy()][:, None, :], "position": np.array(plen + s)}
        got = step.run(None, {**base, **dict(zip(kv_names("prefix", L), prefix)), **dict(zip(kv_names("past", L), past))})
        rep = step.run(None, {**base, **dict(zip(kv_names("prefix", L), repeated)),
                              **dict(zip(kv_names("past", L), past_rep))})
        np.testing.assert_allclose(got[0], want.numpy(), atol=1e-4)
        np.testing.assert_allclose(rep[0], want.numpy(), atol=1e-4)
        assert got[1].shape == (6, H, s + 1, D)
        past, past_rep = got[1:], rep[1:]
        tokens = want.argmax(-1)


@pytest.mark.parametrize("k,batch_size", [(1, 4), (5, 2), (20, 3), (20, 4)])
def test_onnx_labels_equal_pytorch(onnx_dir, model_dir, images, k, batch_size):
    ours = OnnxRecognizer(onnx_dir).predict(images, top_k=k, batch_size=batch_size)
    ref = Recognizer.from_pretrained(model_dir).predict(images, top_k=k)
    _same_labels(ours, ref)
    assert all(1 <= len(labels) <= k for labels in ours)


def test_onnx_rankings_and_extra_k_equal_pytorch(onnx_dir, model_dir, images):
    onnx_rec, torch_rec = OnnxRecognizer(onnx_dir), Recognizer.from_pretrained(model_dir)
    pixels = onnx_rec.pixels(images[:2])
    for ranking in ("prob", "ppl", "sim", "none"):
        a = onnx_rec.predict_batch(pixels, top_k=6, extra_k=4, ranking=ranking)
        b = torch_rec.predict_batch(torch.from_numpy(pixels), top_k=6, extra_k=4, ranking=ranking)
        _same_labels(a, b)
        for la, lb in zip(a, b):
            for x, y in zip(la, lb):
                assert (x.score is None) == (y.score is None)
                if x.score is not None:
                    assert abs(x.score - y.score) < 1e-4


def test_served_onnx_model_process_equals_onnx_runtime(onnx_dir, images):
    """`nxtrec serve --onnx`: the export loaded in the service's model process."""
    from nxtrec.serving.model_process import start_engine_process

    onnx_rec = OnnxRecognizer(onnx_dir)
    pixels = onnx_rec.pixels(images[:3])
    engine = start_engine_process(onnx=str(onnx_dir))
    try:
        assert engine.preprocessing == onnx_rec.preprocessing and not engine.capabilities.maps
        _same_labels(engine.predict_batch(pixels, top_k=5), onnx_rec.predict_batch(pixels, top_k=5))
    finally:
        engine.close()


def test_branch_lengths_vary(onnx_dir, images):
    """The test model really exercises early stops and the 19-token cap."""
    rec = OnnxRecognizer(onnx_dir)
    lengths = {len(b.tokens) for img in rec.one_shot(rec.encode(rec.pixels(images)), 20) for b in img}
    assert len(lengths) > 3


# ---------------------------------------------------------------------------------------
# the released three-part layout
# ---------------------------------------------------------------------------------------


def test_released_layout_files(released_dir, model_dir):
    model, _ = load_model_dir(model_dir)
    cfg = model.config
    enc = onnx.load(str(released_dir / "encoder.onnx"), load_external_data=False)
    assert [i.name for i in enc.graph.input] == ["input"] and [o.name for o in enc.graph.output] == ["output"]
    out_dims = enc.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[1].dim_value == cfg.encoder.num_patches + 1 and out_dims[2].dim_value == cfg.decoder.dim
    assert np.load(released_dir / "Wte.npz")["Wte"].shape == (cfg.decoder.vocab_size, cfg.decoder.dim)
    for i in (1, 2, 3):
        part = onnx.load(str(released_dir / f"decoder_p{i}.onnx"), load_external_data=False)
        assert [x.name for x in part.graph.input] == ["input", "mask"]
        assert [x.name for x in part.graph.output] == ["output"]
        dims = part.graph.output[0].type.tensor_type.shape.dim
        assert len(dims) == (2 if i == 3 else 3)
    assert detect_layout(released_dir) == "released"


@pytest.mark.parametrize("k", [3, 20])
def test_released_layout_labels_equal_pytorch(released_dir, model_dir, images, k):
    ours = OnnxRecognizer(released_dir).predict(images[:3], top_k=k)
    _same_labels(ours, Recognizer.from_pretrained(model_dir).predict(images[:3], top_k=k))


def test_constrained_labels_equal_pytorch(onnx_dir, released_dir, model_dir, images):
    """`vocab` (a tag list with prefixes, multi-token entries and synonyms) and `compat`:
    both ONNX layouts give PyTorch's labels and probabilities."""
    tags = ["cat | kitten", "cat food", "car", "cart", "red apple | apple", "dog", "tree", "snake", "ring"]
    names = {t.split("|")[0].strip() for t in tags}
    torch_rec = Recognizer.from_pretrained(model_dir)
    for k in (3, 9):
        want = torch_rec.predict(images, top_k=k, vocab=tags)
        assert all(labels and {x.label for x in labels} <= names for labels in want)
        _same_labels(OnnxRecognizer(onnx_dir).predict(images, top_k=k, batch_size=2, vocab=tags), want)
        _same_labels(OnnxRecognizer(released_dir).predict(images[:2], top_k=k, vocab=tags), want[:2])
    compat = dict(compat="reference", ranking="ppl")
    _same_labels(OnnxRecognizer(onnx_dir).predict(images, top_k=5, **compat), torch_rec.predict(images, top_k=5, **compat))


def test_label_rules_on_onnx_equal_pytorch(onnx_dir, model_dir, images):
    """`exclude`, `replace` and `min_prob` run in the shared label finishing: ONNX Runtime gives
    PyTorch's labels, with the excluded label gone and two labels merged (probabilities summed)."""
    torch_rec = Recognizer.from_pretrained(model_dir)
    plain = torch_rec.predict(images[:2], top_k=6)
    keys = [x.label.strip().casefold() for x in plain[0]]
    usable = [x.label for x, key in zip(plain[0], keys)
              if key and keys.count(key) == 1 and not any(c in x.label for c in "|#") and "->" not in x.label]
    assert len(usable) >= 3, plain[0]
    top, a, b = usable[:3]
    rules = {"exclude": [top], "replace": [f"{a} | {b} -> merged"], "min_prob": 1e-12}
    want = torch_rec.predict(images[:2], top_k=6, **rules)
    _same_labels(OnnxRecognizer(onnx_dir).predict(images[:2], top_k=6, batch_size=1, **rules), want)
    names = {x.label: x.prob for x in want[0]}
    assert top not in names and a not in names and b not in names
    assert names["merged"] == pytest.approx(sum(x.prob for x in plain[0] if x.label in (a, b)), rel=1e-6)


def test_released_layout_needs_a_tokenizer_and_uses_defaults_without_config(released_dir, tmp_path, images):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in released_dir.iterdir():
        if f.name not in ("tokenizer.model", "config.json"):
            shutil.copyfile(f, bare / f.name)
    with pytest.raises(OnnxRuntimeError, match="tokenizer.model"):
        OnnxRecognizer(bare)
    # without config.json: image size and token count come from the graphs, the prompt and
    # special tokens are the defaults (those of the released model and of this test model)
    shutil.copyfile(released_dir / "tokenizer.model", bare / "tokenizer.model")
    _same_labels(OnnxRecognizer(bare).predict(images[:1], top_k=5), OnnxRecognizer(released_dir).predict(images[:1], top_k=5))


# ---------------------------------------------------------------------------------------
# command line, no torch, errors
# ---------------------------------------------------------------------------------------


def test_predict_cli_onnx_output_equals_pytorch(onnx_dir, released_dir, model_dir, images, capsys):
    args = ["predict", *images, "--top-k", "5", "--json", "--batch-size", "2"]
    assert main([*args, "--model", str(model_dir)]) == 0
    ref = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for d in (onnx_dir, released_dir):
        assert main([*args, "--onnx", str(d)]) == 0
        got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["image"] for r in got] == [r["image"] for r in ref]
        for a, b in zip(got, ref):
            assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
            assert max(abs(x["prob"] - y["prob"]) for x, y in zip(a["labels"], b["labels"])) < 1e-5
    assert main(["predict", images[0], "--top-k", "3", "--onnx", str(onnx_dir)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert text[0] == images[0] and len(text) >= 2 and text[1].startswith("  0.")


def test_onnx_path_runs_without_torch(onnx_dir, released_dir, images, tmp_path):
    """torch made unimportable: the runtime module and `nxtrec predict --onnx` still work."""
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    code = f"""
import sys, json
sys.modules['torch'] = None  # any `import torch` now raises ImportError
from nxtrec.inference.engine import DecodeOptions, predict_files
from nxtrec.onnx.recognizer import OnnxRecognizer
rows = list(predict_files(OnnxRecognizer({str(onnx_dir)!r}), {images[:2] + [str(tmp_path / 'bad.jpg')]!r}, DecodeOptions(top_k=4), 2))
assert [r[2] is None for r in rows] == [True, True, False], rows
assert 'bad.jpg' in rows[2][2]
from nxtrec.cli.main import main
for d in ({str(onnx_dir)!r}, {str(released_dir)!r}):
    assert main(['predict', {images[0]!r}, '--onnx', d, '--top-k', '3', '--json']) == 0
assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]
print('ok')
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_torch_free_install_runs_predict_and_tag_onnx(onnx_dir, images, tmp_path, capsys):
    """`nxtrec predict --onnx` and `nxtrec tag --onnx` as processes with only the [runtime]
    packages importable (torch, safetensors, tqdm and the other extras blocked)."""
    args = ["predict", *images[:2], "--onnx", str(onnx_dir), "--top-k", "4", "--json"]
    proc = run_nxtrec(args, TORCH_FREE_BLOCK, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main(args) == 0  # the same command with everything installed
    assert proc.stdout == capsys.readouterr().out and len(proc.stdout.splitlines()) == 2
    out = tmp_path / "tagged"
    proc = run_nxtrec(["tag", *images[:2], "--onnx", str(onnx_dir), "--top-k", "4", "--out", str(out), "--workers", "1"],
                      TORCH_FREE_BLOCK, tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert len(records) == 2 and all(r["labels"] for r in records)


def test_predict_paths_reports_bad_images_in_order(onnx_dir, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"")
    rows = list(predict_paths(onnx_dir, [images[0], str(bad), images[1]], top_k=3, batch_size=8))
    assert [r[0] for r in rows if r[2] is None] == [images[0], images[1]]
    assert [r[0] for r in rows if r[2] is not None] == [str(bad)]
    for _, labels, err in rows:
        if err is None:
            assert 1 <= len(labels) <= 3 and set(labels[0]) == {"label", "prob"}


def test_export_cli_and_errors(cli_export, model_dir, tmp_path, capsys):
    out, code, text = cli_export
    assert code == 0
    assert "decoder_step.onnx" in text and "decoder.data" in text and f"--onnx {out}" in text
    assert "max |ONNX Runtime - PyTorch| on " in text and "scene.jpg" in text
    assert detect_layout(out) == "nxtrec"
    assert main(["export-onnx", "--model", str(model_dir), "--out", str(tmp_path / "x"), "--dtype", "float16",
                 "--quantize", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "float32" in err[0]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["export-onnx", "--model", str(model_dir), "--out", str(foreign)]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert main(["export-onnx", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2


def test_runtime_errors_are_one_line(tmp_path, onnx_dir, tokenizer_file):
    with pytest.raises(OnnxRuntimeError, match="not an ONNX model directory"):
        OnnxRecognizer(tmp_path)
    with pytest.raises(OnnxRuntimeError, match="not found"):
        OnnxRecognizer(tmp_path / "nope")
    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / FILES["step"]).write_bytes(b"garbage")
    with pytest.raises(OnnxRuntimeError, match="decoder_step.onnx: 7 bytes, nxtrec-onnx.json says"):
        OnnxRecognizer(broken)  # the manifest's sizes catch it first
    manifest = json.loads((broken / MANIFEST).read_text())
    del manifest["sizes"]
    (broken / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(OnnxRuntimeError, match="cannot load ONNX model"):
        OnnxRecognizer(broken)


# ---------------------------------------------------------------------------------------
# float16 and int8
# ---------------------------------------------------------------------------------------


def test_int8_quantization(onnx_dir, tmp_path, images):
    q = tmp_path / "int8"
    quantize_dir(onnx_dir, q, **QUIET)
    m = json.loads((q / MANIFEST).read_text())
    assert m["quantization"] == "int8-dynamic"
    ops = {n.op_type for n in onnx.load(str(q / FILES["step"]), load_external_data=False).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert (q / DECODER_DATA).stat().st_size < 0.6 * (onnx_dir / DECODER_DATA).stat().st_size
    float_rec, int8_rec = OnnxRecognizer(onnx_dir), OnnxRecognizer(q)
    x = float_rec.prefix_embeddings(float_rec.encode(float_rec.pixels(images[:2])))
    a, b = float_rec.decoder.prefill(x)[0], int8_rec.decoder.prefill(x)[0]
    # int8 weights perturb every logit a little (about 10% here, random tiny model), but the
    # logits must still follow the float ones closely.
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    assert np.abs(a - b).mean() < 0.25 * np.abs(a).mean()
    labels = int8_rec.predict(images[:2], top_k=5)
    assert all(1 <= len(lab) <= 5 for lab in labels)
    with pytest.raises(Exception, match="float32"):
        quantize_dir(q, tmp_path / "twice", **QUIET)


def test_float16_export_runs(model_dir, tmp_path, images):
    out = tmp_path / "fp16"
    m = export_onnx(model_dir, out, dtype="float16", **QUIET)
    assert m["dtype"] == "float16" and max(m["validation"]["max_abs_diff"].values()) < 5e-2
    assert np.load(out / FILES["embeddings"], mmap_mode="r").dtype == np.float16
    labels = OnnxRecognizer(out).predict(images[:1], top_k=5)[0]
    assert 1 <= len(labels) <= 5


def test_a_calibration_travels_with_the_export(model_dir, onnx_dir, images, tmp_path, capsys):
    """export-onnx records the model's digest and copies its calibration with a SHA-256
    (`copy_calibration`, the step it ends with); the ONNX labels then carry the same
    confidences as the PyTorch ones, and verify catches a changed calibration file."""
    from nxtrec.digests import model_digest
    from nxtrec.evaluation.calibration import fit_calibration
    from nxtrec.inference.calibration import CALIBRATION_FILE
    from nxtrec.onnx.calibration import copy_calibration

    model, export = tmp_path / "model", tmp_path / "export"
    shutil.copytree(model_dir, model)
    shutil.copytree(onnx_dir, export)
    rng = np.random.default_rng(0)
    probs = rng.random(400) ** 4
    fitted = fit_calibration(probs, rng.random(400) < probs ** 0.5, np.arange(400) // 4, model_digest(model))
    (model / CALIBRATION_FILE).write_text(json.dumps(fitted.to_dict()))
    copy_calibration(model, export)
    manifest = json.loads((export / MANIFEST).read_text())
    assert manifest["model_digest"] == fitted.model_digest == json.loads((onnx_dir / MANIFEST).read_text())["model_digest"]
    assert manifest["calibration"]["sha256"] == manifest["sha256"][CALIBRATION_FILE]
    ours = OnnxRecognizer(export).predict(images, top_k=5, profile="recall")
    theirs = Recognizer.from_pretrained(model).predict(images, top_k=5, profile="recall")
    for a, b in zip(ours, theirs):
        assert [x.label for x in a] == [x.label for x in b] and all(x.confidence is not None for x in a)
        np.testing.assert_allclose([x.confidence for x in a], [x.confidence for x in b], atol=1e-5)
    assert main(["verify", str(export)]) == 0 and "calibration.json: this model's" in capsys.readouterr().out
    (export / CALIBRATION_FILE).write_text((export / CALIBRATION_FILE).read_text().replace('"n": 400', '"n": 401'))
    assert main(["verify", str(export)]) == 1 and "SHA-256 differs" in capsys.readouterr().err
