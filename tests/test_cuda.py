"""The CUDA paths on a real GPU (issue #18): skipped without one. `benchmarks/gpu_suite.sh`
runs them (`pytest -m cuda`) before the full-size measurements."""

from __future__ import annotations

import pytest
import torch
from test_train import tiny_cfg, write_shards

from nxtrec.inference.recognizer import Recognizer
from nxtrec.training.checkpoint import checkpoint_dirs
from nxtrec.training.logger import read_metrics
from nxtrec.training.main import train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_predict_on_cuda_gives_the_cpu_float32_labels(photos, dtype):
    cpu = Recognizer.from_pretrained(None).predict(photos, top_k=5)
    gpu = Recognizer.from_pretrained(None, device="cuda", dtype=dtype).predict(photos, top_k=5)
    # Same tolerance as bfloat16 on the CPU (tests/test_cpu_inference.py): same top label.
    assert [labels[0].label for labels in gpu] == [labels[0].label for labels in cpu]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_on_cuda_resumes_exactly(shards, tmp_path, precision):
    cfg = tiny_cfg(shards, tmp_path / "run", "run.device=\"cuda\"", f"train.precision=\"{precision}\"",
                   "train.max_steps=30", "checkpoint.every=10", "checkpoint.keep_last=5", "checkpoint.export=false")
    train(cfg)
    first = read_metrics(tmp_path / "run")
    assert all(r["loss"] == r["loss"] for r in first)  # no NaN (the fp16 scaler works)
    train(cfg, resume=str(dict(checkpoint_dirs(tmp_path / "run"))[10]))
    again = read_metrics(tmp_path / "run")
    assert [(r["step"], r["loss"], r["lr"]) for r in again] == [(r["step"], r["loss"], r["lr"]) for r in first]


@pytest.mark.parametrize("option", ["model.compile=true", "model.activation_checkpointing=true"])
def test_compile_and_checkpointing_on_cuda_keep_the_losses(shards, tmp_path, option):
    runs = {}
    for name, extra in (("plain", []), ("option", [option])):
        cfg = tiny_cfg(shards, tmp_path / name, "run.device=\"cuda\"", "train.precision=\"bf16\"", "train.max_steps=5",
                       "checkpoint.export=false", *extra)
        train(cfg)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name)]
    assert runs["option"] == pytest.approx(runs["plain"], rel=2e-2)
