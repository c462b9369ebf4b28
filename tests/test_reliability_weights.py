"""Model weights of a non-float dtype or holding NaN are refused by the loader and by
`nxtrec verify`; the int8 format still loads and verifies (issue #33)."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nxtrec.cli.main import main
from nxtrec.model.directory import load_model_dir, quantize_model_dir, verify_model_dir
from nxtrec.model.files import CheckpointError

EXAMPLE = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))[:1]


def _damaged_copy(src, dst, how):
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    key = sorted(state)[3]
    if how == "int32":
        state[key] = state[key].to(torch.int32)
    else:
        state[key] = state[key].clone()
        state[key].view(-1)[1] = float("nan")
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst, key


@pytest.mark.parametrize("how, reason", [("int32", "has dtype int32"), ("nan", "holds 1 NaN and 0 infinite")])
def test_bad_weights_are_refused_by_load_predict_and_verify(tiny_model_dir, tmp_path, capsys, how, reason):
    bad, key = _damaged_copy(tiny_model_dir, tmp_path / "bad", how)
    with pytest.raises(CheckpointError, match=f"tensor '{key}' {reason}"):
        load_model_dir(bad)
    with pytest.raises(CheckpointError, match=reason):
        verify_model_dir(bad)
    assert main(["verify", str(bad), str(tiny_model_dir)]) == 1
    out, err = capsys.readouterr()
    assert f"FAILED {bad}/model.safetensors: tensor '{key}' {reason}" in err
    assert f"{tiny_model_dir}: ok" in out and "float32, all finite" in out
    if EXAMPLE:
        assert main(["predict", str(EXAMPLE[0]), "--model", str(bad), "-q"]) == 2
        assert reason in capsys.readouterr().err


def test_the_int8_format_still_loads_and_verifies(tiny_model_dir, tmp_path):
    out = quantize_model_dir(tiny_model_dir, tmp_path / "int8")
    assert load_model_dir(out)[0] is not None
    assert verify_model_dir(out)  # the int8 and int64 tensors of the format are expected there


def test_check_weights_finds_inf_in_a_later_chunk(monkeypatch):
    from nxtrec.model import files
    from nxtrec.model.files import check_weights

    monkeypatch.setattr(files, "FINITE_CHUNK", 4)
    t = torch.zeros(10)
    t[9] = float("-inf")
    with pytest.raises(CheckpointError, match="holds 0 NaN and 1 infinite values of 10"):
        check_weights({"w": t}, "x")
    assert check_weights({"w": torch.zeros(10, dtype=torch.bfloat16)}, "x") == "bfloat16"
