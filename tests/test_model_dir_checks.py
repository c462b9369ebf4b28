"""Model directories: every config.json value is checked, and saving over a model is atomic."""

import json
import os
import shutil

import pytest

from nxtrec.errors import NxtrecError
from nxtrec.model.config import ConfigError, ModelConfig
from nxtrec.model.directory import load_model_dir, save_model_dir


def _edited(config: dict, path: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, key = path.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[key] = value
    return config


@pytest.mark.parametrize("path, value, message", [
    ("encoder.width", 64.0, "encoder.width must be an integer, got 64.0"),
    ("decoder.n_heads", True, "decoder.n_heads must be an integer"),
    ("decoder.n_layers", 0, "decoder.n_layers must be > 0"),
    ("encoder.heads", 3, "encoder.width 64 is not divisible by encoder.heads 3"),
    ("decoder.norm_eps", "1e-5", "decoder.norm_eps must be a number"),
    ("decoder.rope_theta", -1.0, "decoder.rope_theta must be > 0"),
    ("image_mean", [0.5, 0.5], "image_mean must be 3 values in [0, 1]"),
    ("image_std", [0.2, 0.2, 0.0], "image_std must be 3 values > 0"),
    ("special_tokens", "<|image|>", "special_tokens must be a list"),
    ("delimiter", "", "delimiter must be non-empty"),
    ("decoder", {}, "'decoder' is missing or empty"),
])
def test_every_config_value_is_type_and_range_checked(tiny_model_dir, path, value, message):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    ModelConfig.from_dict(config)  # the original is fine
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(_edited(config, path, value), source="m/config.json")
    assert str(e.value).startswith("m/config.json: ") and message in str(e.value)


@pytest.mark.parametrize("text, message", [("{}", "'encoder' is missing or empty"), ("[]", "expected a JSON object"),
                                           ("\xff\xfe", "not UTF-8")])
def test_empty_or_odd_config_files_are_errors(tiny_model_dir, tmp_path, text, message):
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    (model / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(NxtrecError, match=message):
        load_model_dir(model)


def test_saving_over_a_model_replaces_it_whole_and_keeps_other_files(tiny_model_dir, tmp_path, monkeypatch):
    model, _ = load_model_dir(tiny_model_dir)
    out = tmp_path / "m"
    save_model_dir(model, tiny_model_dir / "tokenizer.model", out)
    (out / "README.txt").write_text("notes")
    before = {name: (out / name).read_bytes() for name in ("config.json", "model.safetensors")}

    # A save that fails half-way (disk full while writing the weights) leaves the old model.
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        save_model_dir(model, tiny_model_dir / "tokenizer.model", out)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left behind

    model.config.description = "second save"
    save_model_dir(model, out / "tokenizer.model", out)  # the tokenizer may come from `out` itself
    assert load_model_dir(out)[0].config.description == "second save"
    assert (out / "README.txt").read_text() == "notes"
    assert sorted(os.listdir(tmp_path)) == ["m"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NxtrecError, match="not a directory"):
        save_model_dir(model, out / "tokenizer.model", tmp_path / "file")
