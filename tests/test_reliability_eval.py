"""`eval` counts the samples of damaged shards and fails on any loss by default; `score --gt`
counts the ground-truth ids without a prediction (issue #33)."""

import json
import tarfile

import datagen

from nxtrec.cli.main import main
from nxtrec.data.pack import PackOptions, pack
from nxtrec.data.sources import jsonl_records


def _packed_then_damaged(root):
    """3 shards of 8 samples packed with a manifest; then 000001.tar is overwritten by a
    non-tar and 000002.tar cut after its first samples: 8 + 6 samples lost."""
    records = jsonl_records(datagen.make_jsonl(root / "src", 24))
    out = root / "val"
    pack(records, out, "jsonl", options=PackOptions(shard_size=8), progress=False)
    (out / "000001.tar").write_bytes(b"<html>not found</html>")
    _cut_after_samples(out / "000002.tar", 2)
    return out


def _cut_after_samples(shard, n):
    """Cut the shard inside the first member after its first `n` samples."""
    with tarfile.open(shard) as tf:
        members = tf.getmembers()
    per_sample = len(members) // len({m.name.split(".")[0] for m in members})
    shard.write_bytes(shard.read_bytes()[: members[per_sample * n].offset + 700])


def test_eval_counts_samples_lost_in_damaged_shards_and_exits_1(tiny_model_dir, tmp_path, capsys):
    data = _packed_then_damaged(tmp_path)
    out = tmp_path / "results" / "run.json"
    code = main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--top-k", "3", "--out", str(out),
                 "--batch-size", "8", "--workers", "0", "-q"])
    captured = capsys.readouterr()
    summary = json.loads(out.read_text())
    n = summary["results"][0]["n_images"]
    assert n == 10  # 8 + 2 readable
    assert summary["skipped"] == {"unreadable shard": 14}
    assert {d["shard"].rsplit("/", 1)[-1]: d["lost"] for d in summary["damaged_shards"]} == {"000001.tar": 8,
                                                                                           "000002.tar": 6}
    assert "skipped 14 of 24 samples" in captured.out and "2 damaged shards" in captured.out
    assert "000001.tar (not a tar file; 8 samples lost)" in captured.out
    assert code == 1 and "more than --max-skipped 0" in captured.err


def test_eval_exits_1_on_a_single_skipped_sample_by_default(tiny_model_dir, tmp_path, capsys):
    records = jsonl_records(datagen.make_jsonl(tmp_path / "src", 8))
    out = tmp_path / "val"
    pack(records, out, "jsonl", options=PackOptions(shard_size=4), progress=False)
    shard = out / "000001.tar"
    _cut_after_samples(shard, 3)  # its manifest entry says 4 samples
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(out), "--top-k", "2", "--batch-size", "8",
            "--workers", "0", "-q"]
    assert main(args) == 1
    assert "unreadable shard" in capsys.readouterr().out
    assert main([*args, "--max-skipped", "0.9"]) == 0


def test_score_counts_ground_truth_without_prediction(tmp_path, capsys):
    pred = tmp_path / "pred.jsonl"
    gt = tmp_path / "gt.jsonl"
    pred.write_text("".join(json.dumps({"image": i, "labels": ["dog"]}) + "\n" for i in (1, 2)))
    gt.write_text("".join(json.dumps({"image": i, "gt": ["dog"]}) + "\n" for i in (1, 2, 3, 4)))
    out = tmp_path / "score.json"
    assert main(["score", str(pred), "--gt", str(gt), "--top-k", "1", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nxtrec score: 2 of 4 ground-truth images have no prediction")
    summary = json.loads(out.read_text())
    assert summary["missing_predictions"] == 2 and summary["missing_ids"] == ["3", "4"]
    assert main(["score", str(pred), "--gt", str(gt), "--top-k", "1"]) == 1
    capsys.readouterr()
    gt.write_text("".join(json.dumps({"image": i, "gt": ["dog"]}) + "\n" for i in (1, 2)))
    assert main(["score", str(pred), "--gt", str(gt), "--top-k", "1"]) == 0
