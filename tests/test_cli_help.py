"""What the CLI shows people: --help of every command (each option described, with its
default), the one-line note about the bundled model, no third-party chatter."""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path

import torch

from nxtrec.cli.help import DefaultsHelpFormatter
from nxtrec.cli.main import build_parser, main
from nxtrec.cli.predict import DEMO_NOTICE
from nxtrec.model.convert import load_clip
from nxtrec.model.embedders import MiniLMEmbedder
from nxtrec.training.config import CONFIG_DIR

SCENE = str(Path(__file__).resolve().parents[1] / "examples" / "scene.jpg")


def _parsers(parser: argparse.ArgumentParser, name: str = "nxtrec"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from _parsers(child, f"{name} {sub}")


def _shows_a_default(action: argparse.Action) -> bool:
    default = action.default  # 0 is a default to show; None, a flag's False and [] are not
    return not (default is None or default is False or default == [] or default == argparse.SUPPRESS)


def test_every_option_has_help_and_shows_its_default():
    undocumented, no_default = [], []
    for name, parser in _parsers(build_parser()):
        formatter = DefaultsHelpFormatter(name)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            option = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                undocumented.append(option)
            elif action.option_strings and _shows_a_default(action) \
                    and "default" not in formatter._get_help_string(action).lower():
                no_default.append(option)
    assert undocumented == []
    assert no_default == []


def test_help_shows_defaults(capsys):
    assert main(["predict", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "number of labels (one-shot branches) (default: 20)" in text
    assert "extra one-shot branches sampled beyond --top-k (default: 0)" in text
    assert "one JSON object per image" in text and "(default: False)" not in text  # flags: no default shown


def test_train_help_lists_every_shipped_recipe(capsys):
    assert main(["train", "--help"]) == 0
    text = re.sub(r"-\n\s*", "-", capsys.readouterr().out)
    recipes = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    assert {"demo", "demo-stage2", "g3m", "tiny-cpu"} <= set(recipes)
    assert f"({', '.join(recipes)})" in " ".join(text.split())


def test_bundled_model_note_is_one_line_and_silenced_by_quiet_and_json(capsys):
    assert main(["predict", SCENE, "--top-k", "2"]) == 0
    assert capsys.readouterr().err.splitlines() == [DEMO_NOTICE]
    for flag in ("--quiet", "--json"):
        assert main(["predict", SCENE, "--top-k", "2", flag]) == 0
        captured = capsys.readouterr()
        assert captured.err == "" and captured.out


def test_third_party_progress_bars_and_deprecations_are_silenced(tmp_path, capfd):
    MiniLMEmbedder()  # transformers would draw a "Loading weights" bar on stderr
    assert capfd.readouterr().err == ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "clip.pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's torch.jit deprecation would raise here
        assert set(load_clip(tmp_path / "clip.pt")) == {"weight", "bias"}
