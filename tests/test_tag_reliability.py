"""`nxtrec tag` reliability (issue #33): --overwrite never empties someone else's folder, a
damaged part is re-tagged, one job per output folder, damaged shards are counted, transient
failures are retried, and `--processes` ranks end with their launcher. Tiny random model."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datagen
import pytest
from processes import processes_naming

from nxtrec.cli.main import main

VENV_BIN = Path(sys.executable).parent
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(folder: Path, n: int) -> Path:
    for i in range(n):
        datagen.write_image(folder / f"img{i:02d}.jpg", i, size=(40 + i, 30 + i))
    return folder


def _tag(model_dir, out, *args) -> int:
    return main(["tag", *map(str, args), "--out", str(out), "--model", str(model_dir), "--workers", "1"])


def _parts(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*"))}


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_overwrite_refuses_a_folder_that_is_not_a_tag_output(tiny_model_dir, tmp_path, capsys):
    images = _images(tmp_path / "imgs", 2)
    shards = tmp_path / "shards"  # a pack shard folder: its own manifest, errors and a part-like name
    files = {"manifest.json": '{"format": "nxtrec-shards/1"}\n', "errors.jsonl": "{}\n",
             "part-00000.jsonl": "mine\n", "00000.tar": "x"}  # fmt: skip
    shards.mkdir()
    for name, text in files.items():
        (shards / name).write_text(text)
    for args in (["--overwrite"], []):
        assert _tag(tiny_model_dir, shards, images, *args) == 2
        line = _one_line(capsys.readouterr().err)
        assert "not an nxtrec tag folder" in line and str(shards) in line
    assert {p.name: p.read_text() for p in shards.iterdir()} == files  # nothing deleted, nothing added
    # a real tag folder is overwritten; a file of the user's in it stays
    out = tmp_path / "out"
    assert _tag(tiny_model_dir, out, images, "--top-k", "2") == 0
    (out / "notes.txt").write_text("mine")
    assert _tag(tiny_model_dir, out, images, "--top-k", "3", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_a_truncated_or_altered_part_is_tagged_again(tiny_model_dir, tmp_path, capsys):
    images = _images(tmp_path / "imgs", 12)
    out, args = tmp_path / "out", [images, "--top-k", "2", "--part-size", "4", "--batch-size", "4"]
    assert _tag(tiny_model_dir, out, *args) == 0
    first = _parts(out)
    part1, part2 = out / "part-00001.jsonl", out / "part-00002.jsonl"
    part1.write_bytes(b"".join(first["part-00001.jsonl"].splitlines(keepends=True)[:2]))  # 2 of 4 records
    altered = first["part-00002.jsonl"].replace(b'"width": ', b'"width": 1', 1)  # same records, other bytes
    part2.write_bytes(altered)
    capsys.readouterr()
    assert _tag(tiny_model_dir, out, *args) == 0
    err = capsys.readouterr().err
    assert "part-00001.jsonl: 2 of 4 records" in err and "part-00002.jsonl" in err and "SHA-256" in err
    assert "this run: 8 images" in err
    assert _parts(out) == first
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["images"] == manifest["counts"]["tagged"] == 12


def test_parts_and_sidecars_reach_the_disk_before_their_rename(tmp_path, monkeypatch):
    from nxtrec.tagging.output import TagOutput
    from nxtrec.tagging.pipeline import TagResult

    output = TagOutput(tmp_path / "out")
    output.state.mkdir(parents=True)
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append((str(a), str(b), len(synced))) or real_replace(a, b))
    output.write_part(0, [TagResult("a", [], 4, 3)], [{"size": 1, "mtime_ns": 2}])
    assert [Path(b).name for _, b, _ in renamed] == ["part-00000.json", "part-00000.jsonl"]  # the sidecar first
    for tmp, _, count in renamed:  # each file synced before its rename, its folder after
        assert tmp in synced[:count]
    assert str(output.state) in synced and str(output.folder) in synced
    side = json.loads((output.state / "part-00000.json").read_text())
    assert side["records"] == 1 and side["bytes"] == (output.folder / "part-00000.jsonl").stat().st_size


def test_a_second_job_on_the_same_folder_is_refused_and_a_dead_holder_lets_go(tiny_model_dir, tmp_path, capsys):
    images = _images(tmp_path / "imgs", 2)
    out = tmp_path / "out"
    holder = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from nxtrec.data.shards import folder_lock
        Path({str(out)!r}).mkdir()
        with folder_lock(Path({str(out)!r}), "tag"):
            print("locked", flush=True)
            time.sleep(120)
    """)  # the lock as a running `nxtrec tag` holds it (TagOutput.locked)
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert _tag(tiny_model_dir, out, images) == 2
        line = _one_line(capsys.readouterr().err)
        assert f"pid {proc.pid}" in line and str(out) in line
        assert not (out / "manifest.json").exists()
    finally:
        proc.send_signal(signal.SIGKILL)  # a killed job: the kernel releases its lock
        proc.wait()
    assert _tag(tiny_model_dir, out, images) == 0


def test_damaged_shards_are_counted_and_fail_the_run(tiny_model_dir, tmp_path, capsys):
    good = tmp_path / "s" / "00000.tar"
    keys = datagen.write_img2dataset_shard(good, 0, 2)
    cut = tmp_path / "s" / "00001.tar"
    datagen.write_img2dataset_shard(cut, 2, 10)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # about half its samples
    assert _tag(tiny_model_dir, tmp_path / "out", "--shards", str(tmp_path / "s" / "{00000..00001}.tar")) == 1
    err = capsys.readouterr().err
    assert f"{cut}: damaged shard" in err and "samples read" in err and "1 damaged shards" in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["shard_errors"] == 1 and 2 < manifest["counts"]["images"] < 12
    shard_errors = [e for e in map(json.loads, (tmp_path / "out" / "errors.jsonl").read_text().splitlines())
                    if e.get("shard")]  # fmt: skip
    read = manifest["counts"]["images"] - len(keys)
    assert [e["id"] for e in shard_errors] == [str(cut)] and f"; {read} samples read" in shard_errors[0]["reason"]
    # not a tar at all: a counted error, not a traceback
    junk = tmp_path / "junk" / "00000.tar"
    junk.parent.mkdir()
    junk.write_bytes(b"this is not a tar file" * 100)
    assert _tag(tiny_model_dir, tmp_path / "out2", "--shards", str(good), "--shards", str(junk)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{junk}: damaged shard, not a tar file; 0 samples read" in err
    assert json.loads((tmp_path / "out2" / "manifest.json").read_text())["counts"]["shard_errors"] == 1


def test_a_bad_pixel_budget_is_one_usage_error(tiny_model_dir, tmp_path, monkeypatch, capsys):
    images = _images(tmp_path / "imgs", 1)
    monkeypatch.setenv("NXTREC_MAX_IMAGE_PIXELS", "abc")
    assert _tag(tiny_model_dir, tmp_path / "out", images) == 2
    assert "NXTREC_MAX_IMAGE_PIXELS='abc'" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    assert main(["predict", str(images / "img00.jpg"), "--model", str(tiny_model_dir)]) == 2
    assert "NXTREC_MAX_IMAGE_PIXELS='abc'" in capsys.readouterr().err


def test_transient_failures_are_retried_by_a_plain_rerun(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from nxtrec.tagging import prefetch

    images = _images(tmp_path / "imgs", 4)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in sorted(images.iterdir())) + f"{tmp_path / 'gone.jpg'}\n")
    real = prefetch.decode
    reasons = {1: "no such file", 2: "NXTREC_MAX_IMAGE_PIXELS='abc': expected a positive number of pixels"}

    def flaky(i, name, *a, **k):  # the workers are forked: they decode with this
        if i in reasons:
            return prefetch.Decoded(i, error=f"{name}: {reasons[i]}")  # gone while read, a bad setting then
        return real(i, name, *a, **k)

    monkeypatch.setattr(prefetch, "decode", flaky)
    assert _tag(tiny_model_dir, tmp_path / "out", "--list", listing) == 1
    assert len((tmp_path / "out" / "errors.jsonl").read_text().splitlines()) == 3
    monkeypatch.setattr(prefetch, "decode", real)
    capsys.readouterr()
    assert _tag(tiny_model_dir, tmp_path / "out", "--list", listing) == 1  # gone.jpg is still missing
    assert "this run: 2 images (2 changed)" in capsys.readouterr().err
    errors = (tmp_path / "out" / "errors.jsonl").read_text().splitlines()
    assert [json.loads(e)["id"] for e in errors] == [str(tmp_path / "gone.jpg")]
    assert _tag(tiny_model_dir, tmp_path / "out", "--list", listing) == 1  # a missing file: no new part each rerun
    assert "this run: 0 images" in capsys.readouterr().err


# SIGTERM (the launcher stops its ranks, exit 143) passes too; left out to keep the suite short
@pytest.mark.parametrize("sig", [signal.SIGKILL])
def test_killing_the_launcher_ends_its_ranks(sig, tiny_model_dir, tmp_path):
    images = _images(tmp_path / "imgs", 40)
    slow = tmp_path / "slow"  # every image takes 0.3 s to decode in the ranks: they would run ~6 s more
    slow.mkdir()
    (slow / "sitecustomize.py").write_text(textwrap.dedent("""
        import time
        from nxtrec.tagging import prefetch
        real = prefetch.decode
        prefetch.decode = lambda *a, **k: (time.sleep(0.3), real(*a, **k))[1]
    """))
    env = {**ONE_THREAD_ENV, "PYTHONPATH": os.pathsep.join([str(slow), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "out"
    cmd = [str(VENV_BIN / "nxtrec"), "tag", str(images), "--model", str(tiny_model_dir), "--out", str(out),
           "--processes", "2", "--workers", "1", "--batch-size", "2", "--part-size", "2"]  # fmt: skip
    launcher = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while launcher.poll() is None and not list(out.glob("part-*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None, "the job ended before it could be killed"
    killed = time.monotonic()
    launcher.send_signal(sig)
    assert launcher.wait(30) == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM)
    left = processes_naming(str(out), wait=3.0)
    assert not left, f"ranks left running {time.monotonic() - killed:.1f} s after the launcher was killed: {left}"
    assert len(list(out.glob("part-*"))) < 20  # they were stopped, not finished