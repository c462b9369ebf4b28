"""`nxtrec eval` counts the samples it skipped by reason, in its summary JSON and under its
table, and fails above --max-skipped."""

import io
import json

from PIL import Image

from nxtrec.cli.main import main


def _shard_with_a_corrupt_image(path, n=6, corrupt_at=2):
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (64, 64), (40 * i, 100, 200)).save(buf, format="JPEG")
            image = b"\xff\xd8 not really a jpeg" if i == corrupt_at else buf.getvalue()
            w.write({"__key__": f"{i:04d}", "jpg": image, "json": json.dumps({"labels": ["dog", "ball"]}).encode()})


def test_eval_reports_skipped_samples_and_fails_above_the_limit(tiny_model_dir, tmp_path, capsys):
    _shard_with_a_corrupt_image(tmp_path / "val" / "000000.tar")
    out = tmp_path / "results" / "run.json"
    args = ["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "val"), "--top-k", "5", "--out", str(out),
            "--batch-size", "2", "--workers", "0"]
    assert main(args) == 1  # 1 of 6 skipped > the default 0 (no loss goes unnoticed)
    captured = capsys.readouterr()
    assert "skipped 1 of 6 samples (16.7%: corrupt image 1)" in captured.out
    assert "more than --max-skipped 0;" in captured.err and "Traceback" not in captured.err
    summary = json.loads(out.read_text())
    assert summary["skipped"] == {"corrupt image": 1} and summary["results"][0]["n_images"] == 5
    assert main([*args, "--max-skipped", "0.2"]) == 0
