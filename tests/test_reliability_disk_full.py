"""A full disk while writing a model directory, a checkpoint or a shard: one line naming the
path and the space needed, exit 2, and no temporary file or folder left (issue #33)."""

import errno
import glob
import os
import re
import time

import datagen
import pytest
import safetensors.torch
import torch
from safetensors import SafetensorError

from nxtrec.cli.main import main
from nxtrec.errors import NxtrecError
from nxtrec.model.directory import load_model_dir, save_model_dir
from nxtrec.model.quantized import quantize_int8
from nxtrec.training.checkpoint import write_checkpoint
from nxtrec.training.errors import TrainError

ONE_LINE = r"no space left on the device \(needed about \d+ MB, \d+ MB free"
# What safetensors raises when the disk fills while it writes.
RUST_ENOSPC = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def _leftovers(root):
    return [p for p in glob.glob(f"{root}/**/.*", recursive=True) if ".nxtrec" not in p] + \
        glob.glob(f"{root}/**/*.tmp*", recursive=True)


def _safetensors_disk_full(*args, **kwargs):
    raise SafetensorError(RUST_ENOSPC)


def test_init_model_on_a_full_disk_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(safetensors.torch, "save_file", _safetensors_disk_full)
    out = tmp_path / "models" / "tiny"
    assert main(["init-model", "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(re.escape(str(out)) + ": " + ONE_LINE, err[0]), err
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("quantized", [False, True])
def test_saving_a_model_directory_on_a_full_disk(tiny_model_dir, tmp_path, monkeypatch, quantized):
    model, _ = load_model_dir(tiny_model_dir)
    if quantized:
        quantize_int8(model)
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))))
    with pytest.raises(NxtrecError, match=ONE_LINE):
        save_model_dir(model, tiny_model_dir / "tokenizer.model", tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_a_checkpoint_on_a_full_disk_leaves_no_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _safetensors_disk_full)
    with pytest.raises(TrainError, match=ONE_LINE):
        write_checkpoint(tmp_path, 1, {"w": torch.ones(1000)}, {"step": 1}, keep_last=3, keep_every=0)
    assert os.listdir(tmp_path / "checkpoints") == []


def _jsonl(tmp_path, n):
    return datagen.make_jsonl(tmp_path / "src", n)


def test_pack_on_a_full_disk_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    import webdataset as wds

    def disk_full(self, sample):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wds.TarWriter, "write", disk_full)
    out = tmp_path / "shards"
    code = main(["pack", "jsonl", str(_jsonl(tmp_path, 3)), "--out", str(out), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search("000000.tar.tmp: " + ONE_LINE, err[0]), err
    assert glob.glob(f"{out}/*.tmp") == []


def test_pack_with_two_workers_removes_the_other_workers_partial_shard(tmp_path, monkeypatch):
    """One worker fails on a full disk while the other is still writing its shard: the pool
    stops that worker, and its .tar.tmp must go too."""
    import webdataset as wds

    real_write = wds.TarWriter.write

    def write(self, sample):
        if int(sample["__key__"]) <= 6:  # the first shard (lines 1 to 6)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        time.sleep(0.2)  # the second shard is still being written
        return real_write(self, sample)

    monkeypatch.setattr(wds.TarWriter, "write", write)
    out = tmp_path / "shards"
    code = main(["pack", "jsonl", str(_jsonl(tmp_path, 12)), "--out", str(out), "--workers", "2", "--shard-size", "6",
                 "--no-progress"])
    assert code == 2
    assert glob.glob(f"{out}/*.tmp") == []
