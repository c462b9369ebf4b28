"""Damaged shards are counted and reported by every reader and the work goes on; `pack` locks
its output folder and removes its temporary files when writing fails."""

import errno
import os
import tarfile
import warnings

import datagen
import pytest

from nxtrec.cli.main import main
from nxtrec.data import registry
from nxtrec.data.pack import PackOptions, pack
from nxtrec.data.relabel import add_labels
from nxtrec.data.shards import folder_lock, read_manifest, tar_samples
from nxtrec.data.sources import jsonl_records
from nxtrec.errors import NxtrecError


def _damaged_folder(root):
    """00000.tar good (3 samples), 00001.tar cut inside its 3rd image, 00002.tar not a tar."""
    datagen.write_img2dataset_shard(root / "00000.tar", 0, 3)
    datagen.write_img2dataset_shard(root / "00001.tar", 3, 4)
    cut = root / "00001.tar"
    cut.write_bytes(cut.read_bytes()[: 2 * 3 * 1024 + 2500])
    (root / "00002.tar").write_bytes(b"<html>not found</html>")
    return root


def test_tar_reader_names_what_is_wrong(tmp_path):
    root = _damaged_folder(tmp_path)
    results = {}
    for name in ("00000.tar", "00001.tar", "00002.tar"):
        damage = []
        results[name] = (sum(1 for _ in tar_samples(root / name, damage)), damage)
    assert results["00000.tar"] == (3, [])
    assert results["00001.tar"][0] < 4 and "truncated" in results["00001.tar"][1][0]
    assert results["00002.tar"] == (0, ["not a tar file"])
    with pytest.raises(tarfile.ReadError):  # without a damage list, the old behaviour: raise
        list(tar_samples(root / "00002.tar"))


def test_data_stats_reports_damaged_shards_and_counts_the_rest(tmp_path, capsys):
    root = _damaged_folder(tmp_path / "cc")
    assert main(["data", "stats", str(root)]) == 1
    out, err = capsys.readouterr()
    assert "shards    3 (2 damaged)" in out and "samples   " in out
    lines = err.strip().splitlines()
    assert any("00001.tar: truncated" in line for line in lines)
    assert any("00002.tar: not a tar file" in line for line in lines)
    assert lines[-1].startswith("nxtrec: 2 damaged shards") and "Traceback" not in err


def test_shard_lengths_warn_about_damaged_shards_every_time(tmp_path):
    root = _damaged_folder(tmp_path / "cc")
    paths = registry.expand_shards([str(root)])
    for _ in range(2):  # counted, then from the cache: still said
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shards = registry.shard_lengths(paths)
        assert [s.damage != "" for s in shards] == [False, True, True]
        assert sum("damaged shard" in str(w.message) for w in caught) == 2
    assert shards[0].samples == 3 and shards[2].samples == 0


def test_labels_add_leaves_damaged_shards_unchanged_and_says_so(tmp_path, capsys):
    root = _damaged_folder(tmp_path / "cc")
    before = {p.name: p.read_bytes() for p in root.glob("*.tar")}
    summary = add_labels(root, progress=False)
    assert set(summary.damaged) == {"00001.tar", "00002.tar"} and summary.written == 3
    assert (root / "00001.tar").read_bytes() == before["00001.tar"]  # not cut down to its readable part
    manifest = read_manifest(root)
    assert set(manifest["shards"]) == {"00000.tar"} and not manifest["complete"]
    assert main(["labels", "add", str(root), "--no-progress"]) == 1
    assert "2 damaged shards left unchanged" in capsys.readouterr().out


def test_a_second_packer_into_the_same_folder_is_refused(tmp_path):
    records = jsonl_records(datagen.make_jsonl(tmp_path / "j", 4))
    out = tmp_path / "shards"
    out.mkdir()
    with folder_lock(out, "pack jsonl"), pytest.raises(NxtrecError, match=r"`nxtrec pack jsonl` \(pid \d+\) is writing"):
        pack(records, out, "jsonl", progress=False)
    assert pack(records, out, "jsonl", progress=False).written == 4  # free again once the first is done
    (tmp_path / "file").write_text("x")
    with pytest.raises(NxtrecError, match="exists and is not a folder"):
        pack(records, tmp_path / "file", "jsonl", progress=False)


def test_disk_full_while_packing_removes_the_partial_shard(tmp_path, monkeypatch):
    import webdataset as wds

    records = jsonl_records(datagen.make_jsonl(tmp_path / "j", 5))
    out = tmp_path / "shards"
    real_write, calls = wds.TarWriter.write, []

    def fill_disk(self, sample):
        calls.append(1)
        if len(calls) == 4:  # the second shard's second sample
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", fill_disk)
    with pytest.raises(NxtrecError) as e:
        pack(records, out, "jsonl", options=PackOptions(shard_size=3), progress=False)
    assert "No space left on device" in str(e.value) and "000001.tar.tmp was removed" in str(e.value)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["000000.tar", "manifest.json"]
    monkeypatch.undo()
    assert pack(records, out, "jsonl", options=PackOptions(shard_size=3), progress=False).written == 2  # resumes
