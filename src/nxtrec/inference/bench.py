"""Inference benchmark: our cached one-shot sampler vs the reference's no-cache algorithm on
the same random weights, in the same run (`nxtrec bench infer`)."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nxtrec.inference.sampling import one_shot, one_shot_no_cache, prefill
from nxtrec.model.directory import DTYPES, build_model
from nxtrec.model.masks import inference_mask
from nxtrec.model.presets import make_tokenizer, preset_config
from nxtrec.model.tokenizer import Tokenizer


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the process's peak resident set size (VmHWM)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclass
class Timing:
    phases: dict[str, float] = field(default_factory=dict)
    peak_mb: float = 0.0
    labels: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.phases.values())


class _Timer:
    def __init__(self, device):
        self.device = device

    def __call__(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        out = fn()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out, time.perf_counter() - t


@torch.inference_mode()
def bench_infer(
    preset: str = "nxtp-1.78b",
    top_k: int = 20,
    steps: int = 3,
    batch_size: int = 1,
    dtype: str = "float32",
    device: str = "cpu",
    baseline: bool = True,
    seed: int = 0,
    log=print,
) -> dict[str, Timing]:
    dev = torch.device(device)
    torch.manual_seed(seed)
    vocab_size = 32002  # LLaMA-2's 32000 pieces + <|image|> + <|empty|>
    config = preset_config(preset, vocab_size)
    log(f"building {preset} with random weights ({dtype}, {device}) ...")
    model = build_model(config, device=dev, dtype=DTYPES[dtype]).eval()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"parameters: {n_params / 1e9:.3f} B; image tokens {config.encoder.num_patches}; k={top_k}; steps={steps}; batch={batch_size}")
    size = config.encoder.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(dev)
    with tempfile.TemporaryDirectory() as tmp:  # a synthetic 32000-piece tokenizer
        tok = Tokenizer(make_tokenizer(Path(tmp) / "tokenizer.model", vocab_size - 2), config.special_tokens)
    prompt = torch.tensor(tok.prompt_ids(config.image_token, config.prompt), device=dev)
    delimiter = tok.delimiter_id
    timer = _Timer(dev)

    # Warm-up (kernel selection, allocator) on a short run, not timed.
    one_shot(model, model.encode_images(pixels), prompt, min(top_k, 2), delimiter, steps=1)

    results = {}
    reset_peak_memory(dev)
    ours = Timing()
    image_tokens, ours.phases["encoder"] = timer(lambda: model.encode_images(pixels))
    prefix, ours.phases["prefix"] = timer(lambda: prefill(model, image_tokens, prompt))
    branches, ours.phases["continuation"] = timer(
        lambda: one_shot(model, image_tokens, prompt, top_k, delimiter, steps=steps, prefix=prefix)
    )
    ours.peak_mb, ours.labels = peak_memory_mb(dev), branches
    results["ours"] = ours
    del prefix
    if baseline:
        reset_peak_memory(dev)
        base = Timing()
        image_tokens, base.phases["encoder"] = timer(lambda: model.encode_images(pixels))

        def base_prefix():
            x = model.prefix_embeddings(image_tokens, prompt)
            mask = inference_mask(x.shape[1], image_tokens.shape[1], dev, x.dtype)
            return model.language_decoder(x, mask, last_only=True)[0]

        logits, base.phases["prefix"] = timer(base_prefix)
        branches, base.phases["continuation"] = timer(
            lambda: one_shot_no_cache(model, image_tokens, prompt, top_k, delimiter, steps=steps, prefix_logits=logits)
        )
        base.peak_mb, base.labels = peak_memory_mb(dev), branches
        results["baseline"] = base
    return results


def format_results(results: dict[str, Timing]) -> str:
    ours, base = results["ours"], results.get("baseline")
    rows = [f"{'phase':<14}{'ours (s)':>12}" + (f"{'baseline (s)':>15}{'speed-up':>11}" if base else "")]
    for phase in [*ours.phases, "total"]:
        a = ours.total if phase == "total" else ours.phases[phase]
        line = f"{phase:<14}{a:>12.3f}"
        if base:
            b = base.total if phase == "total" else base.phases[phase]
            line += f"{b:>15.3f}{b / a:>10.1f}x"
        rows.append(line)
    rows.append(f"{'peak memory':<14}{ours.peak_mb:>9.0f} MB" + (f"{base.peak_mb:>12.0f} MB" if base else ""))
    share = ours.phases["continuation"] / ours.phases["prefix"]
    rows.append(f"continuation / prefix (ours): {share:.2f}")
    if base:
        same = all(
            a.tokens == b.tokens and max(abs(x - y) for x, y in zip(a.probs, b.probs)) < 1e-3
            for ia, ib in zip(ours.labels, base.labels)
            for a, b in zip(ia, ib)
        )
        rows.append(f"same branches and probabilities as the baseline: {'yes' if same else 'NO'}")
        rows.append(f"speed-up (total): {base.total / ours.total:.1f}x")
    return "\n".join(rows)
