"""The whole pipeline from nothing, on CPU: synthetic scenes -> shards -> training -> evaluation
-> ONNX export -> predictions with both back ends."""

import json

from nxtrec.cli.main import main
from nxtrec.data.synth import generate
from nxtrec.training.logger import read_metrics


def test_synth_pack_train_eval_export_predict(tmp_path, capsys):
    data = tmp_path / "synth"
    summaries = generate(data, n=200, seed=3, n_val=24, size=64, shard_size=50, progress=False)
    assert summaries["train"].written == 200 and summaries["val"].written == 24
    assert len(list((data / "train").glob("*.tar"))) == 4

    run = tmp_path / "run"
    assert main(["train", "tiny-cpu", "--set", f'data.shards=["{data}/train/*.tar"]', "--set", f'model.tokenizer="{data}/tokenizer.model"',
                 "--set", "train.max_steps=36", "--set", f'run.dir="{run}"', "--set", "log.progress=false"]) == 0
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 36 and sum(losses[-6:]) / 6 < 0.6 * sum(losses[:3]) / 3

    out = tmp_path / "eval" / "tiny.json"
    assert main(["eval", "--model", str(run / "final"), "--data", str(data / "val"), "--top-k", "5", "--out", str(out),
                 "--batch-size", "8", "--workers", "0"]) == 0
    result = json.loads(out.read_text())["results"][0]
    assert result["n_images"] == 24 and 0.2 < result["recall"] <= 1 and 0.2 < result["precision"] <= 1

    onnx_dir = tmp_path / "onnx"
    assert main(["export-onnx", "--model", str(run / "final"), "--out", str(onnx_dir)]) == 0
    images = sorted((data / "images" / "val").glob("*.jpg"))[:3]
    capsys.readouterr()
    assert main(["predict", *map(str, images), "--model", str(run / "final"), "--top-k", "5", "--json"]) == 0
    torch_rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert main(["predict", *map(str, images), "--onnx", str(onnx_dir), "--top-k", "5", "--json"]) == 0
    onnx_rows = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert len(torch_rows) == len(onnx_rows) == 3
    for a, b in zip(torch_rows, onnx_rows):
        assert [x["label"] for x in a["labels"]] == [x["label"] for x in b["labels"]]
        assert all(abs(x["prob"] - y["prob"]) < 1e-4 for x, y in zip(a["labels"], b["labels"]))
