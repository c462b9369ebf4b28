import json

from nxtrec.cli.main import main
from nxtrec.data.synth import generate


def test_eval_predicts_once_scores_several_k_and_writes_tables(tiny_model_dir, tmp_path, capsys):
    generate(tmp_path / "synth", n=2, n_val=10, size=96, shard_size=4, progress=False)
    out = tmp_path / "results" / "tiny.json"
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "synth" / "val"), "--top-k", "5", "10",
            "--out", str(out), "--batch-size", "4", "--workers", "0"]
    assert main(args) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:4] == ["k", "R", "P", "F1"] and [l.split()[0] for l in table[1:]] == ["5", "10"]
    summary = json.loads(out.read_text())
    assert [r["k"] for r in summary["results"]] == [5, 10]
    assert all(r["n_images"] == 10 and 0 <= r["f1"] <= 1 for r in summary["results"])
    rows = [json.loads(l) for l in out.with_suffix(".jsonl").read_text().splitlines()]
    assert len(rows) == 10 and all(len(r["pred"]) <= 10 and r["gt"] and set(r["scores"]) == {"5", "10"} for r in rows)
    # the table of runs grows by one row per k and run
    assert main(args) == 0
    md = (out.parent / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and (out.parent / "results.csv").read_text().count("\n") == 1 + 4
    # `nxtrec score` recomputes the same numbers from the saved predictions
    capsys.readouterr()
    assert main(["score", str(out.with_suffix(".jsonl")), "--top-k", "5", "10"]) == 0
    rescored = capsys.readouterr().out.splitlines()
    assert rescored == table


def test_evaluation_inside_training_logs_rpf1(tmp_path):
    from nxtrec.training.logger import read_metrics

    generate(tmp_path / "synth", n=16, n_val=6, size=64, shard_size=8, progress=False)
    run = tmp_path / "run"
    code = main(["train", "tiny-cpu", "--set", f'data.shards=["{tmp_path}/synth/train/*.tar"]', "--set", "train.max_steps=4",
                 "--set", "eval.every=2", "--set", f'eval.data="{tmp_path}/synth/val"', "--set", "eval.images=4",
                 "--set", f'run.dir="{run}"', "--set", "log.progress=false"])
    assert code == 0
    evals = [m for m in read_metrics(run) if "eval_F1@5" in m]
    assert [m["step"] for m in evals] == [2, 4]
    assert all(0 <= m[f"eval_{x}@{k}"] <= 1 for m in evals for x in ("R", "P", "F1") for k in (5, 10))
