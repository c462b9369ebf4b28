"""What the commands write out (issue #31, "Output that misleads"): greedy and beam labels carry
real probabilities and honour top_k, probabilities are rounded in JSON, a mistyped input
folder is a usage error, and the commands that run the bundled model say so (and show a
loading line on a terminal)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest

from nxtrec.cli import notices
from nxtrec.cli.main import main
from nxtrec.cli.notices import DEMO_NOTICE, check_input_paths, loading
from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import Label

SCENE = str(Path(__file__).resolve().parents[1] / "examples" / "scene.jpg")
LOADING = "nxtrec {}: loading the bundled demo model ...\r\x1b[K"


@pytest.fixture(scope="module")
def bundled():
    from nxtrec.inference.recognizer import Recognizer

    rec = Recognizer.from_pretrained()
    return rec, rec.pixels([SCENE])


@pytest.mark.parametrize("sampler", ["greedy", "beam"])
def test_greedy_and_beam_give_probabilities(bundled, sampler, one_thread):
    rec, pixels = bundled
    [labels] = rec.predict_batch(pixels, sampler=sampler, top_k=5)
    # the answer repeats "snake, snake, ..." to its token limit: 32 snakes were summed to 15.7
    assert [lab.label for lab in labels] == ["snake"]
    assert 0.5 < labels[0].prob < 0.7  # the probability of its first writing (0.62)


def test_greedy_gives_at_most_top_k_labels_ranked(bundled, one_thread):
    rec, pixels = bundled
    answer = rec.predict_batch(pixels, sampler="greedy", repetition_penalty=3.0, top_k=20)[0]  # many labels
    assert 3 < len(answer) <= 20 and len({lab.label for lab in answer}) == len(answer)
    probs = [lab.prob for lab in answer]
    assert all(0.0 < p <= 1.0 for p in probs) and probs == sorted(probs, reverse=True)
    best = rec.predict_batch(pixels, sampler="greedy", repetition_penalty=3.0, top_k=3)[0]
    assert [(lab.label, lab.prob) for lab in best] == [(lab.label, lab.prob) for lab in answer[:3]]


def test_json_probabilities_have_six_significant_digits_and_memory_keeps_them_all():
    lab = Label("cat", 0.123456789, score=3.14159265358)
    assert lab.to_dict() == {"label": "cat", "prob": 0.123457, "score": 3.14159}
    assert lab.prob == 0.123456789
    tiny = Label("ant", 1.23456789e-07).to_dict()["prob"]
    assert tiny == 1.23457e-07  # relative precision kept: not rounded to 0.0
    assert json.loads(json.dumps({"prob": 0.5})) == {"prob": 0.5}


def _significant_digits(number: str) -> int:
    mantissa = re.split("[eE]", number)[0].replace("-", "").replace(".", "").lstrip("0")
    return len(mantissa)


def test_predict_json_lines_round_probabilities(capsys):
    assert main(["predict", SCENE, "--top-k", "20", "--json"]) == 0
    line = capsys.readouterr().out.strip()
    numbers = re.findall(r'"prob": ([-0-9.eE+]+)', line)
    assert len(numbers) == len(json.loads(line)["labels"]) > 1
    assert all(_significant_digits(n) <= 6 for n in numbers), numbers
    assert any(_significant_digits(n) == 6 for n in numbers)  # rounded, not truncated to a few digits


def test_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    missing = tmp_path / "nosuchdir"
    assert main(["predict", SCENE, str(missing)]) == 2  # before the model loads: no result
    out, err = capsys.readouterr()
    assert out == "" and err.strip().splitlines() == [f"nxtrec predict: error: {missing}: no such file or folder"]


def test_tag_inputs_check(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    check_input_paths([str(tmp_path), str(tmp_path / "a.jpg"), str(tmp_path / "*"), "https://example.com/cat"])
    for missing in ("nosuchdir", "gone.jpg"):  # a folder or a file: a usage error either way
        with pytest.raises(NxtrecError, match=rf"{missing}: no such file or folder$"):
            check_input_paths([str(tmp_path / "a.jpg"), str(tmp_path / missing)])


def test_loading_line_only_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, quiet, shown in ((Terminal(), False, True), (Terminal(), True, False), (io.StringIO(), False, False)):
        with loading("tag", "models/x", stream=stream, quiet=quiet):
            pass
        assert stream.getvalue() == ("nxtrec tag: loading model models/x ...\r\x1b[K" if shown else "")
    stream = Terminal()
    with pytest.raises(NxtrecError), loading("tag", None, "onnx-dir", stream=stream):
        raise NxtrecError("bad")
    assert stream.getvalue() == "nxtrec tag: loading ONNX onnx-dir ...\n"  # the error starts its own line


def test_predict_on_a_terminal_shows_loading_then_the_demo_notice(monkeypatch, capsys):
    monkeypatch.setattr(notices, "_is_terminal", lambda stream: True)
    assert main(["predict", SCENE, "--top-k", "2"]) == 0
    assert capsys.readouterr().err == LOADING.format("predict") + DEMO_NOTICE + "\n"
    assert main(["predict", SCENE, "--top-k", "2", "--json"]) == 0
    assert capsys.readouterr().err == ""
    assert "nxtrec download" in DEMO_NOTICE and "docs/models.md" in DEMO_NOTICE


def test_attention_says_it_runs_the_demo_model(tmp_path, capsys):
    assert main(["attention", SCENE, "--out", str(tmp_path / "a.png")]) == 0
    assert capsys.readouterr().err.splitlines() == [DEMO_NOTICE]
    assert main(["attention", SCENE, "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_eval_says_it_runs_the_demo_model(monkeypatch, capsys):
    import nxtrec.engines
    import nxtrec.evaluation.evaluate

    loaded = []
    monkeypatch.setattr(notices, "_is_terminal", lambda stream: True)
    monkeypatch.setattr(nxtrec.engines, "load_engine", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(nxtrec.evaluation.evaluate, "evaluate", lambda *a, load, **k: load("cpu"))  # as rank > 0
    assert main(["eval", "--data", "d"]) == 0
    assert capsys.readouterr().err == DEMO_NOTICE + "\n" + LOADING.format("eval") and loaded == [(None, None)]
    assert main(["eval", "--data", "d", "--model", "m"]) == 0
    assert capsys.readouterr().err == "nxtrec eval: loading model m ...\r\x1b[K"


def test_serve_says_it_runs_the_demo_model(monkeypatch, capsys):
    pytest.importorskip("uvicorn")
    import nxtrec.cli.serve
    import nxtrec.serving.app
    import nxtrec.serving.model_process

    class Engine:
        name = "default-model"

        def close(self):
            pass

    monkeypatch.setattr(nxtrec.serving.model_process, "start_engine_process", lambda *a, **k: Engine())
    monkeypatch.setattr(nxtrec.serving.app, "create_app", lambda *a, **k: None)
    monkeypatch.setattr(nxtrec.cli.serve, "_serve", lambda *a, **k: None)  # no server: only what it says
    assert main(["serve"]) == 0
    ready = "nxtrec serve: model default-model, http://127.0.0.1:8000/ (API docs at /docs)"
    assert capsys.readouterr().err.splitlines() == [DEMO_NOTICE, ready]
    assert main(["serve", "--quiet"]) == 0
    assert DEMO_NOTICE not in capsys.readouterr().err
