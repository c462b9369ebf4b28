"""Training when things go wrong: skipped samples are counted in metrics.jsonl, a damaged
newest checkpoint falls back to the one before, a full disk during a checkpoint write is
said as such, a finished run says so, and 2 torchrun ranks with unequal data do not hang."""

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.training.checkpoint import checkpoint_dirs, write_checkpoint
from nxtrec.training.config import load_config
from nxtrec.training.errors import TrainError
from nxtrec.training.logger import read_metrics
from nxtrec.training.main import train

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
WORDS = ["dog", "cat", "tree"]


def write_shard(path: Path, first: int, n: int, corrupt: tuple = ()) -> None:
    """Solid-colour images labelled by colour; the keys in `corrupt` get bytes that are no image."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for k in range(first, first + n):
            buf = io.BytesIO()
            Image.new("RGB", (72, 72), COLOURS[k % 3]).save(buf, format="JPEG")
            image = b"\xff\xd8 broken" if k in corrupt else buf.getvalue()
            w.write({"__key__": f"{k:08d}", "jpg": image, "json": json.dumps({"labels": [WORDS[k % 3]]}).encode()})


pytestmark = pytest.mark.usefixtures("one_thread")


def cfg(shards: str, run_dir: Path, *overrides):
    return load_config("tiny-cpu", [f'data.shards=["{shards}"]', f'run.dir="{run_dir}"', "log.progress=false",
                                    "train.global_batch_size=4", "train.micro_batch_size=4", *overrides])


def test_skipped_samples_are_in_metrics_and_a_damaged_checkpoint_falls_back(tmp_path, capsys):
    write_shard(tmp_path / "shards" / "000000.tar", 0, 24, corrupt=(3, 10))
    shards, run = str(tmp_path / "shards" / "*.tar"), tmp_path / "run"
    train(cfg(shards, run, "train.max_steps=4", "checkpoint.every=2", "checkpoint.keep_last=3"))
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["skipped"] == {"corrupt image": 2}  # both, once: 4 steps of 4 read 18 of 24 samples
    assert all(r["skipped"].get("corrupt image", 0) <= 2 for r in records)

    # the newest checkpoint is damaged: resume from the one before it and say so
    newest = checkpoint_dirs(run)[-1][1]
    assert main(["verify", str(run), str(newest)]) == 0
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(["verify", str(newest)]) == 1
    capsys.readouterr()
    summary = train(cfg(shards, run, "train.max_steps=5", "checkpoint.every=2", "checkpoint.keep_last=3"))
    err = capsys.readouterr().err
    assert f"warning: {newest}: cannot read checkpoint" in err and "falling back to the checkpoint before it" in err
    assert "at step 2 of 5" in err and summary["step"] == 5
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path, monkeypatch):
    tensors, state = {"w": torch.ones(3)}, {"step": 1}
    first = write_checkpoint(tmp_path, 1, tensors, state, keep_last=3, keep_every=0)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(TrainError, match="ckpt-00000002: checkpoint not written: disk full; the temporary folder"):
        write_checkpoint(tmp_path, 2, tensors, state, keep_last=3, keep_every=0)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [first.name]  # no .tmp-* left
    assert (first / "state.pt").is_file()


def test_rerunning_a_finished_run_says_it_is_complete(tmp_path, capsys):
    write_shard(tmp_path / "shards" / "000000.tar", 0, 16)
    args = ["train", "tiny-cpu", "--set", f'data.shards=["{tmp_path / "shards" / "*.tar"}"]', "--run-dir",
            str(tmp_path / "run"), "--set", "log.progress=false", "--set", "train.max_steps=2", "--set",
            "train.global_batch_size=4", "--set", "train.micro_batch_size=4", "--set", "checkpoint.export=false"]
    assert main(args) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "is already complete (2 of 2 steps); nothing to train" in out and "last loss None" not in out


WORKER = textwrap.dedent(
    """
    import sys
    from nxtrec.distributed import setup_distributed
    from nxtrec.training.config import load_config
    from nxtrec.training.main import train

    info = setup_distributed("cpu")
    train(load_config("tiny-cpu", sys.argv[1:]), info=info)
    """
)


@pytest.mark.slow
def test_two_ranks_with_a_damaged_shard_on_one_do_not_hang(tmp_path):
    """12 samples per rank; rank 0's share holds 3 corrupt images, so it has 2 full batches of 4
    per epoch where rank 1 has 3 (000001.tar is also cut in half: a damaged shard, counted as
    such). Steps stay in lockstep (each rank's stream wraps to its next epoch on its own),
    and the skipped samples reach metrics.jsonl."""
    write_shard(tmp_path / "shards" / "000000.tar", 0, 16, corrupt=(1, 2, 5))
    write_shard(tmp_path / "shards" / "000001.tar", 16, 16)
    cut = tmp_path / "shards" / "000001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    overrides = [f'data.shards=["{tmp_path / "shards" / "*.tar"}"]', f'run.dir="{tmp_path / "run"}"',
                 "log.progress=false", "train.max_steps=6", "train.global_batch_size=8", "train.micro_batch_size=4",
                 "checkpoint.every=3", "checkpoint.export=false", "data.shuffle=false"]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(script), *overrides], env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=ROOT,
                         capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["skipped"]["corrupt image"] >= 3
    assert "000001.tar: damaged shard (truncated" in run.stderr
