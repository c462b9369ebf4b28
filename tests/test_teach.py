"""`nxtrec teach` on tiny random models of the real architecture: the adapter it writes loads
through the engine, the same seed gives the same bytes, a killed run resumes to the same
adapter, a wrong base model is refused, and the taught labels come out of predict, tag and
an ONNX export of the merged model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datagen import write_image

from nxtrec.cli.main import main
from nxtrec.engines import load_engine
from nxtrec.digests import model_digest
from nxtrec.errors import NxtrecError
from nxtrec.model.adapter import ADAPTER_INFO, ADAPTER_WEIGHTS, AdapterError, verify_adapter
from nxtrec.model.presets import init_model
from nxtrec.training.teach import STATE_FILE, TeachOptions, teach

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = TeachOptions(steps=40, eval_every=5, batch_size=4, lr=0.02, threads=1, held_out=0)
TAUGHT = {"quib", "blip", "zorkle"}


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """Six images, labelled with two of three new words each (so that the delimiter after
    each word is learned too)."""
    root = tmp_path_factory.mktemp("examples")
    rows = []
    for i in range(6):
        write_image(root / "img" / f"{i}.jpg", i, (64, 64))
        rows.append({"image": f"img/{i}.jpg", "labels": ["zorkle", "quib"] if i < 3 else ["quib", "blip"]})
    (root / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return init_model("tiny", tmp_path_factory.mktemp("base") / "tiny")


@pytest.fixture(scope="module")
def adapter(base, examples, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "a"
    teach(base, examples / "examples.jsonl", out, OPTIONS, progress=False)
    return out


def labels_of(engine, images, k=3) -> list[list[str]]:
    return [[lab.label for lab in labs] for labs in engine.predict([str(p) for p in images], top_k=k)]


def test_adapter_files_load_and_teach_the_labels(base, examples, adapter):
    info = json.loads((adapter / ADAPTER_INFO).read_text())
    assert info["base_model"] == model_digest(base)
    assert info["labels"] == ["blip", "quib", "zorkle"] and info["rank"] == 8
    assert len(info["targets"]) == 2 * 7  # 2 decoder blocks x (wq wk wv wo w1 w2 w3)
    assert info["figures"]["recall@5_taught_before"] == 0.0 < info["figures"]["recall@5_taught_after"]
    assert not (adapter / STATE_FILE).exists()
    assert (adapter / ADAPTER_WEIGHTS).stat().st_size < 200_000
    assert "teaches blip, quib, zorkle" in verify_adapter(adapter, base)
    images = sorted((examples / "img").glob("*.jpg"))
    taught = labels_of(load_engine(str(base), adapter=str(adapter)), images)
    plain = labels_of(load_engine(str(base)), images)
    assert all(set(labs[:2]) & TAUGHT for labs in taught)
    assert not any(set(labs) & TAUGHT for labs in plain)


def test_output_rows_change_only_the_taught_labels_tokens(base, adapter, tmp_path):
    """The adapter's output rows are the pieces of the taught labels; merged, they change
    those rows of the output layer and no other. A format-1 adapter (before output rows) loads."""
    from safetensors.torch import load_file, save_file

    from nxtrec.model.adapter import merge_adapter_dir
    from nxtrec.model.directory import load_model_dir
    from nxtrec.training.teach import label_token_ids

    info = json.loads((adapter / ADAPTER_INFO).read_text())
    _, tokenizer = load_model_dir(base)
    assert info["output_rows"] == label_token_ids(tokenizer, info["labels"]) != []
    assert tokenizer.delimiter_id not in info["output_rows"]
    key = "language_decoder.output.weight"
    merged = merge_adapter_dir(base, adapter, tmp_path / "merged")
    before, after = load_file(base / "model.safetensors")[key], load_file(merged / "model.safetensors")[key]
    assert (before != after).any(dim=1).nonzero().flatten().tolist() == info["output_rows"]
    old = tmp_path / "format1"
    old.mkdir()
    state = load_file(adapter / ADAPTER_WEIGHTS)
    del state["language_decoder.output.rows"]
    save_file(state, old / ADAPTER_WEIGHTS)
    (old / ADAPTER_INFO).write_text(json.dumps({k: v for k, v in {**info, "format": 1}.items() if k != "output_rows"}))
    assert "0 output rows" in verify_adapter(old, base)
    assert labels_of(load_engine(str(base), adapter=str(old)), [ROOT / "examples" / "scene.jpg"])


def test_without_adapter_outputs_are_unchanged(base, adapter, photos):
    """The base model's file is untouched and loading without --adapter is the plain model."""
    from nxtrec.inference.recognizer import Recognizer

    before = [[(lab.label, lab.prob) for lab in labs] for labs in Recognizer.from_pretrained(base).predict(photos[:2], top_k=5)]
    after = [[(lab.label, lab.prob) for lab in labs] for labs in load_engine(str(base)).predict(photos[:2], top_k=5)]
    assert before == after
    with_adapter = load_engine(str(base), adapter=str(adapter)).predict(photos[:2], top_k=5)
    assert [[(lab.label, lab.prob) for lab in labs] for labs in with_adapter] != before


def test_same_seed_same_adapter_bytes(base, examples, adapter, tmp_path):
    teach(base, examples / "examples.jsonl", tmp_path / "again", OPTIONS, progress=False)
    for name in (ADAPTER_WEIGHTS, ADAPTER_INFO):
        assert (tmp_path / "again" / name).read_bytes() == (adapter / name).read_bytes()


def test_wrong_base_model_is_refused_in_one_line(adapter, tmp_path, capsys):
    other = init_model("tiny", tmp_path / "other", seed=1)
    with pytest.raises(AdapterError, match="adapter made for another base model"):
        load_engine(str(other), adapter=str(adapter))
    assert main(["predict", str(ROOT / "examples" / "scene.jpg"), "--model", str(other), "--adapter", str(adapter), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "another base model" in err
    with pytest.raises(NxtrecError, match="--adapter needs --model"):
        load_engine(onnx=str(tmp_path), adapter=str(adapter))


def test_verify_checks_adapter_files(adapter, tmp_path, capsys):
    assert main(["verify", str(adapter)]) == 0
    assert "adapter: rank 8" in capsys.readouterr().out
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ADAPTER_INFO).write_text((adapter / ADAPTER_INFO).read_text())
    data = (adapter / ADAPTER_WEIGHTS).read_bytes()
    (broken / ADAPTER_WEIGHTS).write_bytes(data[: len(data) // 2])
    assert main(["verify", str(broken)]) == 1
    assert "cannot read safetensors" in capsys.readouterr().err


def test_kill_9_then_resume_gives_the_same_adapter(base, examples, tmp_path):
    """A run killed (SIGKILL) after a checkpoint, then started again, ends with the bytes of
    a run that was never interrupted."""
    args = ["teach", "--model", str(base), "--examples", str(examples / "examples.jsonl"), "--threads", "1",
            "--steps", "150", "--eval-every", "5", "--batch-size", "4", "--lr", "0.02", "--held-out", "0",
            "--patience", "1000"]  # fmt: skip
    cmd = [sys.executable, "-m", "nxtrec.cli.main", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (killed / STATE_FILE).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL and (killed / STATE_FILE).exists()
    assert main([*args, "--out", str(killed)]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    for name in (ADAPTER_WEIGHTS, ADAPTER_INFO):
        assert (killed / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_taught_labels_through_predict_tag_and_onnx(base, examples, adapter, tmp_path, capsys):
    image = str(examples / "img" / "0.jpg")
    assert main(["predict", image, "--model", str(base), "--adapter", str(adapter), "--json", "--top-k", "3"]) == 0
    assert {lab["label"] for lab in json.loads(capsys.readouterr().out)["labels"]} & TAUGHT
    out = tmp_path / "tags"
    assert main(["tag", str(examples / "img"), "--out", str(out), "--model", str(base), "--adapter", str(adapter),
                 "--top-k", "3", "-q"]) == 0  # fmt: skip
    records = [json.loads(line) for part in sorted(out.glob("*.jsonl")) for line in part.read_text().splitlines()]
    assert len(records) == 6 and all({lab["label"] for lab in r["labels"]} & TAUGHT for r in records)
    merged = tmp_path / "merged"
    assert main(["merge-adapter", "--model", str(base), "--adapter", str(adapter), "--out", str(merged)]) == 0
    assert labels_of(load_engine(str(merged)), [image]) == labels_of(load_engine(str(base), adapter=str(adapter)), [image])
    onnx = tmp_path / "onnx"
    assert main(["export-onnx", "--model", str(merged), "--out", str(onnx), "--image", image]) == 0
    assert set(labels_of(load_engine(onnx=str(onnx)), [image])[0][:2]) & TAUGHT


def test_taught_labels_through_serve(base, examples, adapter):
    """`nxtrec serve --adapter`: the service's model process loads the adapter."""
    import asyncio

    import httpx

    from nxtrec.serving.app import create_app
    from nxtrec.serving.model_process import start_engine_process

    engine = start_engine_process(model=str(base), adapter=str(adapter))

    async def tag() -> dict:
        app = create_app(engine)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                data = (examples / "img" / "0.jpg").read_bytes()
                return (await client.post("/v1/tag?top_k=3", files={"files": ("0.jpg", data, "image/jpeg")})).json()

    try:
        body = asyncio.run(tag())
    finally:
        engine.close()
    assert {lab["label"] for lab in body["results"][0]["labels"][:2]} & TAUGHT
    assert body["model"] == f"tiny+{adapter.name}"


def test_synth_renders_new_categories_as_teach_examples(tmp_path, capsys):
    from nxtrec.data.synth import CATEGORIES
    from nxtrec.training.teach_data import read_examples

    assert main(["synth", "--new-categories", "octopus,robot", "--n", "2", "--out", str(tmp_path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in rows] == [["octopus"]] * 2 + [["robot"]] * 2
    assert all(r["labels"][0] in r["objects"] for r in rows)
    assert {"octopus", "robot"}.isdisjoint(c.name for c in CATEGORIES)
    assert [ex.labels for ex in read_examples(tmp_path)] == [("octopus",)] * 2 + [("robot",)] * 2
    assert main(["synth", "--new-categories", "piano", "--n", "1", "--out", str(tmp_path)]) == 2
    assert "unknown 'piano'" in capsys.readouterr().err


def test_an_adapter_turns_off_the_base_models_own_calibration(base, examples, adapter, tmp_path):
    """The directory's calibration.json describes the base model: with --adapter, labels get
    no confidence unless a calibration file is given explicitly."""
    import shutil

    import numpy as np

    from nxtrec.evaluation.calibration import fit_calibration
    from nxtrec.inference.calibration import CALIBRATION_FILE

    model = tmp_path / "model"
    shutil.copytree(base, model)
    rng = np.random.default_rng(0)
    probs = rng.random(400) ** 4
    fitted = fit_calibration(probs, rng.random(400) < probs**0.5, np.arange(400) // 4, model_digest(model))
    (model / CALIBRATION_FILE).write_text(json.dumps(fitted.to_dict()))
    image = [str(sorted((examples / "img").glob("*.jpg"))[0])]

    def confidences(**kw):
        return [lab.confidence for lab in load_engine(str(model), **kw).predict(image, top_k=3)[0]]

    assert all(c is not None for c in confidences())
    assert confidences(adapter=str(adapter)) == [None] * 3
    explicit = confidences(adapter=str(adapter), calibration=str(model / CALIBRATION_FILE))
    assert all(c is not None for c in explicit)
    # tag decides the same before the model loads: no calibration in the manifest or records
    tags = tmp_path / "tags"
    base_args = ["tag", str(examples / "img"), "--model", str(model), "--adapter", str(adapter), "--top-k", "3"]
    assert main([*base_args, "--out", str(tags)]) == 0
    assert "confidence" not in json.loads((tags / "manifest.json").read_text())["settings"]["options"]
    assert "confidence" not in (tags / "part-00000.jsonl").read_text()
    assert main([*base_args, "--out", str(tmp_path / "refused"), "--min-confidence", "0.5"]) == 2
    assert not (tmp_path / "refused" / "part-00000.jsonl").exists()


def test_examples_from_a_label_studio_export(examples, tmp_path, monkeypatch):
    """A Label Studio JSON export as Label Studio writes it: each annotated task's choices
    (or taxonomy leaves) are its labels; images by nxtrec's id (tasks made by `nxtrec export
    labelstudio`) or by their local-file URL, relative to --image-root; unannotated, cancelled
    and empty tasks teach nothing."""
    from nxtrec.training.teach_data import read_examples

    def annotated(result, **kw):
        return {"annotations": [{"result": result, "was_cancelled": False, **kw}]}

    choices = [{"from_name": "tags", "to_name": "image", "type": "choices", "value": {"choices": ["Zorkle", "quib"]}}]
    taxonomy = [{"type": "taxonomy", "value": {"taxonomy": [["animals", "blip"]]}}]
    export = [
        {"id": 1, "data": {"image": "/data/local-files/?d=img/0.jpg", "nxtrec_id": "img/0.jpg"}, **annotated(choices)},
        {"id": 2, "data": {"image": "/data/local-files/?d=img/1%20b.jpg"}, **annotated(taxonomy)},
        {"id": 3, "data": {"image": "/data/local-files/?d=img/2.jpg"}, "annotations": []},
        {"id": 4, "data": {"image": "/data/local-files/?d=img/3.jpg"}, **annotated([])},
    ]
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export))
    got = read_examples(path, image_root=examples)
    assert [(Path(ex.image), ex.labels) for ex in got] == [
        (examples / "img/0.jpg", ("zorkle", "quib")), (examples / "img/1 b.jpg", ("blip",))]  # fmt: skip
    monkeypatch.chdir(examples)
    assert [ex.image for ex in read_examples(path)] == ["img/0.jpg", "img/1 b.jpg"]
    path.write_text(json.dumps({"tasks": []}))
    with pytest.raises(NxtrecError, match="not a Label Studio JSON export"):
        read_examples(path)


@pytest.mark.skipif(not __import__("shutil").which("exiftool"), reason="exiftool is not installed")
def test_teach_from_xmp_keywords_people_added(base, examples, tmp_path, capsys):
    """Sidecars written by exiftool (a person's keywords) and by `nxtrec tag --format xmp`:
    teach learns the person's keywords only, and the adapter says so."""
    import shutil

    photos = tmp_path / "photos"
    shutil.copytree(examples / "img", photos)
    assert main(["tag", str(photos), "--out", str(tmp_path / "tags"), "--model", str(base), "--format", "xmp",
                 "--top-k", "3"]) == 0  # fmt: skip
    for i, words in [(0, ["zorkle", "quib"]), (1, ["Quib"]), (2, ["blip"])]:
        image = photos / f"{i}.jpg"
        subprocess.run(["exiftool", "-q", "-overwrite_original", *[f"-XMP-dc:Subject+={w}" for w in words],
                        f"{image}.xmp"], check=True)  # fmt: skip
    out = tmp_path / "adapter"
    assert main(["teach", "--model", str(base), "--examples", str(photos), "--examples-from", "xmp", "--out", str(out),
                 "--steps", "2", "--eval-every", "1", "--held-out", "0", "--threads", "1"]) == 0  # fmt: skip
    info = json.loads((out / ADAPTER_INFO).read_text())
    assert info["labels"] == ["blip", "quib", "zorkle"]
    assert info["settings"]["train_examples"] == 3
    assert "taught blip, quib, zorkle" in capsys.readouterr().out
