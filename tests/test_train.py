"""Training: sequences and targets, the loss against a direct computation of
docs/design.md#training-sequence-and-loss, parameter groups, a tiny model that learns, checkpoints and exact resume after
a SIGKILL, a NaN stop, export, plotting, and 2 processes (torchrun, gloo) against 1."""

from __future__ import annotations

import io
import json
import math
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nxtrec.distributed import RankInfo
from nxtrec.inference.recognizer import Recognizer
from nxtrec.model.config import TEMPLATES, ModelConfig
from nxtrec.model.directory import build_model, load_model_dir
from nxtrec.model.masks import training_mask
from nxtrec.model.network import NxtpModel
from nxtrec.model.presets import preset_config
from nxtrec.training.checkpoint import checkpoint_dirs, read_checkpoint, retained_steps
from nxtrec.training.config import load_config
from nxtrec.training.data import make_data
from nxtrec.training.errors import TrainingDiverged
from nxtrec.training.logger import plot_run, read_metrics
from nxtrec.training.main import train
from nxtrec.training.params import plan_parameters
from nxtrec.training.scheduler import lr_factor, warmup_steps
from nxtrec.training.step import TrainStep
from nxtrec.training.text import IGNORE, make_text_batch

WORDS = "dog cat car tree apple banana umbrella chair table sofa bird horse".split()
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (220, 220, 40), (200, 40, 200), (40, 200, 200)]
ROOT = Path(__file__).resolve().parents[1]


def write_shards(out: Path, n_shards=4, per_shard=24, seed=0) -> str:
    """WebDataset shards of solid-colour images whose labels depend on the colour."""
    import webdataset as wds

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    k = 0
    for s in range(n_shards):
        with wds.TarWriter(str(out / f"{s:06d}.tar")) as w:
            for _ in range(per_shard):
                c = rng.randrange(len(COLOURS))
                buf = io.BytesIO()
                Image.new("RGB", (80, 72), COLOURS[c]).save(buf, format="JPEG", quality=90)
                labels = [WORDS[(2 * c + j) % len(WORDS)] for j in range(1 + c % 3)]
                w.write({"__key__": f"{k:08d}", "jpg": buf.getvalue(), "txt": " and ".join(labels),
                         "json": json.dumps({"labels": labels}).encode()})
                k += 1
    return str(out / "*.tar")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shards"))


def tiny_cfg(shards, run_dir, *overrides):
    return load_config("tiny-cpu", [f'data.shards=["{shards}"]', f'run.dir="{run_dir}"', "log.progress=false", *overrides])


def small_model(tokenizer, seed=0) -> NxtpModel:
    torch.manual_seed(seed)
    return build_model(preset_config("tiny", tokenizer.vocab_size))


# ---------------------------------------------------------------------------------------
# sequences, targets, loss
# ---------------------------------------------------------------------------------------


def test_text_batch_layout_and_targets(tokenizer):
    p, template = 16, TEMPLATES[4]
    labels = [["dog", "cat", "tree"], ["apple"]]
    got = make_text_batch(tokenizer, labels, template, random.Random(3), p, 128)
    expect_rng = random.Random(3)
    prompt_len = 2 + len(tokenizer.encode(template))  # <|image|> <s> template
    assert got.answer_index == p + prompt_len - 1
    for row, labs in enumerate(labels):
        labs = list(labs)
        expect_rng.shuffle(labs)
        ids = tokenizer.encode("<|image|>" + template + " " + ", ".join(labs), bos=True, eos=True)
        ids[0], ids[1] = ids[1], ids[0]
        assert ids[0] == tokenizer.special_ids["<|image|>"] and ids[1] == tokenizer.bos_id
        assert got.tokens[row, : len(ids)].tolist() == ids
        assert (got.tokens[row, len(ids) :] == tokenizer.pad_id).all()
        # the next token everywhere from <|image|> on (BOS, prompt, labels), but not EOS/padding
        assert got.targets[row, : len(ids) - 2].tolist() == ids[1:-1]
        assert (got.targets[row, len(ids) - 2 :] == IGNORE).all()
    assert got.tokens.shape[1] == max(int((row != tokenizer.pad_id).sum()) for row in got.tokens)  # the longest
    answer = make_text_batch(tokenizer, labels, template, random.Random(3), p, 128, span="answer")
    assert (answer.targets[:, : prompt_len - 1] == IGNORE).all()
    assert torch.equal(answer.targets[:, prompt_len - 1 :], got.targets[:, prompt_len - 1 :])
    fixed = make_text_batch(tokenizer, labels, template, random.Random(3), p, 128, padding="max")
    assert fixed.tokens.shape == (2, 128 - p) and fixed.n_targets == got.n_targets
    short = make_text_batch(tokenizer, [WORDS * 5], template, random.Random(0), p, p + prompt_len + 4)
    assert short.tokens.shape[1] == prompt_len + 4  # truncated to max_seq_len in all


@pytest.mark.parametrize("span", ["text", "answer"])
def test_one_sample_loss_equals_direct_computation(tokenizer, span):
    """Section 6-8 rules written out on a reference-style sequence padded to max_seq_len:
    decoder forward over every position, shift by one, EOS and padding ignored."""
    model = small_model(tokenizer).eval()
    p, max_len, template = model.num_image_tokens, 96, TEMPLATES[7]
    labels = ["umbrella", "dog", "bird", "table"]
    torch.manual_seed(1)
    pixels = torch.randn(1, 3, 64, 64)
    batch = make_text_batch(tokenizer, [labels], template, random.Random(11), p, max_len, span=span)

    labs = list(labels)
    random.Random(11).shuffle(labs)
    ids = tokenizer.encode("<|image|>" + template + " " + ", ".join(labs), bos=True, eos=True)
    ids[0], ids[1] = ids[1], ids[0]
    text = torch.full((1, max_len - p), tokenizer.pad_id)
    text[0, : len(ids)] = torch.tensor(ids)
    seq = torch.cat([torch.full((1, p), tokenizer.pad_id), text], dim=1)
    a = p + 1 + len(tokenizer.encode(template))  # position of the prompt's last token
    assert seq[0, a].item() == tokenizer.encode(template)[-1]
    with torch.no_grad():
        h = torch.cat([model.vision_encoder(pixels), model.language_decoder.embed(text)], dim=1)
        logits, _ = model.language_decoder(h, training_mask(seq, a, tokenizer.delimiter_id, p))
        target = torch.full((1, max_len), -1)
        target[0, p + 1 : p + len(ids)] = torch.tensor(ids[1:])
        target[target == tokenizer.eos_id] = -1
        if span == "answer":
            target[0, : a + 1] = -1
        expected = F.cross_entropy(logits[0, :-1], target[0, 1:], ignore_index=-1)
        loss_sum, n = TrainStep(model, tokenizer.delimiter_id, tokenizer.pad_id)(
            pixels, batch.tokens, batch.targets, batch.answer_index
        )
    assert n.item() == (target != -1).sum().item() == batch.n_targets
    assert torch.allclose(loss_sum / n, expected, rtol=1e-5, atol=1e-6), (loss_sum / n, expected)


def test_padding_to_the_longest_sample_gives_the_fixed_padding_loss(tokenizer):
    model = small_model(tokenizer).eval()
    p = model.num_image_tokens
    labels = [["dog"], ["cat", "tree", "apple", "banana", "chair"], ["sofa", "bird"]]
    pixels = torch.randn(3, 3, 64, 64)
    step = TrainStep(model, tokenizer.delimiter_id, tokenizer.pad_id)
    out = {}
    with torch.no_grad():
        for padding in ("longest", "max"):
            b = make_text_batch(tokenizer, labels, TEMPLATES[0], random.Random(0), p, 256, padding=padding)
            out[padding] = step(pixels, b.tokens, b.targets, b.answer_index)
    assert out["longest"][1] == out["max"][1]
    assert torch.allclose(out["longest"][0], out["max"][0], rtol=1e-5)


# ---------------------------------------------------------------------------------------
# parameter groups and schedule
# ---------------------------------------------------------------------------------------


def test_released_recipe_parameter_groups(tokenizer):
    with torch.device("meta"):
        model = NxtpModel(preset_config("nxtp-0.77b", tokenizer.vocab_size))
    plan = plan_parameters(model, load_config("g3m"), tokenizer)
    t = set(plan.trainable)
    blocks = {int(n.split(".")[3]) for n in t if n.startswith("vision_encoder.transformer.resblocks.")}
    assert blocks == set(range(18, 24))
    assert {"vision_encoder.ln_post.weight", "vision_encoder.ln_post.bias", "vision_encoder.proj.weight",
            "language_decoder.tok_embeddings.weight", "language_decoder.norm.weight",
            "language_decoder.output.weight", "language_decoder.layers.0.attention.wq.weight"} <= t
    assert not any(n.startswith(("vision_encoder.conv1", "vision_encoder.ln_pre", "vision_encoder.positional"))
                   or n == "vision_encoder.class_embedding" for n in t)
    decay = set(plan.decay)
    assert "vision_encoder.proj.weight" in decay and "language_decoder.output.weight" in decay
    assert "vision_encoder.transformer.resblocks.18.attn.in_proj_weight" in decay
    assert "vision_encoder.transformer.resblocks.18.attn.in_proj_bias" not in decay
    assert "language_decoder.layers.0.ffn_norm.weight" not in decay
    assert "language_decoder.tok_embeddings.weight" not in decay
    assert "language_decoder.norm.weight" in decay  # the reference's quirk, kept by the recipe
    assert "language_decoder.norm.weight" not in plan_parameters(model, load_config("base"), tokenizer).decay
    assert plan.embedding_rows == [tokenizer.special_ids["<|image|>"]]
    # The same patterns on the tiny preset (2 encoder blocks): the last blocks, i.e. both.
    tiny = build_model(preset_config("tiny", tokenizer.vocab_size))
    tiny_plan = plan_parameters(tiny, load_config("base"), tokenizer)
    assert {"vision_encoder.transformer.resblocks.0.ln_1.weight", "vision_encoder.transformer.resblocks.1.ln_1.weight"} <= set(tiny_plan.trainable)
    everything = plan_parameters(tiny, load_config("tiny-cpu"), tokenizer)
    assert len(everything.trainable) == len(list(tiny.parameters())) and everything.embedding_rows is None


def test_pattern_that_matches_nothing_is_an_error(tokenizer):
    tiny = build_model(preset_config("tiny", tokenizer.vocab_size))
    cfg = load_config("tiny-cpu", ['params.frozen=["vision_encoder.resblocks.*"]'])
    with pytest.raises(Exception, match="params.frozen: pattern 'vision_encoder.resblocks.\\*' matches no parameter"):
        plan_parameters(tiny, cfg, tokenizer)


def test_warmup_then_cosine_to_zero():
    cfg = load_config("g3m")
    assert warmup_steps(cfg, 21360) == 2000 and warmup_steps(cfg, 2_000_000) == 4000
    lrs = [lr_factor(s, 2000, 21360, 0.0) for s in range(21360)]
    assert lrs[0] == pytest.approx(1 / 2000) and lrs[1999] == pytest.approx(1.0)
    assert all(b <= a for a, b in zip(lrs[2000:], lrs[2001:]))
    assert lrs[-1] < 1e-7 and lrs[(2000 + 21360) // 2] == pytest.approx(0.5, abs=1e-3)


def test_retention_keeps_last_n_and_every_mth():
    assert retained_steps(list(range(1, 11)), 2, 0) == {9, 10}
    assert retained_steps(list(range(1, 11)), 2, 4) == {4, 8, 9, 10}


# ---------------------------------------------------------------------------------------
# training runs (in process)
# ---------------------------------------------------------------------------------------


def test_tiny_model_learns_and_exports_a_predict_model(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path / "run", "train.max_steps=40", "checkpoint.every=7",
                   "checkpoint.keep_last=2", "checkpoint.keep_every=14", "log.tensorboard=true")
    summary = train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run")]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # retention: the last 2 (35, 40) and every 14th (14, 28); nothing half-written
    assert [s for s, _ in checkpoint_dirs(tmp_path / "run")] == [14, 28, 35, 40]
    assert not list((tmp_path / "run" / "checkpoints").glob(".*"))
    tensors, state = read_checkpoint(checkpoint_dirs(tmp_path / "run")[-1][1])  # weights_only load
    init, _ = load_model_dir(tmp_path / "run" / "init-model")
    assert state["step"] == 40 and set(tensors) == set(init.state_dict())  # tiny-cpu trains everything
    assert (tmp_path / "run" / "config.toml").is_file()
    assert load_config(tmp_path / "run" / "config.toml") == cfg
    # the exported directory is a model `nxtrec predict` loads
    rec = Recognizer.from_pretrained(summary["final"])
    labels = rec.predict([Image.new("RGB", (64, 64), COLOURS[1])], top_k=3)[0]
    assert len(labels) >= 1 and all(lab.label for lab in labels)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    png = plot_run(tmp_path / "run")
    assert png.is_file() and png.stat().st_size > 1000


def test_only_the_special_token_rows_of_the_embedding_learn(shards, tmp_path, tokenizer):
    cfg = tiny_cfg(shards, tmp_path / "run", "train.max_steps=3", "checkpoint.export=true",
                   'params.trainable=["vision_encoder.transformer.resblocks.{-1:}.*", "vision_encoder.proj.*", '
                   '"language_decoder.*"]', 'params.embedding_rows=["<|image|>"]')
    seen = []

    def hook(step, params):
        g = params["language_decoder.tok_embeddings.weight"].grad
        seen.append(g.abs().sum(dim=1).nonzero().flatten().tolist())
        assert params["vision_encoder.conv1.weight"].grad is None

    summary = train(cfg, grad_hook=hook)
    init, _ = load_model_dir(tmp_path / "run" / "init-model")
    final, tok = load_model_dir(summary["final"])
    image_row = tok.special_ids["<|image|>"]
    assert seen == [[image_row]] * 3
    changed = (init.language_decoder.tok_embeddings.weight != final.language_decoder.tok_embeddings.weight).any(dim=1)
    assert changed.nonzero().flatten().tolist() == [image_row]
    for name in ("vision_encoder.conv1.weight", "vision_encoder.transformer.resblocks.0.attn.in_proj_weight",
                 "vision_encoder.ln_pre.weight"):
        assert torch.equal(init.state_dict()[name], final.state_dict()[name]), name
    for name in ("vision_encoder.transformer.resblocks.1.attn.in_proj_weight", "language_decoder.output.weight"):
        assert not torch.equal(init.state_dict()[name], final.state_dict()[name]), name


def test_nan_loss_stops_with_the_last_good_checkpoint(shards, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = TrainStep.forward

    def poisoned(self, *args):
        calls["n"] += 1
        loss, n = original(self, *args)
        return (loss * float("nan"), n) if calls["n"] == 5 else (loss, n)  # step 3, first micro-batch

    monkeypatch.setattr(TrainStep, "forward", poisoned)
    cfg = tiny_cfg(shards, tmp_path / "run", "train.max_steps=10", "checkpoint.every=2")
    with pytest.raises(TrainingDiverged) as e:
        train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "ckpt-00000002"
    assert "step 3: the loss is nan" in str(e.value) and str(ckpt) in str(e.value)
    assert [s for s, _ in checkpoint_dirs(tmp_path / "run")] == [2]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]
    assert not (tmp_path / "run" / "final").exists()


def test_data_stream_resumes_exactly_with_loader_workers(shards, tmp_path):
    """With loader worker processes a restarted DataLoader begins its round-robin at worker 0;
    the stream still continues exactly where it stopped, across the epoch boundary too."""
    cfg = tiny_cfg(shards, tmp_path, "data.num_workers=2", "train.micro_batch_size=5", "train.global_batch_size=10")
    mc = preset_config("tiny", 402)
    full = make_data(cfg, mc, RankInfo())
    assert full.batches_per_epoch() == 18  # 96 samples, 2 workers x 48, 9 full batches each
    expected = [full.next_batch() for _ in range(24)]
    part = make_data(cfg, mc, RankInfo())
    got = [part.next_batch() for _ in range(7)]
    path = tmp_path / "state.pt"
    torch.save(part.state_dict(), path)
    resumed = make_data(cfg, mc, RankInfo())
    resumed.load_state_dict(torch.load(path, weights_only=True))
    got += [resumed.next_batch() for _ in range(17)]
    assert [labels for _, labels in got] == [labels for _, labels in expected]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, expected))
    assert resumed.epoch == 1


def test_activation_checkpointing_changes_nothing_but_memory(shards, tmp_path):
    runs = {}
    for ac in ("false", "true"):
        cfg = tiny_cfg(shards, tmp_path / ac, "train.max_steps=3", f"model.activation_checkpointing={ac}",
                       "checkpoint.export=false")
        train(cfg)
        runs[ac] = [r["loss"] for r in read_metrics(tmp_path / ac)]
    assert runs["true"] == pytest.approx(runs["false"], rel=1e-6)


def test_resume_from_an_older_checkpoint_sets_newer_ones_aside(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path / "run", "train.max_steps=6", "checkpoint.every=2", "checkpoint.keep_last=5",
                   "checkpoint.export=false")
    train(cfg)
    first = read_metrics(tmp_path / "run")
    ckpts = dict(checkpoint_dirs(tmp_path / "run"))
    train(cfg, resume=str(ckpts[2]))
    assert [s for s, _ in checkpoint_dirs(tmp_path / "run")] == [2, 4, 6]
    assert len(list((tmp_path / "run" / "checkpoints").glob("ckpt-*.abandoned-*"))) == 2
    again = read_metrics(tmp_path / "run")
    assert [(r["step"], r["loss"], r["lr"]) for r in again] == [(r["step"], r["loss"], r["lr"]) for r in first]


# ---------------------------------------------------------------------------------------
# SIGKILL and resume (real processes)
# ---------------------------------------------------------------------------------------


def _cli(args, env_extra=None, **kw):
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "nxtrec", "train", "tiny-cpu", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, **kw)


def test_killed_run_resumes_exactly(shards, tmp_path):
    common = [f'--set=data.shards=["{shards}"]', "--set=train.max_steps=14", "--set=checkpoint.every=5",
              "--set=log.progress=false"]
    full = _cli(common + ["--run-dir", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr
    killed = _cli(common + ["--run-dir", str(tmp_path / "cut"), "--set=run.kill_after_steps=8"])
    assert killed.returncode == -9, killed.stderr  # SIGKILL: no clean-up, no final save
    assert [s for s, _ in checkpoint_dirs(tmp_path / "cut")] == [5]
    assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 9))
    resumed = _cli(common + ["--run-dir", str(tmp_path / "cut")])  # resumes by itself
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "ckpt-00000005 at step 5 of 14" in resumed.stderr
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 15))
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in a] == [(r["loss"], r["lr"], r["grad_norm"]) for r in b]
    ta, sa = read_checkpoint(checkpoint_dirs(tmp_path / "full")[-1][1])
    tb, sb = read_checkpoint(checkpoint_dirs(tmp_path / "cut")[-1][1])
    assert sa["step"] == sb["step"] == 14 and sa["data"] == sb["data"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])
    fa, _ = load_model_dir(tmp_path / "full" / "final")
    fb, _ = load_model_dir(tmp_path / "cut" / "final")
    assert all(torch.equal(x, y) for x, y in zip(fa.state_dict().values(), fb.state_dict().values()))
    again = _cli(common + ["--run-dir", str(tmp_path / "none"), "--resume"])
    assert again.returncode == 2 and "no checkpoint to resume from" in again.stderr


def test_slurm_script_starts_torchrun_with_a_rendezvous(shards, tmp_path):
    """The batch script on a fake one-node allocation: `scontrol` names this host, `srun`
    runs its command once; torchrun's c10d rendezvous starts 2 CPU processes."""
    import socket

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/usr/bin/env bash\necho localhost\n")
    (fake / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    for f in fake.iterdir():
        f.chmod(0o755)
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_JOB_ID="42", SLURM_JOB_NODELIST="localhost",
               SLURM_JOB_NUM_NODES="1", NPROC_PER_NODE="2", RDZV_PORT=str(port), PYTHON=sys.executable,
               OMP_NUM_THREADS="1")
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "slurm_train.sh"), "tiny-cpu", "--set", f'data.shards=["{shards}"]',
         "--run-dir", str(tmp_path / "run"), "--set", "train.max_steps=3", "--set", "checkpoint.export=false"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "1 node(s) x 2 process(es)" in run.stderr and "2 process(es) on cpu" in run.stderr
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# 2 processes (torchrun, gloo) = 1 process with the same global batch
# ---------------------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, sys, torch
    from nxtrec.distributed import setup_distributed
    from nxtrec.training.main import train
    from nxtrec.training.config import load_config

    out, overrides = sys.argv[1], sys.argv[2:]
    info = setup_distributed("cpu")
    grads = {}

    def hook(step, params):
        grads[step] = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                       for n, p in params.items() if p.grad is not None}

    train(load_config("tiny-cpu", overrides), info=info, grad_hook=hook)
    torch.save(grads, f"{out}/grads-rank{info.rank}.pt")
    """
)


class Interleaved:
    """One process's data = the micro-batches ranks 0 and 1 of a 2-process run would read,
    in rank order, so one step of 2 x micro-batches covers the same global batch."""

    def __init__(self, sources):
        self.sources, self.i = sources, 0

    def next_batch(self):
        src = self.sources[self.i % len(self.sources)]
        self.i += 1
        return src.next_batch()

    def state_dict(self):
        return {"i": self.i, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state):
        self.i = state["i"]
        for s, st in zip(self.sources, state["sources"]):
            s.load_state_dict(st)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_with_the_same_global_batch(shards, tmp_path, parallel):
    overrides = [f'data.shards=["{shards}"]', "train.max_steps=4", "train.global_batch_size=8",
                 "train.micro_batch_size=4", "log.progress=false", "checkpoint.every=100",
                 'params.embedding_rows=["<|image|>"]', f"train.parallel={parallel}"]
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(tmp_path), f'run.dir="{tmp_path / "two"}"', *overrides],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("2 process(es) on cpu") == 1  # only the main rank talks
    g0 = torch.load(tmp_path / "grads-rank0.pt", weights_only=True)
    g1 = torch.load(tmp_path / "grads-rank1.pt", weights_only=True)
    assert sorted(g0) == [1, 2, 3, 4]
    for step in g0:  # every rank applies the same (all-reduced) gradients
        assert all(torch.equal(g0[step][n], g1[step][n]) for n in g0[step]), step

    # one process (one thread, like the torchrun processes), accumulating over both ranks' micro-batches
    cfg = load_config("tiny-cpu", [*overrides[:-1], f'run.dir="{tmp_path / "one"}"'])
    two_dir = tmp_path / "two"
    mc = ModelConfig.load(two_dir / "init-model" / "config.json")
    sources = [make_data(cfg, mc, RankInfo(rank=r, world=2)) for r in (0, 1)]
    cfg.model.preset, cfg.model.init = "", str(two_dir / "init-model")  # the same initial weights
    grads = {}

    def hook(step, params):
        grads[step] = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    train(cfg, data=Interleaved(sources), grad_hook=hook)
    for step in g0:
        for n, g in g0[step].items():
            assert torch.allclose(g, grads[step][n], rtol=1e-4, atol=1e-6), (step, n)
    one = [r["loss"] for r in read_metrics(tmp_path / "one")]
    two = [r["loss"] for r in read_metrics(tmp_path / "two")]
    assert one == pytest.approx(two, rel=1e-5)
    a, _ = load_model_dir(tmp_path / "one" / "final")
    b, _ = load_model_dir(tmp_path / "two" / "final")
    for (n, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5), n
