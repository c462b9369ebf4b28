"""`nxtrec quantize`: an int8 model saved once loads as the model `--dtype int8` quantises at
load time, and a damaged or misused one is refused in one line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nxtrec.cli.main import main
from nxtrec.errors import NxtrecError
from nxtrec.inference.recognizer import Recognizer
from nxtrec.model.config import ConfigError, ModelConfig
from nxtrec.model.directory import CheckpointError, default_model_dir, load_model_dir, verify_model_dir

OUTPUT = "language_decoder.output"  # a Linear layer without bias
C_FC = "vision_encoder.transformer.resblocks.0.mlp.c_fc"  # one with


def nxtrec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nxtrec", *args], capture_output=True, text=True, check=False,
                          timeout=300)


@pytest.fixture(scope="module")
def int8_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize") / "default-int8"
    proc = nxtrec("quantize", "--out", str(out))  # --model defaults to the bundled model
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}")
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


def _edited(src, dst, edit):
    """A copy of model directory `src` whose weights went through `edit(state)`."""
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_the_saved_format(int8_dir):
    config = json.loads((int8_dir / "config.json").read_text())
    assert config["quantization"] == {"method": "dynamic-int8", "granularity": "per-channel"}
    state = load_file(str(int8_dir / "model.safetensors"))
    rows = state[f"{OUTPUT}.weight"].shape[0]
    assert state[f"{OUTPUT}.weight"].dtype == torch.int8
    assert state[f"{OUTPUT}.weight_scale"].shape == (rows,) and state[f"{OUTPUT}.weight_scale"].dtype == torch.float64
    assert state[f"{OUTPUT}.weight_zero_point"].dtype == torch.int64
    assert f"{OUTPUT}.bias" not in state and state[f"{C_FC}.bias"].dtype == torch.float32
    assert state["language_decoder.tok_embeddings.weight"].dtype == torch.float32
    # the float model's config.json has no quantization entry, as before
    assert "quantization" not in json.loads((default_model_dir() / "config.json").read_text())
    assert "quantization" not in ModelConfig.load(default_model_dir() / "config.json").to_dict()


def test_verify_checks_a_quantised_directory(int8_dir, capsys):
    assert main(["verify", str(int8_dir)]) == 0
    out = capsys.readouterr().out
    assert "ok, model directory:" in out and "Linear layers int8 (dynamic-int8 per-channel)" in out


def test_loads_as_the_model_quantised_at_load_time(int8_dir, photos):
    at_load = Recognizer.from_pretrained(None, dtype="int8")
    for dtype in ("int8", "float32"):  # a saved int8 model is int8 whatever is asked
        saved = Recognizer.from_pretrained(int8_dir, dtype=dtype)
        assert not any(type(m) is torch.nn.Linear for m in saved.model.modules())
        assert saved.config.quantization == at_load.config.quantization
        for a, b in zip(at_load.predict(photos, top_k=10), saved.predict(photos, top_k=10)):
            assert [x.label for x in a] == [x.label for x in b]
            assert all(abs(x.prob - y.prob) <= 1e-6 for x, y in zip(a, b))


def test_load_model_dir_quantises_a_float_model_when_asked_for_int8():
    model, _ = load_model_dir(default_model_dir(), dtype="int8")
    assert model.config.quantization == {"method": "dynamic-int8", "granularity": "per-channel"}
    assert not any(type(m) is torch.nn.Linear for m in model.modules())


def test_loading_reads_no_float_linear_weights(int8_dir, monkeypatch):
    # the float path reads the whole file with load_file; the int8 one must not
    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read as a float model"))
    model, _ = load_model_dir(int8_dir)
    assert model.language_decoder.output.weight().dtype == torch.qint8


def test_other_dtypes_and_devices_are_refused(int8_dir):
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(NxtrecError) as e:
            Recognizer.from_pretrained(int8_dir, dtype=dtype)
        assert f"loads as int8 (or float32, the same), not {dtype}" in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_model_dir(int8_dir, device="meta")
    assert "runs on the CPU only, not meta" in _one_line(e)


def test_quantising_twice_is_refused(int8_dir, tmp_path):
    proc = nxtrec("quantize", "--model", str(int8_dir), "--out", str(tmp_path / "again"))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "already quantised" in proc.stderr and not (tmp_path / "again").exists()


def test_a_truncated_file_is_refused(int8_dir, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(int8_dir, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        load_model_dir(bad)
    assert _one_line(e).startswith(f"{weights}: cannot read safetensors file")
    proc = nxtrec("verify", str(bad))
    assert proc.returncode == 1 and "FAILED" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _drop_scale(state):
    del state[f"{OUTPUT}.weight_scale"]


def _wrong_shape(state):
    state[f"{C_FC}.weight_zero_point"] = state[f"{C_FC}.weight_zero_point"][:-1].clone()


def _float_weight(state):
    state[f"{OUTPUT}.weight"] = state[f"{OUTPUT}.weight"].float()


def _bad_scale(state):
    state[f"{OUTPUT}.weight_scale"][3] = float("nan")


@pytest.mark.parametrize("edit, message", [
    (_drop_scale, f"missing tensor '{OUTPUT}.weight_scale'"),
    (_wrong_shape, f"tensor '{C_FC}.weight_zero_point' has shape"),
    (_float_weight, f"tensor '{OUTPUT}.weight' is float32, the dynamic-int8 format stores it as int8"),
    (_bad_scale, f"{OUTPUT}.weight_scale holds values that are not finite and > 0"),
])
def test_damaged_tensors_are_refused_by_load_and_verify(int8_dir, tmp_path, edit, message):
    bad = _edited(int8_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        load_model_dir(bad)
    assert message in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        verify_model_dir(bad)
    assert message in _one_line(e)


def test_unknown_quantization_values_are_refused(int8_dir):
    config = json.loads((int8_dir / "config.json").read_text())
    config["quantization"] = {"method": "awq-int4", "granularity": "per-channel"}
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(config, source="m/config.json")
    assert _one_line(e).startswith('m/config.json: quantization must be {"method": "dynamic-int8"')
