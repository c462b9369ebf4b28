"""Packing real small datasets into real WebDataset shards: the four sources, skipped
records, re-encoding, determinism, resuming a killed run, and `labels add` on img2dataset
shards."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import datagen
import pytest
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.data.pack import PackOptions, pack
from nxtrec.data.relabel import add_labels
from nxtrec.data.shards import read_manifest
from nxtrec.data.sources import (
    Record,
    coco_records,
    folder_records,
    jsonl_records,
    openimages_records,
)
from nxtrec.errors import NxtrecError


def all_samples(folder: Path) -> list[dict]:
    return [s for tar in sorted(folder.glob("*.tar")) for s in datagen.read_shard(tar)]


def meta(sample: dict) -> dict:
    return json.loads(sample["json"])


def test_pack_coco(tmp_path, capsys):
    images, captions = datagen.make_coco(tmp_path / "coco", 12, corrupt=(3,), no_noun=(5,), missing=(7,))
    out = tmp_path / "shards"
    args = ["pack", "coco", "--images", str(images), "--captions", str(captions), "--out", str(out)]
    assert main(args + ["--shard-size", "5", "--workers", "1", "--no-progress"]) == 0
    report = capsys.readouterr().out
    assert "wrote 10 samples into 3 shards" in report
    assert "bad image: 1" in report and "missing image: 1" in report

    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar", "000002.tar"]
    assert not list(out.glob("*.tmp"))
    samples = all_samples(out)
    keys = [s["__key__"] for s in samples]
    assert keys == [f"{i + 1:012d}" for i in range(12) if i not in (3, 7)]  # sorted, skips gone

    first = samples[0]
    assert first["jpg"] == (images / "000000000001.jpg").read_bytes()  # copied as is
    caption = "A man riding a horse on a beach at sunset. Another view number 0."  # captions joined
    assert first["txt"].decode() == caption
    assert meta(first) == {
        "caption": caption,
        "source": "000000000001.jpg",
        "split": "val2017",
        "labels": ["man", "horse", "beach", "sunset", "view", "number"],
    }
    no_noun = next(s for s in samples if s["__key__"] == "000000000006")
    assert meta(no_noun)["labels"] == []  # kept; the loader decides

    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["labels"]["setting"] == "spacy"
    assert [e["samples"] for e in manifest["shards"].values()] == [4, 4, 2]
    assert manifest["shards"]["000000.tar"]["skipped"] == {"bad image": 1}
    assert all(e["bytes"] == (out / n).stat().st_size for n, e in manifest["shards"].items())


def test_pack_openimages_joins_narratives_of_an_image(tmp_path):
    images, narratives = datagen.make_narratives(tmp_path / "oi", 4)
    records = openimages_records(images, narratives)
    assert len(records) == 4
    out = tmp_path / "shards"
    summary = pack(records, out, "openimages", "validation", PackOptions(shard_size=10), progress=False)
    assert summary.written == 4 and not summary.skipped
    by_key = {s["__key__"]: meta(s) for s in all_samples(out)}
    first_id = f"{4096:016x}"
    joined = "A man riding a horse on a beach at sunset. In this picture we can see a bird."
    assert by_key[first_id]["caption"] == joined
    # the narrative's framing "In this picture" gives no label (data/label_filters.py)
    assert by_key[first_id]["labels"] == ["man", "horse", "beach", "sunset", "bird"]
    assert by_key[first_id]["source"] == f"{first_id}.jpg"


def test_cli_split_defaults_from_file_names(tmp_path):
    images, narratives = datagen.make_narratives(tmp_path / "oi", 2)
    out = tmp_path / "shards"
    assert main(["pack", "openimages", "--images", str(images), "--narratives", str(narratives),
                 "--out", str(out), "--workers", "1", "--no-progress"]) == 0  # fmt: skip
    assert {meta(s)["split"] for s in all_samples(out)} == {"validation"}


def test_pack_jsonl_and_resize(tmp_path):
    root = tmp_path / "j"
    datagen.write_image(root / "big.jpg", 1, size=(200, 100))
    datagen.write_image(root / "small.png", 2, size=(40, 30), fmt="PNG")
    datagen.write_image(root / "anim.gif", 3, size=(50, 40), fmt="GIF")
    lines = [
        {"image": "big.jpg", "caption": "a big dog"},
        {"image": str(root / "small.png"), "caption": "a small cat", "key": "cat.small"},
        {"image": "anim.gif", "caption": "a bird"},
    ]
    (root / "list.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    records = jsonl_records(root / "list.jsonl")
    assert [r.key for r in records] == ["000000001", "cat_small", "000000003"]
    out = tmp_path / "shards"
    pack(records, out, "jsonl", options=PackOptions(resize_shorter=64), progress=False)
    samples = {s["__key__"]: s for s in all_samples(out)}
    big = Image.open(io.BytesIO(samples["000000001"]["jpg"]))
    assert big.format == "JPEG" and big.size == (128, 64)  # shorter side capped
    assert samples["cat_small"]["png"] == (root / "small.png").read_bytes()  # not bigger: kept as is
    assert "jpg" in samples["000000003"]  # GIF is not a loader format: re-encoded
    assert Image.open(io.BytesIO(samples["000000003"]["jpg"])).size == (50, 40)


def test_pack_folder(tmp_path):
    root = datagen.make_folder(tmp_path / "f", 4)
    records = folder_records(root)
    assert sorted(r.key for r in records) == ["a_photo_1", "a_photo_3", "b_photo_0", "b_photo_2", "b_uncaptioned"]
    out = tmp_path / "shards"
    summary = pack(records, out, "folder", progress=False)
    assert summary.written == 4 and summary.skipped == {"no caption": 1}
    samples = {s["__key__"]: s for s in all_samples(out)}
    assert "png" in samples["b_photo_0"] and "jpg" in samples["a_photo_1"]
    assert meta(samples["a_photo_1"])["source"] == "a/photo.1.jpg"
    assert samples["a_photo_1"]["txt"].decode() == "Two dogs playing with a ball in the grass."


def test_duplicate_keys_are_refused(tmp_path):
    records = [Record("k", "a.jpg", "a dog", "a.jpg"), Record("k", "b.jpg", "a cat", "b.jpg")]
    with pytest.raises(NxtrecError, match="share a key"):
        pack(records, tmp_path / "out", "jsonl", progress=False)


def test_packing_is_deterministic_across_runs_and_worker_counts(tmp_path):
    images, captions = datagen.make_coco(tmp_path / "coco", 9, corrupt=(2,))
    records = coco_records(images, captions)
    pack(records, tmp_path / "one", "coco", options=PackOptions(shard_size=3), workers=1, progress=False)
    pack(records, tmp_path / "two", "coco", options=PackOptions(shard_size=3), workers=2, progress=False)
    for tar in sorted((tmp_path / "one").glob("*.tar")):
        assert tar.read_bytes() == (tmp_path / "two" / tar.name).read_bytes()
    assert read_manifest(tmp_path / "one")["shards"] == read_manifest(tmp_path / "two")["shards"]


def test_rerun_with_other_options_is_refused(tmp_path):
    images, captions = datagen.make_coco(tmp_path / "coco", 4)
    records = coco_records(images, captions)
    pack(records, tmp_path / "out", "coco", options=PackOptions(shard_size=2), progress=False)
    with pytest.raises(NxtrecError, match="other inputs or options"):
        pack(records, tmp_path / "out", "coco", options=PackOptions(shard_size=3), progress=False)
    with pytest.raises(NxtrecError, match="other inputs or options"):
        pack(records[:3], tmp_path / "out", "coco", options=PackOptions(shard_size=2), progress=False)
    with pytest.raises(NxtrecError, match="labels 'spacy'"):
        pack(records, tmp_path / "out", "coco", options=PackOptions(shard_size=2, compat=True), progress=False)


PACK_BLOCKING_ON_PIPES = """
import os, stat, sys
import nxtrec.data.pack as pack
encode = pack.encode_image
def read_pipes_first(path, *args):
    if stat.S_ISFIFO(os.stat(path).st_mode):
        open(path, "rb").read()  # no writer: blocks until the process is killed
    return encode(path, *args)
pack.encode_image = read_pipes_first
from nxtrec.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_killed_pack_is_finished_by_rerunning(tmp_path):
    """A real `nxtrec pack` process is killed (SIGKILL) while it writes its third shard: it
    blocks reading an image that is a named pipe (nxtrec itself refuses pipes, so the run
    goes through a wrapper that reads it first). The re-run keeps the two finished shards
    untouched and writes the rest."""
    root = tmp_path / "j"
    jsonl = datagen.make_jsonl(root, 10, fifo_at=7)  # shards of 3: the pipe is in shard 2
    out = tmp_path / "shards"
    cmd = [sys.executable, "-c", PACK_BLOCKING_ON_PIPES, "pack", "jsonl", str(jsonl), "--out", str(out),
           "--shard-size", "3", "--workers", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / "000002.tar.tmp").exists() or len((read_manifest(out) or {}).get("shards", {})) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "pack did not reach the third shard"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert not read_manifest(out)["complete"]
    before = {name: (out / name).stat() for name in ("000000.tar", "000001.tar")}

    fifo = root / "img" / "0007.jpg"
    fifo.unlink()
    datagen.write_image(fifo, 207)
    assert main(cmd[3:]) == 0

    for name, st in before.items():
        now = (out / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)  # not rewritten
    assert sorted(p.name for p in out.glob("*.tar")) == [f"{i:06d}.tar" for i in range(4)]
    assert not list(out.glob("*.tmp"))
    keys = [s["__key__"] for s in all_samples(out)]
    assert keys == [f"{i:09d}" for i in range(1, 11)]  # every record exactly once
    assert read_manifest(out)["complete"]


def test_labels_add_in_place_and_elsewhere(tmp_path, capsys):
    src = tmp_path / "cc3m"
    keys = datagen.write_img2dataset_shard(src / "00000.tar", 0, 4) + datagen.write_img2dataset_shard(
        src / "00001.tar", 4, 3, bad_json_at=5
    )
    (src / "00000_stats.json").write_text("{}")  # img2dataset's side files stay untouched
    originals = {p.name: datagen.read_shard(p) for p in sorted(src.glob("*.tar"))}

    # into another folder: the originals are not modified
    out = tmp_path / "labelled"
    summary = add_labels(src, out, workers=2, progress=False)
    assert summary.written == 7 and summary.skipped == {"bad json (replaced)": 1}
    assert {p.name: datagen.read_shard(p) for p in sorted(src.glob("*.tar"))} == originals
    samples = all_samples(out)
    assert [s["__key__"] for s in samples] == keys
    for s in samples:
        old = next(o for o in originals[s["__url__"].rsplit("/", 1)[1]] if o["__key__"] == s["__key__"])
        assert s["jpg"] == old["jpg"] and s["txt"] == old["txt"]  # other members byte for byte
        assert meta(s)["labels"] == [] or meta(s)["labels"][0] in s["txt"].decode().lower()
    first = meta(samples[0])
    assert first["url"] == "http://example.com/0.jpg" and first["labels"] == ["man", "horse", "beach", "sunset"]
    assert meta(samples[5]) == {"labels": ["plate", "food", "fork", "knife"]}  # unreadable json replaced
    manifest = read_manifest(out)
    assert manifest["complete"] and manifest["shards"]["00001.tar"]["samples"] == 3

    # in place, through the CLI; a second run has nothing to do
    assert main(["labels", "add", str(src), "--workers", "1", "--no-progress"]) == 0
    assert "labelled 7 samples into 2 shards" in capsys.readouterr().out
    assert [meta(s)["labels"] for s in all_samples(src)] == [meta(s)["labels"] for s in samples]
    stat = (src / "00000.tar").stat()
    assert main(["labels", "add", str(src), "--workers", "1", "--no-progress"]) == 0
    assert "2 of 2 shards were already finished" in capsys.readouterr().out
    assert (src / "00000.tar").stat().st_mtime_ns == stat.st_mtime_ns
    assert not list(src.glob("*.tmp"))


def test_labels_add_with_another_setting_relabels(tmp_path):
    images, captions = datagen.make_coco(tmp_path / "coco", 3)
    out = tmp_path / "shards"
    pack(coco_records(images, captions), out, "coco", "val2017", progress=False)
    assert add_labels(out, compat=True, progress=False).written == 3
    assert read_manifest(out)["labels"]["setting"] == "spacy+compat"
    sample = next(s for s in all_samples(out) if s["__key__"] == "000000000002")
    assert meta(sample)["labels"] == ["dog", "ball", "grass", "view", "number"]
    assert meta(sample)["split"] == "val2017"  # the other fields are kept


def test_no_records_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["pack", "folder", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no records" in capsys.readouterr().err
