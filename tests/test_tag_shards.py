"""`nxtrec tag --shard-id I --num-shards N` and `nxtrec tag --merge OUT`: three shards plus
the merge give the records of one run, each shard resumes on its own, and a missing,
doubled, unfinished or damaged shard is one line each. Tiny random model, real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datagen
import duckdb
import pytest

from nxtrec.cli.main import main
from nxtrec.tagging.output import read_records
from nxtrec.tagging.split import shard_inputs

pytestmark = pytest.mark.usefixtures("one_thread")
OPTIONS = ("--top-k", "3", "--part-size", "4", "--workers", "1")


def _tag(model_dir, out: Path, images: Path, *args) -> int:
    return main(["tag", str(images), "--out", str(out), "--model", str(model_dir), *OPTIONS, *args])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("imgs")
    for i in range(21):
        datagen.write_image(folder / f"img{i:02d}.jpg", i, size=(30 + i, 24 + 2 * i))
    datagen.corrupt_jpeg(folder / "img99-bad.jpg")
    return folder


def test_shard_inputs_take_every_nth_part():
    assert shard_inputs(list(range(10)), 2, 1, 3) == [2, 3, 8, 9]
    assert sorted(x for i in range(3) for x in shard_inputs(list(range(10)), 2, i, 3)) == list(range(10))
    assert shard_inputs(list(range(3)), 4, 2, 3) == []  # more shards than parts: an empty shard


def test_three_shards_and_merge_equal_one_run(tiny_model_dir, images, tmp_path, capsys):
    assert _tag(tiny_model_dir, tmp_path / "one", images) == 1  # the bad image
    out = tmp_path / "sharded"
    for i in range(3):
        _tag(tiny_model_dir, out, images, "--shard-id", str(i), "--num-shards", "3")
    assert sorted(p.name for p in out.iterdir()) == [f"shard-0000{i}-of-00003" for i in range(3)]
    assert main(["tag", "--merge", str(out)]) == 0
    assert "3 shards, 22 images (21 tagged, 1 failed)" in capsys.readouterr().err
    one = sorted(read_records(tmp_path / "one"), key=lambda r: r["id"])
    merged = sorted(read_records(out), key=lambda r: r["id"])
    assert [(r["id"], r["width"], [x["label"] for x in r["labels"]]) for r in merged] == [
        (r["id"], r["width"], [x["label"] for x in r["labels"]]) for r in one]  # fmt: skip
    probs = [x["prob"] for r in one for x in r["labels"]]  # equal up to float batching effects
    assert [x["prob"] for r in merged for x in r["labels"]] == pytest.approx(probs, rel=1e-5)
    # DuckDB reads the shards' part files as one table
    got = duckdb.sql(f"select id from read_json_auto('{out}/shard-*/part-*.jsonl') order by id").fetchall()
    assert [g[0] for g in got] == [r["id"] for r in one]
    assert [json.loads(line)["id"] for line in (out / "errors.jsonl").read_text().splitlines()] == [
        str(images / "img99-bad.jpg")]  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == 22 and [s["id"] for s in manifest["shards"]] == [0, 1, 2]


def test_a_shard_resumes_on_its_own(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert _tag(tiny_model_dir, out, images, "--shard-id", "1", "--num-shards", "3") == 0
    folder = out / "shard-00001-of-00003"
    (folder / "part-00001.jsonl").unlink()  # as if killed before its last part
    assert _tag(tiny_model_dir, out, images, "--shard-id", "1", "--num-shards", "3") == 0
    assert "this run: 4 images" in capsys.readouterr().err  # only the lost part again
    code = _tag(tiny_model_dir, out, images, "--shard-id", "1", "--num-shards", "4")
    assert code == 1 and (out / "shard-00001-of-00004").is_dir()  # another count: another folder (with the bad image)


def test_merge_reports_each_problem_in_one_line(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    for i in (0, 2):
        _tag(tiny_model_dir, out, images, "--shard-id", str(i), "--num-shards", "4")
    _tag(tiny_model_dir, out, images, "--shard-id", "0", "--num-shards", "2")
    part = out / "shard-00002-of-00004" / "part-00000.jsonl"
    part.write_text(" " + part.read_text())  # still valid JSON lines, other bytes
    capsys.readouterr()
    assert main(["tag", "--merge", str(out)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        (f"nxtrec tag: error: {out / 'shard-00000-of-00002'}: of --num-shards 2, the others of 4: its images are "
         "duplicated there; remove the folders of one run"),
        f"nxtrec tag: error: shard 1 of 4: missing (no {out / 'shard-00001-of-00004'}): run its job",
        "nxtrec tag: error: shard 2 of 4: part-00000.jsonl gone or damaged: rerun its job to redo them",
        f"nxtrec tag: error: shard 3 of 4: missing (no {out / 'shard-00003-of-00004'}): run its job",
    ]
    assert not (out / "manifest.json").exists()
    shutil.rmtree(out / "shard-00000-of-00002")
    assert _tag(tiny_model_dir, out, images, "--shard-id", "2", "--num-shards", "4") == 0  # redoes the part
    for i in (1, 3):
        _tag(tiny_model_dir, out, images, "--shard-id", str(i), "--num-shards", "4")
    assert main(["tag", "--merge", str(out)]) == 0


def test_shard_options_are_checked(tiny_model_dir, images, tmp_path, capsys):
    assert _tag(tiny_model_dir, tmp_path / "o", images, "--shard-id", "3", "--num-shards", "3") == 2
    assert _tag(tiny_model_dir, tmp_path / "o", images, "--shard-id", "1") == 2
    assert main(["tag", str(images), "--merge", str(tmp_path)]) == 2
    assert main(["tag", str(images)]) == 2
    assert _tag(tiny_model_dir, tmp_path / "o", images, "--shard-id", "0", "--num-shards", "2", "--format", "hf") == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["nxtrec tag: error: --shard-id must be from 0 to 2 (--num-shards 3)",
                   "nxtrec tag: error: --shard-id and --num-shards go together",
                   "nxtrec tag: error: --merge OUT takes no inputs and no --out",
                   "nxtrec tag: error: --out is required (or --merge OUT)",
                   "nxtrec tag: error: --format hf writes one metadata.jsonl for the whole collection: tag it "
                   "without --num-shards, or shard with --format jsonl, csv or parquet"]  # fmt: skip
    assert not (tmp_path / "o").exists()  # refused before anything is written
