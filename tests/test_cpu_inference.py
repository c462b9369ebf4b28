"""The CPU inference paths of `Recognizer.from_pretrained` (nxtrec.inference.cpu): float32 on
oneDNN gives the labels of the plain PyTorch model; int8 and bfloat16 agree with float32 on
the real test photos within the tolerance documented in README ("Speed on the CPU")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nxtrec.errors import NxtrecError
from nxtrec.inference.cpu import OneDnnLinear, onednn_available
from nxtrec.inference.recognizer import Recognizer
from nxtrec.model.directory import default_model_dir, load_model_dir


@pytest.fixture(scope="module")
def plain_labels(photos):
    """float32 labels of the bundled model without the CPU preparation."""
    model, tokenizer = load_model_dir(default_model_dir())
    return Recognizer(model, tokenizer).predict(photos, top_k=10)


def agreement(ref, other):
    """(images with the same top label, mean top-10 overlap)."""
    same_top = sum(a[0].label == b[0].label for a, b in zip(ref, other))
    overlap = [len({x.label for x in a} & {y.label for y in b}) / len(a) for a, b in zip(ref, other)]
    return same_top, sum(overlap) / len(overlap)


@pytest.mark.skipif(not onednn_available(), reason="PyTorch built without oneDNN")
def test_float32_on_onednn_gives_the_plain_labels(photos, plain_labels):
    rec = Recognizer.from_pretrained(None)
    assert isinstance(rec.model.language_decoder.output, OneDnnLinear)
    assert isinstance(rec.model.vision_encoder.proj, OneDnnLinear)
    fast = rec.predict(photos, top_k=10)
    for a, b in zip(plain_labels, fast):
        assert [x.label for x in a] == [y.label for y in b]
        assert max(abs(x.prob - y.prob) for x, y in zip(a, b)) < 1e-5


def test_int8_agrees_with_float32(photos, plain_labels):
    rec = Recognizer.from_pretrained(None, dtype="int8")
    assert rec.dtype == torch.float32
    assert "qint8" in repr(rec.model.language_decoder.layers[0].feed_forward.w1)
    same_top, overlap = agreement(plain_labels, rec.predict(photos, top_k=10))
    # Documented tolerance: the tiny demo model is more sensitive to int8 than the 1.78B one.
    assert same_top >= len(photos) - 2 and overlap >= 0.8, (same_top, overlap)


def test_bfloat16_agrees_with_float32(photos, plain_labels):
    rec = Recognizer.from_pretrained(None, dtype="bfloat16")
    assert rec.dtype == torch.bfloat16
    same_top, overlap = agreement(plain_labels, rec.predict(photos, top_k=10))
    assert same_top == len(photos) and overlap >= 0.9, (same_top, overlap)


def test_int8_is_refused_off_the_cpu():
    with pytest.raises(NxtrecError, match="int8 runs on the CPU only"):
        Recognizer.from_pretrained(None, device="cuda", dtype="int8")


def test_predict_cli_runs_int8(photos):
    out = subprocess.run([sys.executable, "-m", "nxtrec", "predict", photos[0], "--dtype", "int8", "--top-k", "3"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == photos[0] and len(lines) == 4


FAULTS_PER_IMAGE = """
import resource, torch
from nxtrec.inference.recognizer import Recognizer
rec = Recognizer.from_pretrained(None)
pixels = torch.randn(64, 3, 112, 112, generator=torch.Generator().manual_seed(0))
rec.predict_batch(pixels, top_k=10)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
rec.predict_batch(pixels, top_k=10)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 64)
"""


def test_freed_activations_are_reused_not_faulted_in_again():
    """A batch of 64 after a first one takes its activations from memory glibc kept: without
    `keep_freed_memory` each such batch cost ~2,980 page faults per image on this machine,
    with it 0 to ~100 (it varies from run to run)."""
    faults = float(subprocess.run([sys.executable, "-c", FAULTS_PER_IMAGE], check=True, capture_output=True,
                                  text=True).stdout)  # fmt: skip
    assert faults < 300


def test_the_users_allocator_settings_win(monkeypatch):
    from nxtrec.inference.cpu import keep_freed_memory

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert keep_freed_memory() is False


# oneDNN's own switch: an AVX-512 machine then has the kernels of an AVX2-only one (no
# bfloat16 inner product), so this machine's CI covers the most common cloud CPUs too.
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
SCENE = str(Path(__file__).resolve().parents[1] / "examples" / "scene.jpg")


def _run(args, env=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False,
                          env={**os.environ, **(env or {})})  # fmt: skip


def test_cpu_dtype_tests_pass_with_onednn_limited_to_avx2():
    """This file's dtype tests and the CLI's bfloat16 run again where oneDNN has AVX2 only."""
    here = os.path.dirname(__file__)
    proc = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not avx2 and not allocator and not freed",
                 os.path.join(here, "test_cpu_inference.py"),
                 os.path.join(here, "test_cli.py") + "::test_predict_with_other_samplers_and_bfloat16"], AVX2_ONLY)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


PROBE_AVX2 = """
import json, torch
from nxtrec.inference.cpu import OneDnnLinear, onednn_linear_works
from nxtrec.inference.recognizer import Recognizer
bf16 = Recognizer.from_pretrained(None, dtype="bfloat16")
Recognizer.from_pretrained(None, dtype="bfloat16")  # the note is printed once per process
fp32 = Recognizer.from_pretrained(None)
print(json.dumps({"bf16_onednn": isinstance(bf16.model.language_decoder.output, OneDnnLinear),
                  "fp32_onednn": isinstance(fp32.model.language_decoder.output, OneDnnLinear),
                  "probe_bf16": onednn_linear_works(torch.bfloat16)}))
"""


def test_bfloat16_on_avx2_falls_back_to_pytorch_with_one_note():
    proc = _run(["-c", PROBE_AVX2], AVX2_ONLY)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == {"bf16_onednn": False, "fp32_onednn": True, "probe_bf16": False}
    notes = [line for line in proc.stderr.splitlines() if "bfloat16" in line]
    assert len(notes) == 1 and "slower than float32" in notes[0] and "fastest dtype here is float32" in notes[0], proc.stderr


def test_predict_bfloat16_on_avx2_gives_the_float32_top_label():
    out = {}
    for dtype in ("float32", "bfloat16"):
        proc = _run(["-m", "nxtrec", "predict", SCENE, "--dtype", dtype, "--json"], AVX2_ONLY)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[dtype] = json.loads(proc.stdout)["labels"][0]["label"]
    assert out["bfloat16"] == out["float32"] == "snake"


def test_info_names_the_kernel_of_each_dtype_also_on_avx2():
    native = json.loads(_run(["-m", "nxtrec", "info", "--json"]).stdout)
    capped = json.loads(_run(["-m", "nxtrec", "info", "--json"], AVX2_ONLY).stdout)
    assert native["torch"] and native["nxtrec"] and native["python"] and "avx2" in native["cpu"]["flags"]
    assert set(native["kernels"]) == {"float32", "bfloat16", "float16", "int8"}
    assert capped["kernels"]["bfloat16"].startswith("PyTorch") and capped["fastest_dtype"] == "float32"
    assert capped["cpu"]["ONEDNN_MAX_CPU_ISA"] == "AVX2"
    text = _run(["-m", "nxtrec", "info"]).stdout
    assert "torch" in text and "--dtype bfloat16" in text and "fastest dtype here" in text
