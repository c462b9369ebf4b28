"""`nxtrec tag --format parquet` and `--format hf`, and Label Studio both ways, each read by
its real consumer: DuckDB (joined with img2dataset's parquet), pyarrow and pandas; the
Hugging Face `imagefolder` loader; label-studio-sdk's validation of the config and of every
prediction. Tiny random model, real files."""

import json
import os

import datagen
import pytest

from nxtrec.cli.main import main
from nxtrec.data.xmp import xml_text

pytestmark = pytest.mark.usefixtures("one_thread")


def _tag(model_dir, out, *args) -> int:
    return main(["tag", *map(str, args), "--out", str(out), "--model", str(model_dir), "--workers", "1", "--top-k", "3"])


def _jsonl(out) -> dict[str, dict]:
    return {r["id"]: r for part in sorted(out.glob("part-*.jsonl")) for r in map(json.loads, part.read_text().splitlines())}


def _img2dataset_parquet(tar, path) -> None:
    """The parquet img2dataset writes beside each shard: one row per sample, its json fields."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(s["json"]) for s in datagen.read_shard(tar)]
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_parts_join_img2dataset_in_duckdb_and_a_damaged_part_is_redone(tiny_model_dir, tmp_path):
    import duckdb
    import pandas as pd

    shards = tmp_path / "shards"
    keys = datagen.write_img2dataset_shard(shards / "00000.tar", 0, 3) + datagen.write_img2dataset_shard(
        shards / "00001.tar", 3, 2)  # fmt: skip
    for n in ("00000", "00001"):
        _img2dataset_parquet(shards / f"{n}.tar", shards / f"{n}.parquet")
    pattern = str(shards / "{00000..00001}.tar")
    assert _tag(tiny_model_dir, tmp_path / "pq", "--shards", pattern, "--format", "parquet", "--part-size", "2") == 0
    assert _tag(tiny_model_dir, tmp_path / "js", "--shards", pattern, "--part-size", "2") == 0
    want = _jsonl(tmp_path / "js")
    parts = str(tmp_path / "pq" / "part-*.parquet")
    rows = duckdb.sql(f"SELECT t.id, i.caption, t.labels, t.width, t.height, t.model FROM '{parts}' t "
                      f"JOIN '{shards}/*.parquet' i ON t.id = i.key ORDER BY t.id").fetchall()  # fmt: skip
    assert [r[0] for r in rows] == keys and len(list((tmp_path / "pq").glob("part-*.parquet"))) == 3
    for key, caption, labels, width, height, model in rows:
        assert caption == datagen.caption_of(int(key)) and (width, height) == (48, 36) == (want[key]["width"], want[key]["height"])
        assert [lab["label"] for lab in labels] == [lab["label"] for lab in want[key]["labels"]]
        assert [lab["prob"] for lab in labels] == pytest.approx([lab["prob"] for lab in want[key]["labels"]], rel=1e-5)
        assert model == os.path.abspath(tiny_model_dir)
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{parts}')").fetchall())
    assert types["labels"] == 'STRUCT("label" VARCHAR, prob FLOAT)[]' and types["width"] == "INTEGER"
    frame = pd.read_parquet(tmp_path / "pq" / "part-00000.parquet")
    assert list(frame["id"]) == keys[:2]
    # a part cut short on disk is redone by the rerun, the rest kept
    damaged = tmp_path / "pq" / "part-00001.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-20])
    kept = (tmp_path / "pq" / "part-00000.parquet").stat().st_mtime_ns
    assert _tag(tiny_model_dir, tmp_path / "pq", "--shards", pattern, "--format", "parquet", "--part-size", "2") == 0
    assert duckdb.sql(f"SELECT count(*) FROM '{parts}'").fetchall() == [(5,)]
    assert (tmp_path / "pq" / "part-00000.parquet").stat().st_mtime_ns == kept


def test_a_labels_confidence_passes_through_to_parquet_when_present(tmp_path):
    import duckdb

    from nxtrec.tagging.parquet_part import parquet_bytes

    records = [{"id": "a", "labels": [{"label": "dog", "prob": 0.5, "confidence": 0.25}], "width": 4, "height": 3},
               {"id": "b", "labels": [], "width": 5, "height": 2}]  # fmt: skip
    (tmp_path / "with.parquet").write_bytes(parquet_bytes(records, "m"))
    (tmp_path / "without.parquet").write_bytes(parquet_bytes([{**records[0], "labels": [{"label": "x", "prob": 0.5}]}], "m"))
    assert duckdb.sql(f"SELECT id, labels FROM '{tmp_path}/with.parquet'").fetchall() == [
        ("a", [{"label": "dog", "prob": 0.5, "confidence": 0.25}]), ("b", [])]  # fmt: skip
    types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{tmp_path}/without.parquet')").fetchall())
    assert types["labels"] == 'STRUCT("label" VARCHAR, prob FLOAT)[]'


def test_hf_metadata_loads_with_the_imagefolder_loader(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    photos = tmp_path / "photos"
    for i in range(4):
        datagen.write_image(photos / ("sub" if i == 3 else "") / f"img{i}.jpg", i, size=(40 + i, 30))
    assert _tag(tiny_model_dir, tmp_path / "out", photos, "--format", "hf") == 0
    want = {os.path.relpath(k, photos): r for k, r in _jsonl(tmp_path / "out").items()}
    ds = datasets.load_dataset("imagefolder", data_dir=str(photos), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 4 and set(ds.column_names) == {"image", "labels", "width", "height"}
    got = {}
    for row in ds:
        name = os.path.relpath(row["image"].filename, photos)
        assert row["image"].size == (row["width"], row["height"]) == (want[name]["width"], want[name]["height"])
        got[name] = [lab["label"] for lab in row["labels"]]
    assert got == {name: [lab["label"] for lab in r["labels"]] for name, r in want.items()}
    # someone else's metadata.jsonl is never overwritten
    (photos / "metadata.jsonl").write_text('{"file_name": "img0.jpg", "caption": "mine"}\n')
    assert _tag(tiny_model_dir, tmp_path / "out", photos, "--format", "hf") == 2
    assert "is not the one this tag folder wrote" in capsys.readouterr().err
    assert "mine" in (photos / "metadata.jsonl").read_text()


@pytest.mark.filterwarnings("ignore:The `dict` method is deprecated")  # inside label-studio-sdk's create_regions
@pytest.mark.parametrize("control", ["choices", "taxonomy"])
def test_label_studio_export_validates_and_the_round_trip_gives_the_labels_back(control, tiny_model_dir, tmp_path):
    from label_studio_sdk.label_interface import LabelInterface

    from nxtrec.cli.score import load_prediction_records

    photos = tmp_path / "photos"
    for i in range(3):
        datagen.write_image(photos / f"img {i}.jpg", i)
    assert _tag(tiny_model_dir, tmp_path / "out", photos) == 0
    assert main(["export", "labelstudio", str(tmp_path / "out"), "--out", str(tmp_path / "ls"), "--control", control]) == 0
    interface = LabelInterface((tmp_path / "ls" / "config.xml").read_text())
    interface.validate()
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    records = _jsonl(tmp_path / "out")
    assert [t["data"]["nxtrec_id"] for t in tasks] == list(records)
    for t in tasks:
        prediction = t["predictions"][0]
        assert interface.validate_prediction(prediction, return_errors=True) == []
        assert 0 <= prediction["score"] <= 1 and prediction["model_version"] == os.path.abspath(tiny_model_dir)
        assert t["data"]["image"].startswith("/data/local-files/?d=") and "%20" in t["data"]["image"]
    # people correct the predictions in Label Studio (the SDK makes their results); cancelled work is ignored
    export, truth = [], {}
    for n, t in enumerate(tasks):
        labels = [xml_text(lab["label"]) for lab in records[t["data"]["nxtrec_id"]]["labels"]][: n + 1]
        payload = labels if control == "choices" else {"taxonomy": [[label] for label in labels]}
        result = [json.loads(r.to_json()) for r in interface.create_regions({"tags": payload})]
        annotations = [{"id": 2 * n, "result": result, "was_cancelled": False, "updated_at": "2026-01-02T00:00:00Z"},
                       {"id": 2 * n + 1, "result": [], "was_cancelled": True, "updated_at": "2026-01-03T00:00:00Z"}]
        assert interface.validate_annotation(annotations[0])
        export.append({"id": n, "data": t["data"], "annotations": annotations, "predictions": t["predictions"]})
        truth[t["data"]["nxtrec_id"]] = labels
    export.append({"id": 99, "data": {"image": "x.jpg"}, "annotations": []})  # not annotated yet: left out
    (tmp_path / "export.json").write_text(json.dumps(export))
    assert main(["import", "labelstudio", str(tmp_path / "export.json"), "--out", str(tmp_path / "gt.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "gt.jsonl").read_text().splitlines()]
    assert rows == [{"image": image, "gt": labels} for image, labels in truth.items()]
    part = str(next((tmp_path / "out").glob("part-*.jsonl")))
    assert {r["image"]: r["gt"] for r in load_prediction_records(part, str(tmp_path / "gt.jsonl"))} == truth
