import json
import subprocess
import sys

import numpy as np
from PIL import Image

from nxtrec.cli.main import main
from nxtrec.inference.recognizer import Recognizer
from nxtrec.model.tokenizer import Tokenizer


def _images(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (50 + 10 * i, 70, 3), dtype=np.uint8)).save(folder / f"img{i}.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (folder / "empty.png").write_bytes(b"")
    return folder


def test_predict_json_skips_bad_images_and_reports_failure(tiny_model_dir, tmp_path, capsys):
    folder = _images(tmp_path / "imgs")
    code = main(["predict", str(folder), "--model", str(tiny_model_dir), "--top-k", "5", "--json", "--batch-size", "2"])
    out, err = capsys.readouterr()
    assert code == 1
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["image"] for r in rows] == [str(folder / f"img{i}.jpg") for i in range(3)]
    for r in rows:
        assert 1 <= len(r["labels"]) <= 5
        probs = [x["prob"] for x in r["labels"]]
        assert probs == sorted(probs, reverse=True) and all(0 < p <= 1 for p in probs)
    assert "corrupt.jpg" in err and "empty.png" in err and "2 of 5 images failed" in err
    # the same labels through the Python API
    rec = Recognizer.from_pretrained(tiny_model_dir)
    api = rec.predict([str(folder / "img0.jpg")], top_k=5)[0]
    assert [x.label for x in api] == [x["label"] for x in rows[0]["labels"]]


def test_predict_text_output_and_batch_size_invariance(tiny_model_dir, tmp_path, capsys):
    folder = _images(tmp_path / "imgs")
    paths = [str(folder / f"img{i}.jpg") for i in range(3)]
    assert main(["predict", *paths, "--model", str(tiny_model_dir), "--top-k", "4", "--json", "--batch-size", "3"]) == 0
    batched = capsys.readouterr().out
    assert main(["predict", *paths, "--model", str(tiny_model_dir), "--top-k", "4", "--json", "--batch-size", "1"]) == 0
    single = capsys.readouterr().out
    for a, b in zip(batched.splitlines(), single.splitlines()):
        la, lb = json.loads(a)["labels"], json.loads(b)["labels"]
        assert [x["label"] for x in la] == [x["label"] for x in lb]
        assert all(abs(x["prob"] - y["prob"]) < 1e-5 for x, y in zip(la, lb))
    assert main(["predict", paths[0], "--model", str(tiny_model_dir), "--top-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == paths[0] and len(lines) >= 2 and lines[1].startswith("  0.")


def test_predict_with_other_samplers_and_bfloat16(tiny_model_dir, tmp_path, capsys):
    folder = _images(tmp_path / "imgs")
    img = str(folder / "img0.jpg")
    for extra in (["--sampler", "greedy"], ["--sampler", "beam", "--beam-size", "2"], ["--ranking", "ppl"],
                  ["--ranking", "sim"], ["--dtype", "bfloat16"]):
        assert main(["predict", img, "--model", str(tiny_model_dir), "--top-k", "3", "--json", *extra]) == 0, extra
        assert json.loads(capsys.readouterr().out)["image"] == img


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(img)
    assert main(["predict", str(img), "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert "model directory not found" in err and len(err.splitlines()) == 1


def test_init_model_cli_writes_a_loadable_directory(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, "-m", "nxtrec", "init-model", "--preset", "tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rec = Recognizer.from_pretrained(out)
    assert rec.config.decoder.n_layers == 2


def test_special_token_ids_come_from_the_tokenizer(tokenizer, tokenizer_file, tmp_path):
    from nxtrec.model.tokenizer import train_tokenizer

    prompt = tokenizer.prompt_ids("<|image|>", "The objects in the image are")
    assert prompt[:2] == [tokenizer.special_ids["<|image|>"], tokenizer.bos_id]
    assert tokenizer.decode(prompt[2:]) == "The objects in the image are"
    assert tokenizer.encode("a, b")[1] == tokenizer.delimiter_id
    # another tokenizer: other ids, still derived correctly
    other = Tokenizer(train_tokenizer(["zebra; yak; The objects in the image are; are are"] * 50 + ["x, y"],
                                      tmp_path / "o.model", vocab_size=300, pieces=["|", ";"]), ["<|image|>", "<|empty|>"], delimiter=";")
    assert other.delimiter_id != tokenizer.delimiter_id
    assert other.sp.id_to_piece(other.delimiter_id) == ";"
    ids = other.prompt_ids("<|image|>", "The objects in the image are")
    assert ids[0] == other.n_pieces and other.decode(ids[2:]) == "The objects in the image are"
