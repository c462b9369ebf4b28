"""`nxtrec tag`: records equal `nxtrec predict`, bad inputs in errors.jsonl, selection, CSV,
shards, option changes refused, resume after SIGKILL, torchrun. Tiny random model, real
image files, real processes."""

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import datagen
import numpy as np
import pytest
from processes import processes_naming

from nxtrec.cli.main import main
from nxtrec.inference.recognizer import Recognizer
from nxtrec.tagging.pipeline import tag_images

VENV_BIN = Path(sys.executable).parent
# One compute thread: the tiny model's small kernels gain nothing from more, and on a busy
# machine waiting for a second thread makes them many times slower.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _collection(folder: Path, n: int = 9) -> Path:
    """n real images of varied sizes and formats (one in a subfolder), one corrupt JPEG."""
    for i in range(n):
        sub = folder / "sub" if i == n - 1 else folder
        datagen.write_image(sub / f"img{i:02d}.{'png' if i % 3 == 0 else 'jpg'}", i, size=(40 + 3 * i, 30 + 5 * i),
                            fmt="PNG" if i % 3 == 0 else "JPEG")  # fmt: skip
    datagen.corrupt_jpeg(folder / "img99-corrupt.jpg")
    return folder


def _tag(model_dir, out, *args) -> int:
    return main(["tag", *map(str, args), "--out", str(out), "--model", str(model_dir), "--workers", "1"])


def _records(out: Path) -> list[dict]:
    """All records in part order; every id at most once."""
    recs = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    assert len({r["id"] for r in recs}) == len(recs)
    return recs


def _errors(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]


def _assert_same_labels(got: list[dict], want: list[dict]) -> None:
    """Same labels in the same order; probabilities equal up to float batching effects."""
    assert [x["label"] for x in got] == [x["label"] for x in want]
    assert [x["prob"] for x in got] == pytest.approx([x["prob"] for x in want], rel=1e-5)


def test_records_equal_predict_and_bad_inputs_go_to_errors(tiny_model_dir, tmp_path, capsys):
    images = _collection(tmp_path / "imgs")
    listing = tmp_path / "list.txt"
    extra = datagen.write_image(tmp_path / "extra.jpg", 50)
    listing.write_text(f"{extra}\n{tmp_path / 'missing.jpg'}\n")
    out = tmp_path / "out"
    code = _tag(tiny_model_dir, out, images, "--list", listing, "--top-k", "4", "--batch-size", "3", "--part-size", "4")
    assert code == 1  # some images failed
    assert "12 images (10 tagged, 2 failed)" in capsys.readouterr().err
    recs = _records(out)
    files = sorted(str(p) for p in images.rglob("img0*"))
    assert [r["id"] for r in recs] == files + [str(extra)]
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl"]
    assert {e["id"] for e in _errors(out)} == {str(images / "img99-corrupt.jpg"), str(tmp_path / "missing.jpg")}
    assert all(e["reason"].startswith(e["id"]) for e in _errors(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["failed"] == 2
    assert manifest["settings"]["options"]["top_k"] == 4 and manifest["this_run"]["images"] == 12
    assert (recs[0]["width"], recs[0]["height"]) == (40, 30)
    # labels and probabilities equal `nxtrec predict` for the same images and options
    assert main(["predict", *files, str(extra), "--model", str(tiny_model_dir), "--top-k", "4", "--json"]) == 0
    predicted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for rec, pred in zip(recs, predicted):
        assert rec["id"] == pred["image"]
        _assert_same_labels(rec["labels"], pred["labels"])


def test_min_prob_max_labels_and_csv(tiny_model_dir, tmp_path):
    images = _collection(tmp_path / "imgs", n=4)
    assert _tag(tiny_model_dir, tmp_path / "all", images, "--top-k", "5") == 1
    full = _records(tmp_path / "all")
    probs = sorted(lab["prob"] for r in full for lab in r["labels"])
    threshold = probs[len(probs) // 2]
    args = ["--top-k", "5", "--min-prob", repr(threshold), "--max-labels", "2"]
    assert _tag(tiny_model_dir, tmp_path / "cut", images, *args) == 1
    cut = _records(tmp_path / "cut")
    for a, b in zip(full, cut):
        assert b["labels"] == [lab for lab in a["labels"] if lab["prob"] >= threshold][:2]
    assert any(len(r["labels"]) < 2 for r in cut) and any(len(r["labels"]) == 2 for r in cut)
    assert _tag(tiny_model_dir, tmp_path / "csv", images, *args, "--format", "csv") == 1
    with open(tmp_path / "csv" / "part-00000.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "label", "prob"]
    # an image left without labels has one row with an empty label (docs/tag.md, CSV)
    want = [[[r["id"], lab["label"], repr(lab["prob"])] for lab in r["labels"]] or [[r["id"], "", ""]] for r in cut]
    assert rows[1:] == [row for rows_of_one in want for row in rows_of_one]


def test_shards_input_uses_sample_keys(tiny_model_dir, tmp_path):
    keys = datagen.write_img2dataset_shard(tmp_path / "shards" / "00000.tar", 0, 3)
    keys += datagen.write_img2dataset_shard(tmp_path / "shards" / "00001.tar", 3, 2)
    for i, key in enumerate(keys):  # the same images as files
        (tmp_path / "files").mkdir(exist_ok=True)
        (tmp_path / "files" / f"{key}.jpg").write_bytes(datagen.image_bytes(i))
    import webdataset as wds

    with wds.TarWriter(str(tmp_path / "shards" / "00002.tar"), encoder=False) as w:
        w.write({"__key__": "caption-only", "txt": b"a sample without an image"})
    pattern = str(tmp_path / "shards" / "{00000..00002}.tar")
    assert _tag(tiny_model_dir, tmp_path / "out", "--shards", pattern, "--top-k", "3", "--batch-size", "5") == 1
    recs = _records(tmp_path / "out")
    assert [r["id"] for r in recs] == keys
    assert _errors(tmp_path / "out") == [{"id": "caption-only", "reason": "caption-only: no image in this sample"}]
    # one more shard: --update tags its samples only (the sample without an image is not retried)
    more = datagen.write_img2dataset_shard(tmp_path / "shards" / "00003.tar", 5, 2)
    grown = str(tmp_path / "shards" / "{00000..00003}.tar")
    before = _part_bytes(tmp_path / "out")
    assert _tag(tiny_model_dir, tmp_path / "out", "--shards", grown, "--top-k", "3", "--batch-size", "5", "--update") == 1
    assert _manifest(tmp_path / "out")["this_run"]["images"] == 2
    assert {k: v for k, v in _part_bytes(tmp_path / "out").items() if k in before} == before
    assert [r["id"] for r in _records(tmp_path / "out")] == keys + more
    assert _tag(tiny_model_dir, tmp_path / "ref", tmp_path / "files", "--top-k", "3", "--batch-size", "5") == 0
    for rec, ref in zip(recs, _records(tmp_path / "ref")):
        assert (rec["width"], rec["height"]) == (ref["width"], ref["height"]) == (48, 36)
        assert rec["labels"] == ref["labels"]


def test_list_from_stdin_and_globs(tiny_model_dir, tmp_path, monkeypatch):
    images = _collection(tmp_path / "imgs", n=4)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{images / 'img01.jpg'}\n\n{images / 'img02.jpg'}\n"))
    assert _tag(tiny_model_dir, tmp_path / "out", str(images / "*.png"), "--list", "-", "--top-k", "2") == 0
    assert [r["id"] for r in _records(tmp_path / "out")] == [str(images / n) for n in ("img00.png", "img01.jpg", "img02.jpg")]


def test_other_options_are_refused_unless_overwrite_and_a_rerun_resumes(tiny_model_dir, tmp_path, capsys):
    images = _collection(tmp_path / "imgs", n=3)
    out = tmp_path / "out"
    assert _tag(tiny_model_dir, out, images, "--top-k", "3") == 1
    first = _records(out)
    capsys.readouterr()
    assert _tag(tiny_model_dir, out, images, "--top-k", "4") == 2
    err = capsys.readouterr().err
    assert "options.top_k 3 -> 4" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--batch-size", "2") == 1  # speed options may change
    assert "this run: 0 images" in capsys.readouterr().err
    assert _records(out) == first
    assert _tag(tiny_model_dir, out, images, "--top-k", "4", "--overwrite") == 1
    assert all(len(r["labels"]) <= 4 for r in _records(out)) and len(_records(out)) == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert _tag(tiny_model_dir, tmp_path / "other", images) == 2
    assert "not an nxtrec tag folder" in capsys.readouterr().err


def test_python_api_yields_results_in_order(tiny_model_dir, tmp_path):
    images = _collection(tmp_path / "imgs", n=4)
    paths = [str(p) for p in sorted(images.glob("*.*"))]
    rec = Recognizer.from_pretrained(tiny_model_dir)
    results = list(tag_images(rec, iter(paths), top_k=3, batch_size=2, num_workers=1))
    assert [r.id for r in results] == paths
    assert results[-1].labels is None and "img99-corrupt.jpg" in results[-1].error
    expected = rec.predict(paths[:-1], top_k=3, batch_size=2)
    for r, labels in zip(results, expected):
        _assert_same_labels([lab.to_dict() for lab in r.labels], [lab.to_dict() for lab in labels])


def _cli(*args) -> list[str]:
    return [str(VENV_BIN / "nxtrec"), "tag", *map(str, args)]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path):
    images = _collection(tmp_path / "imgs", n=40)
    args = [images, "--model", tiny_model_dir, "--top-k", "3", "--batch-size", "2", "--part-size", "3", "--workers", "1"]
    assert main(["tag", *map(str, args), "--out", str(tmp_path / "ref")]) == 1
    num_parts = len(list((tmp_path / "ref").glob("part-*")))
    out = tmp_path / "out"
    rng = random.Random(0)
    killed_midway = 0
    for _ in range(2):
        before = len(list(out.glob("part-*"))) if out.exists() else 0
        proc = subprocess.Popen(_cli(*args, "--out", out), stderr=subprocess.DEVNULL, env=ONE_THREAD_ENV)
        deadline = time.monotonic() + 120
        while proc.poll() is None and len(list(out.glob("part-*"))) <= before and time.monotonic() < deadline:
            time.sleep(0.02)  # wait for this run's first part, then kill at a random moment
        time.sleep(rng.uniform(0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_midway += len(list(out.glob("part-*"))) < num_parts
    assert killed_midway >= 1
    left = processes_naming(str(out), wait=10.0)  # no process of the killed run (its decoding workers)
    assert not left, f"processes left behind: {left}"
    assert subprocess.run(_cli(*args, "--out", out), check=False, stderr=subprocess.DEVNULL, env=ONE_THREAD_ENV).returncode == 1
    assert _records(out) == _records(tmp_path / "ref")
    assert _errors(out) == _errors(tmp_path / "ref")
    assert json.loads((out / "manifest.json").read_text())["counts"] == json.loads(
        (tmp_path / "ref" / "manifest.json").read_text())["counts"]  # fmt: skip
    assert not list(out.glob("*.tmp")) and not list((out / ".tag").glob("*.tmp"))


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "--processes"])
def test_two_processes_give_the_records_of_one(launcher, tiny_model_dir, tmp_path):
    images = _collection(tmp_path / "imgs", n=7)
    args = [images, "--model", tiny_model_dir, "--top-k", "3", "--batch-size", "2", "--part-size", "2", "--workers", "1"]
    assert main(["tag", *map(str, args), "--out", str(tmp_path / "one")]) == 1
    if launcher == "torchrun":
        cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "nxtrec.cli.main", "tag",
               *map(str, args), "--out", str(tmp_path / "two")]  # fmt: skip
        subprocess.run(cmd, check=False, capture_output=True, timeout=300, env=ONE_THREAD_ENV)  # exit code 1: the corrupt image
    else:  # nxtrec starts the two ranks itself; exit code 1: the corrupt image
        assert main(["tag", *map(str, args), "--out", str(tmp_path / "two"), "--processes", "2"]) == 1
    one, two = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert [r["id"] for r in two] == [r["id"] for r in one]
    for a, b in zip(one, two):
        _assert_same_labels(b["labels"], a["labels"])
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["status"] == "complete"
    assert manifest["counts"] == json.loads((tmp_path / "one" / "manifest.json").read_text())["counts"]
    assert _errors(tmp_path / "two") == _errors(tmp_path / "one")


def _loader(tmp_path, n: int = 11):
    from nxtrec.model.image import CLIP_MEAN, CLIP_STD
    from nxtrec.inference.engine import Preprocessing
    from nxtrec.tagging.inputs import InputItem
    from nxtrec.tagging.pipeline import batch_ranges
    from nxtrec.tagging.prefetch import BatchDecoder

    files = sorted(str(p) for p in _collection(tmp_path / "imgs", n).rglob("*.*"))
    items = [InputItem(f, f) for f in files]
    return BatchDecoder(items, batch_ranges(0, len(items), 2), Preprocessing(32, CLIP_MEAN, CLIP_STD))


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_loader_reuses_its_batch_buffers_without_mixing_batches(workers, tmp_path):
    # 12 inputs in batches of 2 through a ring of 2 * workers + 1 slots: slots are reused
    # while later batches are being decoded, and each batch must still be its own images.
    from nxtrec.model.image import load_image, preprocess_array
    from nxtrec.tagging.prefetch import prefetched_batches

    decoder = _loader(tmp_path)
    seen = []
    for batch in prefetched_batches(decoder, workers):
        good = [d for d in batch.items if d.error is None]
        want = [preprocess_array(load_image(decoder.items[d.index].source), 32) for d in good]
        assert batch.pixels is not None and np.array_equal(batch.pixels, np.stack(want))
        seen += [d.index for d in batch.items]
    assert seen == list(range(12))
    batch = next(prefetched_batches(decoder, workers))
    assert isinstance(batch.pixels, np.ndarray) and batch.pixels.shape == (2, 3, 32, 32)


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling policies")
def test_decoding_workers_keep_the_normal_priority(tmp_path, monkeypatch):
    """At SCHED_IDLE (or a high nice value) any busy process starved the workers: `tag` ran at
    2 images/s beside one busy loop on one core, where `predict` ran at 70 (docs/tag.md)."""
    from nxtrec.tagging import prefetch
    from nxtrec.tagging.decode import Decoded

    def where(i, *args, **kwargs):  # runs in the forked worker: report its scheduling
        return Decoded(i, error=f"{os.sched_getscheduler(0)} {os.getpriority(os.PRIO_PROCESS, 0)}")

    monkeypatch.setattr(prefetch, "decode", where)
    batch = next(prefetch.prefetched_batches(_loader(tmp_path), 1))
    here = f"{os.sched_getscheduler(0)} {os.getpriority(os.PRIO_PROCESS, 0)}"
    assert {d.error for d in batch.items} == {here} and here.startswith(f"{os.SCHED_OTHER} ")


def test_a_dying_decoding_worker_is_a_one_line_error(tmp_path, monkeypatch):
    from nxtrec.errors import NxtrecError
    from nxtrec.tagging import prefetch

    decoder = _loader(tmp_path)
    real = prefetch.decode
    # the workers are forked, so they decode with this: the fifth input kills its worker
    monkeypatch.setattr(prefetch, "decode", lambda i, *a, **k: os._exit(9) if i == 4 else real(i, *a, **k))
    batches = prefetch.prefetched_batches(decoder, 1)
    got = 0
    with pytest.raises(NxtrecError, match="decoding worker process ended unexpectedly"):
        for _ in batches:
            got += 1
    assert got <= 2  # the batches before the one that died


def test_threads_per_process_shares_the_cores_unless_the_user_chose(monkeypatch):
    from nxtrec.inference.threads import threads_per_process

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert [threads_per_process(n) for n in (1, 2, 3, 32)] == ["16", "8", "5", "1"]
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert threads_per_process(2) == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    assert threads_per_process(4) == "6"


def test_processes_refuse_onnx_and_report_a_failing_rank(tiny_model_dir, tmp_path, capsys):
    images = _collection(tmp_path / "imgs", n=2)
    assert main(["tag", str(images), "--out", str(tmp_path / "a"), "--onnx", str(tmp_path), "--processes", "2"]) == 2
    assert "--onnx runs in one process" in capsys.readouterr().err
    assert main(["tag", "--list", "-", "--out", str(tmp_path / "c"), "--processes", "2"]) == 2
    assert "--processes cannot share standard input" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["tag", str(images), "--out", str(tmp_path / "b"), "--model", str(tmp_path / "empty"), "--processes", "2"]) == 2


def test_tag_list_constrains_the_records(tiny_model_dir, tmp_path):
    images = _collection(tmp_path / "imgs", n=3)
    tags = tmp_path / "tags.txt"
    tags.write_text("dog\ncat | kitten\ncar\ntree\n")
    out = tmp_path / "out"
    assert _tag(tiny_model_dir, out, images, "--vocab", tags, "--top-k", "3") == 1  # the corrupt image
    recs = _records(out)
    assert len(recs) == 3
    assert all(r["labels"] and {x["label"] for x in r["labels"]} <= {"dog", "cat", "car", "tree"} for r in recs)


def _labels_by_id(out: Path) -> dict[str, list]:
    from nxtrec.tagging.output import read_records

    recs = list(read_records(out))
    assert len({r["id"] for r in recs}) == len(recs)  # one current record per image
    return {r["id"]: r["labels"] for r in recs}


def _part_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.glob("part-*")}


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_a_growing_folder_is_updated_and_equals_a_fresh_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    images = _collection(Path("imgs"), n=4)  # img00..img02, sub/img03, img99-corrupt
    args = ["--top-k", "3", "--part-size", "2", "--batch-size", "2"]
    out = tmp_path / "out"
    assert _tag(tiny_model_dir, out, "imgs", *args) == 1
    ids = set(_labels_by_id(out))
    assert ids == {"imgs/img00.png", "imgs/img01.jpg", "imgs/img02.jpg", "imgs/sub/img03.png"}
    # the same folder by its absolute path, through a symbolic link, with a trailing slash: a resume
    (tmp_path / "link").symlink_to(tmp_path / "imgs")
    capsys.readouterr()
    for spelling in (tmp_path / "imgs", f"{tmp_path / 'link'}/", "imgs/"):
        assert _tag(tiny_model_dir, out, spelling, *args) == 1
        assert "this run: 0 images in" in capsys.readouterr().err
    # grow 1: three new images; a plain rerun is refused and names --update
    for i in (4, 5, 6):
        datagen.write_image(images / f"new{i}.jpg", 100 + i)
    first = _part_bytes(out)
    assert _tag(tiny_model_dir, out, tmp_path / "imgs", *args) == 2
    assert "--update" in capsys.readouterr().err
    assert _tag(tiny_model_dir, out, tmp_path / "imgs", *args, "--update") == 1
    assert "this run: 3 images in" in capsys.readouterr().err
    after = _part_bytes(out)
    assert {k: after[k] for k in first} == first  # earlier parts are not rewritten
    assert sorted(set(after) - set(first)) == ["part-00003.jsonl", "part-00004.jsonl"]
    assert set(_labels_by_id(out)) == ids | {f"imgs/new{i}.jpg" for i in (4, 5, 6)}
    assert _manifest(out)["this_run"] | {"seconds": 0, "images_per_s": 0} == {
        "images": 3, "new": 3, "changed": 0, "seconds": 0, "images_per_s": 0}  # fmt: skip
    # grow 2 (through the link): one more, one changed, one removed
    datagen.write_image(images / "new7.jpg", 107)
    datagen.write_image(images / "img01.jpg", 555, size=(50, 40))
    (images / "img02.jpg").unlink()
    before = _part_bytes(out)
    assert _tag(tiny_model_dir, out, tmp_path / "link", *args, "--update") == 1
    assert "this run: 2 images (1 changed)" in capsys.readouterr().err
    assert {k: v for k, v in _part_bytes(out).items() if k in before} == before
    manifest = _manifest(out)
    assert manifest["removed"] == ["imgs/img02.jpg"] and manifest["superseded"] == {"part-00000.jsonl": ["imgs/img01.jpg"]}
    assert manifest["counts"] | {"parts_done": 0, "parts": 0} == {
        "images": 8, "tagged": 7, "failed": 1, "superseded": 1, "removed": 1, "parts_done": 0, "parts": 0,
        "shard_errors": 0}  # fmt: skip
    # grow 3: a killed update (after its first part) resumed by the same command
    for i in (8, 9, 10):
        datagen.write_image(images / "sub" / f"late{i}.jpg", 100 + i)
    from nxtrec.tagging.output import TagOutput

    real_write = TagOutput.write_part

    def write_then_die(self, part, results, fps):
        real_write(self, part, results, fps)
        raise RuntimeError("killed")

    monkeypatch.setattr(TagOutput, "write_part", write_then_die)
    assert _tag(tiny_model_dir, out, "imgs", *args, "--update") != 0
    assert (out / "part-00006.jsonl").is_file() and not (out / "part-00007.jsonl").exists()
    monkeypatch.setattr(TagOutput, "write_part", real_write)
    capsys.readouterr()
    assert _tag(tiny_model_dir, out, "imgs", *args, "--update") == 1
    assert "this run: 1 images in" in capsys.readouterr().err
    assert _manifest(out)["status"] == "complete"
    # the final records equal one fresh run over the final folder
    assert _tag(tiny_model_dir, tmp_path / "fresh", "imgs", *args) == 1
    got, want = _labels_by_id(out), _labels_by_id(tmp_path / "fresh")
    assert sorted(got) == sorted(want) and len(got) == 10
    for name in want:
        _assert_same_labels(got[name], want[name])
    assert _errors(out) == _errors(tmp_path / "fresh") == [
        {"id": "imgs/img99-corrupt.jpg", "reason": _errors(out)[0]["reason"]}]  # fmt: skip
    fresh_counts = _manifest(tmp_path / "fresh")["counts"]
    assert {k: _manifest(out)["counts"][k] for k in ("images", "tagged", "failed")} == {
        k: fresh_counts[k] for k in ("images", "tagged", "failed")}  # fmt: skip


def test_update_refuses_other_options_and_hash_tells_content(tiny_model_dir, tmp_path, capsys):
    images = _collection(tmp_path / "imgs", n=3)
    out = tmp_path / "out"
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--hash") == 1
    datagen.write_image(images / "new.jpg", 7)
    capsys.readouterr()
    assert _tag(tiny_model_dir, out, images, "--top-k", "4", "--update") == 2
    err = capsys.readouterr().err
    assert "options.top_k 3 -> 4" in err and "--overwrite" in err and "inputs." not in err
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--update", "--overwrite") == 2
    # touched, same content: unchanged by content
    target = images / "img01.jpg"
    orig = target.stat()
    os.utime(target, ns=(orig.st_atime_ns, orig.st_mtime_ns + 10**9))
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--update", "--hash") == 1
    assert "this run: 1 images in" in capsys.readouterr().err  # only new.jpg
    # other bytes of the same size and time as when tagged: only the content tells
    data = bytearray(target.read_bytes())
    data[-10] ^= 0x01
    target.write_bytes(bytes(data))
    os.utime(target, ns=(orig.st_atime_ns, orig.st_mtime_ns))
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--update") == 1
    assert "this run: 0 images" in capsys.readouterr().err
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--update", "--hash") == 1
    assert "this run: 1 images (1 changed)" in capsys.readouterr().err
    assert _manifest(out)["superseded"] == {"part-00000.jsonl": [str(target)]}


def test_csv_has_one_header_per_file_and_a_row_for_an_image_without_labels(tiny_model_dir, tmp_path):
    from nxtrec.tagging.output import read_records

    images = _collection(tmp_path / "imgs", n=5)
    assert _tag(tiny_model_dir, tmp_path / "all", images, "--top-k", "3", "--part-size", "2") == 1
    full = _records(tmp_path / "all")
    tops = sorted(r["labels"][0]["prob"] for r in full)
    threshold = (tops[1] + tops[2]) / 2  # two images keep no label, three keep some
    out = tmp_path / "csv"
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--part-size", "2", "--min-prob", repr(threshold),
                "--format", "csv") == 1  # fmt: skip
    parts = sorted(out.glob("part-*.csv"))
    assert len(parts) == 3
    rows = []
    for part in parts:
        with open(part, newline="") as f:
            got = list(csv.reader(f))
        assert got[0] == ["id", "label", "prob"] and ["id", "label", "prob"] not in got[1:]
        rows += got[1:]
    want = []
    for r in full:
        kept = [lab for lab in r["labels"] if lab["prob"] >= threshold]
        want += [[r["id"], lab["label"], repr(lab["prob"])] for lab in kept] or [[r["id"], "", ""]]
    assert rows == want
    assert sum(row[1] == "" for row in rows) == 2
    assert str(images / "img99-corrupt.jpg") not in {row[0] for row in rows}  # failed: in errors.jsonl only
    back = list(read_records(out))
    assert [r["id"] for r in back] == [r["id"] for r in full]
    assert sum(r["labels"] == [] for r in back) == 2
