"""`--exclude`, `--replace`, `--min-prob`: the rule files and the merging of renamed labels (no
model), then through `nxtrec predict`, the Python API and `nxtrec tag` records; bad files, a
top-k over the vocabulary and an attention head out of range are refused before any weights
load. (ONNX: tests/test_onnx.py; serve: tests/test_serve.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datagen
import numpy as np
import pytest

from nxtrec.cli.main import main
from nxtrec.errors import NxtrecError
from nxtrec.inference.engine import Capabilities, DecodeOptions, finish_labels
from nxtrec.inference.label_rules import (
    LabelRules,
    LabelRulesError,
    ReplaceRules,
    as_exclude_list,
    as_replace_rules,
    normalize,
    rules_for,
)
from nxtrec.inference.ranking import Branch, Label

SCENE = Path(__file__).resolve().parents[1] / "examples" / "scene.jpg"
CAPS = Capabilities(samplers=("one-shot", "greedy"), maps=False, needs="nothing")


def rule_names(labels: list[str], n: int = 3) -> list[str]:
    """The first n labels usable in a line of a rule file (printable, no `|`, `->` or `#`),
    each distinct after normalisation from every other label of the list."""
    keys = [normalize(x) for x in labels]
    ok = [x for x, k in zip(labels, keys)
          if k and keys.count(k) == 1 and x.isprintable() and not re.search(r"\||->|#", x)]  # fmt: skip
    assert len(ok) >= n, labels
    return ok[:n]


# ---------------------------------------------------------------------------------------
# the rules, no model
# ---------------------------------------------------------------------------------------


def test_replace_rules_parse_synonyms_comments_and_normalise():
    rules = ReplaceRules.from_lines(["# renames", "", "Kitten |  KITTY  cat -> cat", "automobile->Car", "cat -> cat"])
    assert dict(rules.rules) == {"kitten": "cat", "kitty cat": "cat", "automobile": "Car", "cat": "cat"}
    assert as_replace_rules({"a | b": "c"}).rules == (("a", "c"), ("b", "c"))
    assert as_exclude_list(["word | TEXT", "# no", "ring"]).entries == (("word", "TEXT"), ("ring",))


@pytest.mark.parametrize("lines,message", [
    (["cat"], ":1: 'cat' is not a rule"),
    (["# c", "cat -> "], ":2: 'cat ->' is not a rule"),
    ([" -> cat"], "is not a rule"),
    (["a -> b | c"], "is not a rule"),
    (["a -> b -> c"], "is not a rule"),
    (["a -> b", "A -> c"], ":2: 'a' is already replaced by 'b'"),
    (["# only a comment"], "no replace rules"),
])  # fmt: skip
def test_bad_replace_rules_are_one_line_errors(lines, message):
    with pytest.raises(LabelRulesError) as e:
        ReplaceRules.from_lines(lines, "rename.txt")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_or_empty_files_are_errors(tmp_path):
    with pytest.raises(LabelRulesError, match="not found"):
        ReplaceRules.load(tmp_path / "none.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(LabelRulesError, match="exclude list: .*empty"):
        as_exclude_list(tmp_path / "empty.txt")
    with pytest.raises(LabelRulesError):
        DecodeOptions(replace=["no arrow"]).check(CAPS)
    with pytest.raises(NxtrecError, match="min_prob"):
        DecodeOptions(min_prob=1.5).check(CAPS)


def test_apply_drops_renames_merges_and_reranks():
    labels = [Label("snake", 0.4), Label("Kitten", 0.3), Label("ring", 0.15), Label("kitty ", 0.1),
              Label("cat", 0.05), Label("Word", 0.03)]  # fmt: skip
    rules = LabelRules(as_exclude_list(["word | text", "ring"]), as_replace_rules({"kitten | kitty": "cat"}))
    summed = rules.apply(labels)  # cat: 0.25 + 0.1 + 0.05, now ahead of snake
    assert [x.label for x in summed] == ["cat", "snake"] and summed[0].prob == pytest.approx(0.45)
    # greedy / beam: one answer's labels are not alternatives, the highest is kept
    assert [(x.label, x.prob) for x in rules.apply(labels, add=False)] == [("snake", 0.4), ("cat", 0.3)]
    # ppl / sim order: the merged label takes its best-ranked label's place and score
    scored = [Label(x.label, x.prob, score=i) for i, x in enumerate(labels)]
    assert [(x.label, x.score) for x in rules.apply(scored, by_prob=False)] == [("snake", 0), ("cat", 1)]
    # a label whose replacement is excluded goes; a sum is capped at 1
    dropped = LabelRules(as_exclude_list(["cat"]), as_replace_rules(["kitten -> cat"])).apply(labels)
    assert [x.label for x in dropped] == ["snake", "ring", "kitty ", "Word"]
    capped = LabelRules(None, as_replace_rules(["b -> a"])).apply([Label("a", 0.7), Label("b", 0.6)])
    assert [(x.label, x.prob) for x in capped] == [("a", 1.0)]


def test_merged_maps_are_weighted_by_probability():
    m1, m2 = np.eye(3, dtype=np.float32), np.full((3, 3), 1 / 9, dtype=np.float32)
    [merged] = LabelRules(None, as_replace_rules(["b -> a"])).apply([Label("a", 0.3, map=m1), Label("b", 0.1, map=m2)])
    np.testing.assert_allclose(merged.map, 0.75 * m1 + 0.25 * m2, rtol=1e-6)


def test_finish_labels_applies_rules_before_the_top_k_cut_and_min_prob_after():
    names = ["snake", "word", "kitten", "cat", "ring"]
    branches = [[Branch([i], [p, 1.0]) for i, p in enumerate([0.3, 0.25, 0.22, 0.1, 0.05])]]

    def finish(**options):
        return [(x.label, round(x.prob, 6)) for x in finish_labels(branches, DecodeOptions(top_k=2, **options),
                                                                  lambda t: names[t[0]], 99, None)[0]]  # fmt: skip

    assert finish() == [("snake", 0.3), ("word", 0.25)]
    rules = {"exclude": ["word"], "replace": ["kitten -> cat"]}
    assert finish(**rules) == [("cat", 0.32), ("snake", 0.3)]  # two labels although one was excluded
    assert finish(**rules, min_prob=0.31) == [("cat", 0.32)]
    assert finish(**rules, sampler="greedy") == [("snake", 0.3), ("cat", 0.22)]
    assert finish(min_prob=0.28) == [("snake", 0.3)]


def test_rule_files_are_read_once(tmp_path):
    path = tmp_path / "rename.txt"
    path.write_text("a -> b\n")
    assert rules_for(None, str(path)) is rules_for(None, str(path))
    assert rules_for() is None


# ---------------------------------------------------------------------------------------
# through the commands and the API (bundled model; tag: the tiny model)
# ---------------------------------------------------------------------------------------


def _predict(capsys, *args) -> list[dict]:
    assert main(["predict", str(SCENE), "--json", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)["labels"]


def test_predict_cli_exclude_replace_and_min_prob(tmp_path, capsys, one_thread):
    plain = _predict(capsys, "--top-k", "8")
    top, a, b = rule_names([x["label"] for x in plain])
    (tmp_path / "undesired.txt").write_text(f"# undesired\n{top.upper()} | not a label\n")
    (tmp_path / "rename.txt").write_text(f"{a} | {b} -> merged thing\n")
    got = _predict(capsys, "--top-k", "8", "--exclude", tmp_path / "undesired.txt", "--replace", tmp_path / "rename.txt")
    rest = [x for x in plain if x["label"] not in (top, a, b)]
    merged = {"label": "merged thing", "prob": sum(x["prob"] for x in plain if x["label"] in (a, b))}
    want = sorted([merged, *rest], key=lambda x: -x["prob"])
    assert [x["label"] for x in got] == [x["label"] for x in want]
    assert [x["prob"] for x in got] == pytest.approx([x["prob"] for x in want], rel=1e-5)
    assert plain[2]["prob"] > plain[3]["prob"]
    threshold = (plain[2]["prob"] + plain[3]["prob"]) / 2
    assert _predict(capsys, "--top-k", "8", "--min-prob", threshold) == plain[:3]


def test_python_api_takes_lines_and_a_mapping(one_thread):
    from nxtrec.inference.recognizer import Recognizer

    rec = Recognizer.from_pretrained()
    [plain] = rec.predict([str(SCENE)], top_k=8)
    top, a, b = rule_names([x.label for x in plain])
    [got] = rec.predict([str(SCENE)], top_k=8, exclude=[top], replace={f"{a} | {b}": "merged thing"}, min_prob=1e-9)
    names = [x.label for x in got]
    assert top not in names and a not in names and b not in names
    merged = got[names.index("merged thing")]
    assert merged.prob == pytest.approx(sum(x.prob for x in plain if x.label in (a, b)))
    assert [x.prob for x in got] == sorted((x.prob for x in got), reverse=True)


def _images(folder: Path, n: int = 4) -> Path:
    for i in range(n):
        datagen.write_image(folder / f"img{i}.jpg", i, size=(40 + 5 * i, 36 + 3 * i))
    return folder


def _tag_records(out: Path) -> dict[str, list[dict]]:
    recs = [json.loads(line) for part in sorted(out.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    return {r["id"]: r["labels"] for r in recs}


def test_tag_records_apply_the_rules_as_predict_does(tmp_path, one_thread):
    """The bundled model (its labels are words that fit in a rule file)."""
    from nxtrec.inference.recognizer import Recognizer

    images = _images(tmp_path / "imgs")
    base = ["tag", str(images), "--workers", "1", "--top-k", "6"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    plain = _tag_records(tmp_path / "plain")
    first = plain[min(plain)]
    top, a, b = rule_names([x["label"] for x in first])
    (tmp_path / "ex.txt").write_text(f"{top}\n")
    (tmp_path / "re.txt").write_text(f"{a} | {b} -> merged thing\n")
    rules = ["--exclude", str(tmp_path / "ex.txt"), "--replace", str(tmp_path / "re.txt")]
    assert main([*base, "--out", str(tmp_path / "ruled"), *rules]) == 0
    ruled = _tag_records(tmp_path / "ruled")
    assert ruled.keys() == plain.keys()
    merged = {x["label"]: x["prob"] for x in ruled[min(ruled)]}
    assert top not in merged and a not in merged and b not in merged
    assert merged["merged thing"] == pytest.approx(sum(x["prob"] for x in first if x["label"] in (a, b)), rel=1e-5)
    want = Recognizer.from_pretrained().predict(sorted(ruled), top_k=6, exclude=[top],
                                                              replace=[f"{a} | {b} -> merged thing"])  # fmt: skip
    for path, labels in zip(sorted(ruled), want):
        assert [x["label"] for x in ruled[path]] == [x.label for x in labels]
        assert [x["prob"] for x in ruled[path]] == pytest.approx([x.prob for x in labels], rel=1e-5)
    settings = json.loads((tmp_path / "ruled" / "manifest.json").read_text())["settings"]["options"]
    assert settings["exclude"] == rules[1] and settings["replace"] == rules[3]


def test_tag_runs_int8(tiny_model_dir, tmp_path, one_thread):
    images = _images(tmp_path / "imgs", n=3)
    out = tmp_path / "out"
    assert main(["tag", str(images), "--model", str(tiny_model_dir), "--workers", "1", "--top-k", "4",
                 "--dtype", "int8", "--out", str(out)]) == 0  # fmt: skip
    records = _tag_records(out)
    assert len(records) == 3 and all(1 <= len(labels) <= 4 for labels in records.values())
    assert json.loads((out / "manifest.json").read_text())["settings"]["options"]["dtype"] == "int8"


# ---------------------------------------------------------------------------------------
# refused before any weights load
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_weights(monkeypatch):
    """Loading a model fails the test: every check below must come first."""
    import nxtrec.engines
    import nxtrec.tagging.job
    from nxtrec.inference.recognizer import Recognizer

    def refuse(*args, **kwargs):
        raise AssertionError("the model's weights were loaded")

    monkeypatch.setattr(nxtrec.engines, "load_engine", refuse)
    monkeypatch.setattr(nxtrec.tagging.job, "load_engine", refuse)
    monkeypatch.setattr(Recognizer, "from_pretrained", refuse)


@pytest.mark.parametrize("command", ["predict", "tag"])
def test_bad_rule_files_fail_in_one_line_before_loading(command, tmp_path, capsys, no_weights):
    bad, empty = tmp_path / "bad.txt", tmp_path / "empty.txt"
    bad.write_text("# renames\ncat => dog\n")
    empty.write_text("\n# nothing\n")
    args = [command, str(SCENE)] + (["--out", str(tmp_path / "out")] if command == "tag" else [])
    assert main([*args, "--replace", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: 'cat => dog' is not a rule" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "bad.txt" in line]) == 1
    assert main([*args, "--exclude", str(empty)]) == 2
    assert "exclude list" in capsys.readouterr().err
    assert main([*args, "--exclude", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_top_k_over_the_vocabulary_is_refused_before_loading(capsys, no_weights):
    assert main(["predict", str(SCENE), "--top-k", "1000", "--extra-k", "3"]) == 2
    assert "more than the model's 1002 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--head", "16"), ("--layer", "7"), ("--head", "x")])
def test_attention_head_or_layer_out_of_range_is_refused_before_loading(option, value, tmp_path, capsys, no_weights):
    assert main(["attention", str(SCENE), option, value, "--out", str(tmp_path / "a.png")]) == 2
    assert f"{option} {value!r}: expected 'all' or a number from 0 to" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
