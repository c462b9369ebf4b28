"""Peak memory of `nxtrec convert llama`: a generated 32-block LLaMA-shaped checkpoint of
small width, in the Hugging Face layout (safetensors shards + index json) and in Meta's
(`consolidated.00.pth` + `params.json`), converted keeping 6 blocks.

    python benchmarks/bench_convert.py [--blocks 32] [--keep 6] [--dim 1024] [--root DIR]

Each conversion runs in its own subprocess; its peak RSS is the kernel's ru_maxrss for that
child (os.wait4). The files are generated in a subprocess too, so that this parent stays
small (a child's ru_maxrss counts what it shares with its parent right after fork). Three runs
per layout:
- `imports`: the interpreter with torch and nxtrec imported, nothing read (the floor);
- `full`: a loader that reads the whole checkpoint, emulated: every tensor is read into
  memory (safetensors `load_file` of every shard, copied; `torch.load` without mmap) and held
  while the conversion runs;
- `selective`: `convert_llama` as shipped (only the kept tensors are read).
The files are written under --root (default: a temporary folder, removed afterwards); an
existing --root from an earlier run with the same sizes is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MB = 2**20
BLOCKS_PER_SHARD = 4  # HF writes ~5-10 GB shards; with small widths, a few blocks each


def llama_tensors(blocks: int, dim: int, vocab: int, dtype) -> dict:
    """A random LLaMA state dict in Meta's names (values do not matter for memory)."""
    import torch

    from nxtrec.model.config import llama_hidden_dim

    hidden = llama_hidden_dim(dim)
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    state = {"tok_embeddings.weight": rand(vocab, dim)}
    for i in range(blocks):
        for name in ("wq", "wk", "wv", "wo"):
            state[f"layers.{i}.attention.{name}.weight"] = rand(dim, dim)
        state[f"layers.{i}.feed_forward.w1.weight"] = rand(hidden, dim)
        state[f"layers.{i}.feed_forward.w2.weight"] = rand(dim, hidden)
        state[f"layers.{i}.feed_forward.w3.weight"] = rand(hidden, dim)
        state[f"layers.{i}.attention_norm.weight"] = torch.ones(dim, dtype=dtype)
        state[f"layers.{i}.ffn_norm.weight"] = torch.ones(dim, dtype=dtype)
    state["norm.weight"] = torch.ones(dim, dtype=dtype)
    state["output.weight"] = rand(vocab, dim)
    return state


def hf_name(meta_name: str) -> str:
    from nxtrec.model.convert import _HF_NAMES

    to_hf = {v: k for k, v in _HF_NAMES.items()}
    fixed = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if meta_name in fixed:
        return fixed[meta_name]
    _, i, *rest = meta_name.split(".")
    return f"model.layers.{i}.{to_hf['.'.join(rest[:-1])]}.weight"


def write_checkpoints(root: Path, blocks: int, dim: int, dtype_name: str) -> None:
    """The two layouts of one random checkpoint, a tokenizer, a CLIP stand-in, and
    `sizes.json`: the size in bytes of each tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    from nxtrec.model.presets import init_model, make_tokenizer

    tokenizer = make_tokenizer(root / "tokenizer.model", n_pieces=32000)
    state = llama_tensors(blocks, dim, 32000, getattr(torch, dtype_name))
    heads = dim // 128
    meta, hf = root / "meta", root / "hf"
    meta.mkdir()
    torch.save(state, meta / "consolidated.00.pth")
    (meta / "params.json").write_text(json.dumps({"dim": dim, "n_heads": heads, "n_layers": blocks, "norm_eps": 1e-5}))
    hf.mkdir()
    n_shards = (blocks + BLOCKS_PER_SHARD - 1) // BLOCKS_PER_SHARD
    shards: list[dict] = [{} for _ in range(n_shards)]
    for k, v in state.items():
        block = int(k.split(".")[1]) if k.startswith("layers.") else (0 if k.startswith("tok_") else blocks - 1)
        shards[block // BLOCKS_PER_SHARD][hf_name(k)] = v
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(shard, str(hf / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (hf / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (hf / "config.json").write_text(json.dumps({"hidden_size": dim, "num_attention_heads": heads, "num_hidden_layers": blocks,
                                                "num_key_value_heads": heads, "rms_norm_eps": 1e-5}))
    for d in (meta, hf):
        shutil.copy(tokenizer, d / "tokenizer.model")
    # A small CLIP stand-in (a plain state dict with `visual.*` tensors): the encoder is not
    # what this benchmark measures.
    tiny = load_file(init_model("tiny", root / "tiny") / "model.safetensors")
    visual = {"visual." + k.removeprefix("vision_encoder."): v for k, v in tiny.items()
              if k.startswith("vision_encoder.") and not k.startswith("vision_encoder.proj")}
    torch.save(visual, root / "clip.pt")
    sizes = {k: v.numel() * v.element_size() for k, v in state.items()}
    (root / "sizes.json").write_text(json.dumps({"args": [blocks, dim, dtype_name], "sizes": sizes}))


def kept_bytes(state_keys_sizes: dict[str, int], keep: int) -> int:
    return sum(n for k, n in state_keys_sizes.items() if not k.startswith("layers.") or int(k.split(".")[1]) < keep)


def child(mode: str, llama: str, clip: str, out: str, keep: int) -> None:
    import torch

    from nxtrec.model.convert import convert_llama

    held = []  # referenced until the conversion is done, as the old loader held every tensor
    if mode == "full":
        from safetensors.torch import load_file

        for f in sorted(Path(llama).glob("*.safetensors")):  # load_file maps lazily: read every byte
            held.append({k: v.clone() for k, v in load_file(str(f)).items()})
        for f in sorted(Path(llama).glob("consolidated.*.pth")):
            held.append(torch.load(f, map_location="cpu", weights_only=True))
    if mode in ("full", "selective"):
        convert_llama(llama, clip, out, keep)


def run_child(*args: str) -> float:
    """Peak RSS of one child process running this script with `args`, in MB."""
    proc = subprocess.Popen([sys.executable, __file__, *args])
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)}: failed")
    return usage.ru_maxrss * 1024 / MB  # Linux reports KiB


def generated_sizes(root: Path, blocks: int, dim: int, dtype: str) -> dict[str, int]:
    """Tensor sizes of the checkpoint under `root`, generating it unless already there."""
    sizes_file = root / "sizes.json"
    if not (sizes_file.is_file() and json.loads(sizes_file.read_text())["args"] == [blocks, dim, dtype]):
        for d in ("hf", "meta", "tiny"):
            shutil.rmtree(root / d, ignore_errors=True)
        run_child("--generate", str(root), str(blocks), str(dim), dtype)
    return json.loads(sizes_file.read_text())["sizes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--keep", type=int, default=6)
    ap.add_argument("--dim", type=int, default=1024, help="hidden size (LLaMA-2-7B: 4096)")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="stored weights (HF: fp16, Meta: bf16)")
    ap.add_argument("--root", help="keep the generated files here (default: a temporary folder, removed)")
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    ap.add_argument("--generate", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, llama, clip, out, keep = args.child
        return child(mode, llama, clip, out, int(keep))
    if args.generate:
        root, blocks, dim, dtype = args.generate
        return write_checkpoints(Path(root), int(blocks), int(dim), dtype)

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_convert."))
    root.mkdir(parents=True, exist_ok=True)
    try:
        sizes = generated_sizes(root, args.blocks, args.dim, args.dtype)
        whole, kept = sum(sizes.values()), kept_bytes(sizes, args.keep)
        print(f"checkpoint: {args.blocks} blocks, dim {args.dim}, {args.dtype}, vocab 32000: {whole / MB:.0f} MB; "
              f"kept ({args.keep} blocks + embeddings + output): {kept / MB:.0f} MB as stored, {2 * kept / MB:.0f} MB as float32")
        print(f"{'layout':8} {'run':10} {'peak RSS MB':>12} {'above imports':>14} {'/ kept':>7} {'/ whole':>8}")
        for layout in ("hf", "meta"):
            floor = run_child("--child", "imports", str(root / layout), str(root / "clip.pt"), str(root / "out"), str(args.keep))
            for mode in ("imports", "full", "selective"):
                peak = floor if mode == "imports" else run_child(
                    "--child", mode, str(root / layout), str(root / "clip.pt"), str(root / f"out-{layout}-{mode}"), str(args.keep))
                above = (peak - floor) * MB
                print(f"{layout:8} {mode:10} {peak:12.0f} {above / MB:14.0f} {above / kept:7.2f} {above / whole:8.2f}")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
