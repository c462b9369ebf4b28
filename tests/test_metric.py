"""The metric against a direct, slow implementation of its definition, with the real MiniLM."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nxtrec.cli.score import load_prediction_records
from nxtrec.evaluation.metric import score_records
from nxtrec.model.embedders import MiniLMEmbedder

RECORDS = [
    {"image": "a", "gt": ["dog", "frisbee", "grass", "park"], "pred": ["dog", "grass", "ball", "tree", "sky", "park", "man", "field", "toy", "lawn", "puppy"]},
    {"image": "b", "gt": ["kitchen", "oven", "woman"], "pred": ["kitchen"]},  # one prediction
    {"image": "c", "gt": ["cloud", "sky"], "pred": ["sky", "sky", "cloud", "cloud"]},  # duplicates
    {"image": "d", "gt": [], "pred": ["car", "road"]},  # caption without nouns
    {"image": "e", "gt": ["café", "crème", "東京"], "pred": ["coffee", "cafe", "tokyo", "übermensch"]},  # non-ASCII
    {"image": "f", "gt": ["airplane", "cargo", "ship"], "pred": []},  # no prediction
]


@pytest.fixture(scope="module")
def embedder():
    return MiniLMEmbedder()


def slow_scores(model, tokenizer, records, k):
    """Section 11 followed literally, as the reference does it: every label of every image
    encoded on its own, padded to 128 tokens, mean-pooled over the mask, then cosine, max, mean."""

    def encode(text):
        tok = tokenizer(text, max_length=128, truncation=True, padding="max_length", return_tensors="pt")
        with torch.no_grad():
            hidden = model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).float()
        return ((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))[0]

    rs, ps, fs, dms, dss = [], [], [], [], []
    for r in records:
        gt = F.normalize(torch.stack([encode(t) for t in (r["gt"] or [""])]), dim=1)
        pred = F.normalize(torch.stack([encode(t) for t in (r["pred"][:k] or [""])]), dim=1)
        s = gt @ pred.T
        rec, prec = s.max(1).values.mean(), s.max(0).values.mean()
        rs.append(rec.item())
        ps.append(prec.item())
        fs.append(torch.nan_to_num(2 * rec * prec / (rec + prec)).item())
        d = torch.triu(pred @ pred.T, diagonal=1)
        d = d[d != 0]
        dms.append(d.mean().nan_to_num(0.0).item())
        dss.append(d.std().nan_to_num(0.0).item())
    n = len(records)
    return sum(rs) / n, sum(ps) / n, sum(fs) / n, sum(dms) / n, sum(dss) / n


@pytest.mark.parametrize("k", [1, 10])
def test_metric_equals_the_direct_definition(embedder, k):
    ours = score_records(RECORDS, [k], embedder)[k]
    slow = slow_scores(embedder.model, embedder.tokenizer, RECORDS, k)
    for a, b in zip((ours.recall, ours.precision, ours.f1, ours.div_mean, ours.div_std), slow):
        assert abs(a - b) < 1e-6
    assert ours.n_images == 6 and ours.n_empty_gt == 1
    assert 0.3 < ours.recall < 1.0 and 0.3 < ours.precision < 1.0


def test_perfect_and_duplicate_predictions(embedder):
    perfect = score_records([{"image": 1, "gt": ["dog", "cat"], "pred": ["cat", "dog"]}], [10], embedder)[10]
    assert perfect.recall == pytest.approx(1.0, abs=1e-6) and perfect.f1 == pytest.approx(1.0, abs=1e-6)
    dup = score_records([{"image": 1, "gt": ["dog"], "pred": ["dog", "dog"]}], [10], embedder)[10]
    assert dup.div_mean == pytest.approx(1.0, abs=1e-6) and dup.div_std == 0.0


def test_embeddings_are_cached_and_independent_of_batching(embedder):
    labels = ["dog", "hot dog", "a very long label " * 5, "東京"]
    first = embedder.embed(labels).clone()
    fresh = MiniLMEmbedder(batch_size=1)
    assert torch.allclose(first, fresh.embed(labels[::-1])[[3, 2, 1, 0]], atol=1e-6)
    assert set(labels) <= set(embedder.cache)


def test_score_cli_reads_other_systems_predictions(tmp_path, capsys):
    from nxtrec.cli.main import main

    preds = tmp_path / "preds.jsonl"
    gt = tmp_path / "gt.jsonl"
    preds.write_text("\n".join(json.dumps({"image": r["image"], "labels": r["pred"]}) for r in RECORDS) + "\n")
    gt.write_text("\n".join(json.dumps({"image": r["image"], "gt": r["gt"]}) for r in RECORDS) + "\n")
    assert main(["score", str(preds), "--gt", str(gt), "--top-k", "1", "10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:4] == ["k", "R", "P", "F1"] and len(out) == 3
    records = load_prediction_records(str(preds), str(gt))
    assert records[3]["gt"] == [] and records[0]["pred"][0] == "dog"
    (tmp_path / "bad.jsonl").write_text('{"image": 1}\n')
    assert main(["score", str(tmp_path / "bad.jsonl")]) == 2


MERGE_SCRIPT = """
import json, sys, torch.distributed as dist
from nxtrec.evaluation.evaluate import gather_records, score
dist.init_process_group("gloo")
records = json.load(open(sys.argv[1]))
mine = records[dist.get_rank()::dist.get_world_size()]
merged = gather_records(mine)
if dist.get_rank() == 0:
    s = score(merged, [1, 10])
    json.dump({k: v.row() for k, v in s.items()}, open(sys.argv[2], "w"))
dist.destroy_process_group()
"""


def test_torchrun_merge_equals_one_process(tmp_path):
    """2 ranks, each with half of the images, merged on rank 0 == 1 rank with all of them
    (same thread count in both, so even the float rounding is the same)."""
    (tmp_path / "records.json").write_text(json.dumps(RECORDS))
    (tmp_path / "merge.py").write_text(MERGE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = {}
    for n, port in ((2, "29531"), (1, "29532")):
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port", port,
                               str(tmp_path / "merge.py"), str(tmp_path / "records.json"), str(tmp_path / f"out{n}.json")],
                              capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[n] = json.loads((tmp_path / f"out{n}.json").read_text())
    assert results[2] == results[1]
    assert results[2]["10"]["n_images"] == len(RECORDS)
