"""Training configs: defaults, recipes, inheritance, overrides and their errors."""

from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import pytest

from nxtrec.cli.main import main as cli_main
from nxtrec.training.config import (
    CONFIG_DIR,
    TrainConfig,
    TrainConfigError,
    build_config,
    diff_configs,
    load_config,
    parse_override,
    recipe_names,
)


def test_base_file_lists_every_key_with_the_code_defaults():
    data = tomllib.loads((CONFIG_DIR / "base.toml").read_text())
    defaults = TrainConfig().to_dict()
    assert set(data) == set(defaults)
    for section, body in defaults.items():
        assert set(data[section]) == set(body), section
    assert build_config(data).to_dict() == defaults


def test_shipped_recipes_load():
    assert {"base", "g3m", "g70m", "tiny-cpu"} <= set(recipe_names())
    for name in recipe_names():
        load_config(name)


def test_g3m_is_the_released_recipe():
    c = load_config("g3m")
    assert (c.optim.lr, c.optim.betas, c.optim.eps, c.optim.weight_decay) == (1e-5, [0.9, 0.98], 1e-6, 0.1)
    assert (c.optim.warmup_ratio, c.optim.warmup_steps, c.optim.min_lr) == (0.002, 2000, 0.0)
    assert (c.train.epochs, c.train.global_batch_size, c.train.precision) == (3, 512, "fp16")
    assert c.data.datasets == ["cc3m", "sbu", "coco"] and len(c.data.templates) == 10
    assert c.params.embedding_rows == ["<|image|>"]
    assert "vision_encoder.transformer.resblocks.{-6:}.*" in c.params.trainable
    assert c.optim.decay_also == ["language_decoder.norm.weight"]
    g70 = load_config("g70m")  # inherits g3m, changes the data
    assert g70.data.datasets[0] == "laion115m" and g70.optim.decay_also == c.optim.decay_also


def test_overrides_are_toml_literals():
    assert parse_override("optim.lr=2e-5") == ("optim", "lr", 2e-5)
    assert parse_override("model.compile=true")[2] is True
    assert parse_override('data.shards=["a/*.tar", "b.tar"]')[2] == ["a/*.tar", "b.tar"]
    assert parse_override("run.dir=runs/x")[2] == "runs/x"  # not a literal: a string
    c = load_config("tiny-cpu", ["optim.lr=2e-5", "train.max_steps=7", "optim.warmup_steps=1"])
    assert (c.optim.lr, c.train.max_steps, c.optim.warmup_steps) == (2e-5, 7, 1)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
        ("optimm.lr=1", "unknown section 'optimm' (did you mean 'optim'?)"),
        ("optim.lr=fast", "optim.lr: expected a number"),
        ("train.precision=fp8", "train.precision = 'fp8'; choose one of fp32, bf16, fp16"),
        ("train.micro_batch_size=5", "not a multiple of train.micro_batch_size"),
        ("lr=1", "the key must be section.key"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(TrainConfigError, match=None) as e:
        load_config("tiny-cpu", [override])
    assert message in str(e.value)


def test_files_inherit_and_unknown_keys_in_files_are_errors(tmp_path):
    parent = tmp_path / "parent.toml"
    parent.write_text('inherit = "tiny-cpu"\n[optim]\nlr = 0.5\n')
    child = tmp_path / "child.toml"
    child.write_text('inherit = "parent.toml"\n[train]\nmax_steps = 3\n')
    c = load_config(child)
    assert (c.optim.lr, c.train.max_steps, c.model.preset) == (0.5, 3, "tiny")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nglobal_batchsize = 8\n")
    with pytest.raises(TrainConfigError, match=r"unknown key 'train.global_batchsize' \(did you mean 'train.global_batch_size'\?\)"):
        load_config(bad)
    loop = tmp_path / "loop.toml"
    loop.write_text('inherit = "loop.toml"\n')
    with pytest.raises(TrainConfigError, match="inheritance cycle"):
        load_config(loop)
    with pytest.raises(TrainConfigError, match="did you mean 'tiny-cpu'"):
        load_config("tiny-cp")


def test_resolved_config_round_trips(tmp_path):
    c = load_config("g70m", ['run.dir="a \\"quoted\\" dir"', "optim.lr=3e-7"])
    c.save(tmp_path / "config.toml")
    again = load_config(tmp_path / "config.toml")
    assert again == c and diff_configs(c, again) == []
    again.optim.lr = 1.0
    assert diff_configs(c, again) == ["optim.lr: 3e-07 -> 1.0"]


def test_cli_prints_the_resolved_config_and_reports_bad_keys(capsys):
    assert cli_main(["train", "tiny-cpu", "--set", "optim.lr=0.25", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert tomllib.loads(out)["optim"]["lr"] == 0.25
    assert cli_main(["train", "tiny-cpu", "--set", "optim.weight_decy=0"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optim.weight_decy' (did you mean 'optim.weight_decay'?)" in err
    assert len(err.strip().splitlines()) == 1
