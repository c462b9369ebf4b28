"""The Arrow contract of the Ray and Spark adapters without a cluster: an ONNX export (the
torch-free workers' engine) gives the records of `nxtrec tag --onnx`, and a bad column is
one clear error. The adapters' own tests run real Ray and PySpark."""

from __future__ import annotations

import json

import datagen
import pyarrow as pa
import pytest

from nxtrec.cli.main import main
from nxtrec.integrations.arrow import ArrowTagger, IntegrationError, TaggerConfig
from nxtrec.tagging.output import read_records

pytestmark = pytest.mark.usefixtures("one_thread")


def test_onnx_engine_gives_the_records_of_tag_onnx(tiny_onnx_export, tmp_path):
    paths = [datagen.write_image(tmp_path / "imgs" / f"{i:02d}.jpg", i, size=(30 + i, 20 + 2 * i)) for i in range(12)]
    paths.append(datagen.corrupt_jpeg(tmp_path / "imgs" / "99.jpg"))
    assert main(["tag", str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--onnx", str(tiny_onnx_export),
                 "--top-k", "3", "--workers", "1"]) == 1  # fmt: skip
    want = {r["id"]: r for r in read_records(tmp_path / "out")}
    table = pa.table({"key": [str(p) for p in paths], "jpg": [p.read_bytes() for p in paths]})
    tagger = ArrowTagger(TaggerConfig.of(onnx=str(tiny_onnx_export), image_column="jpg", id_column="key", top_k=3,
                                         batch_size=5))  # fmt: skip
    rows = tagger.tag_table(table).to_pylist()
    assert [r["key"] for r in rows] == [str(p) for p in paths] and "jpg" not in rows[0]
    for row in rows[:-1]:
        record = want[row["key"]]
        assert [x["label"] for x in row["labels"]] == [x["label"] for x in record["labels"]]
        assert [x["prob"] for x in row["labels"]] == pytest.approx([x["prob"] for x in record["labels"]], rel=1e-4)
        assert (row["width"], row["height"], row["error"]) == (record["width"], record["height"], None)
    bad = rows[-1]
    assert bad["labels"] is None and bad["error"].startswith(f"{paths[-1]}: cannot decode image")
    error = json.loads((tmp_path / "out" / "errors.jsonl").read_text())["reason"]
    assert bad["error"] == error


def test_bad_columns_are_one_clear_error(tiny_onnx_export):
    tagger = ArrowTagger(TaggerConfig.of(onnx=str(tiny_onnx_export), image_column="img", top_k=2))
    with pytest.raises(IntegrationError, match=r"no column 'img' \(image_column\) among \['x'\]"):
        tagger.tag_table(pa.table({"x": [1]}))
    with pytest.raises(IntegrationError, match="column 'img' is int64: it must hold image bytes"):
        tagger.tag_table(pa.table({"img": [1]}))
    with pytest.raises(IntegrationError, match="the input already has a column 'labels'"):
        tagger.tag_table(pa.table({"img": [b""], "labels": ["a"]}))
    rows = tagger.tag_table(pa.table({"img": pa.array([None, b"not an image"], pa.binary())})).to_pylist()
    assert [r["error"] for r in rows] == ["row 0: no image in this sample", "row 1: not an image or an unsupported format"]
    with pytest.raises(IntegrationError, match="maps=True is not supported"):
        TaggerConfig.of(maps=True).decode_options()
    with pytest.raises(TypeError, match="unknown decoding option 'topk'"):
        TaggerConfig.of(topk=3).decode_options()
