"""Training throughput: sequences padded per batch to the longest sample (ours) against
every sequence padded to a fixed `max_seq_len` (512, as the reference does), in one run.

    python benchmarks/bench_train.py                                   # tiny-cpu, CPU
    python benchmarks/bench_train.py --config base --set model.preset=nxtp-0.77b \\
        --set run.device=cuda --set train.precision=bf16 --micro-batch 16   # a GPU

Each mode trains in its own process (so peak memory is its own; modes alternate, `--repeat`
times, and each mode's best run counts, which damps noise from other processes) on the same
generated WebDataset shards with the same seed: realistic captions' label counts (3-8 labels per
image), real JPEGs, the real data pipeline and training loop. Reported: images/s (median
over the steps after warm-up), padded text tokens per image, and peak memory (process RSS;
on CUDA also torch's peak allocated memory).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "dog cat car tree apple banana umbrella chair table sofa couch room window door house person man woman "
    "child boy girl bird horse cow sheep bicycle bus train truck boat plane sky cloud water sea beach sand "
    "grass flower plant road street city building wall floor lamp book cup bottle glass plate bowl pizza cake"
).split()


def write_shards(out: Path, n_samples: int, seed: int = 0, image_px: int = 256) -> str:
    import webdataset as wds
    from PIL import Image

    rng = random.Random(seed)
    out.mkdir(parents=True, exist_ok=True)
    per_shard = 64
    for s in range((n_samples + per_shard - 1) // per_shard):
        with wds.TarWriter(str(out / f"{s:06d}.tar")) as w:
            for i in range(min(per_shard, n_samples - s * per_shard)):
                img = Image.effect_noise((image_px, image_px), 40).convert("RGB")
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=85)
                labels = rng.sample(WORDS, rng.randint(3, 8))
                w.write({"__key__": f"{s:06d}_{i:04d}", "jpg": buf.getvalue(), "txt": " ".join(labels),
                         "json": json.dumps({"labels": labels}).encode()})
    return str(out / "*.tar")


def worker(args) -> None:
    """One mode, in this process; prints one JSON line."""
    import torch

    from nxtrec.training.config import load_config
    from nxtrec.training.logger import read_metrics
    from nxtrec.training.main import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.overrides)
    summary = train(cfg)
    records = read_metrics(cfg.run.dir)[args.warmup :]
    out = {
        "padding": cfg.data.padding,
        "steps": len(records),
        "images_per_s": statistics.median(r["images_per_s"] for r in records),
        "padded_tokens_per_image": statistics.mean(r["padded_tokens"] for r in records) / cfg.train.global_batch_size,
        "target_tokens_per_image": statistics.mean(r["targets"] for r in records) / cfg.train.global_batch_size,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "loss": summary["loss"],
    }
    if torch.cuda.is_available() and cfg.run.device != "cpu":
        out["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["device"] = torch.cuda.get_device_name()
    else:
        out["device"] = f"cpu ({torch.get_num_threads()} threads)"
    print("RESULT " + json.dumps(out), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny-cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures")
    p.add_argument("--micro-batch", type=int, default=16, help="images per step (one micro-batch, one process)")
    p.add_argument("--max-seq-len", type=int, default=512, help="the fixed padding length of the baseline")
    p.add_argument("--image-px", type=int, default=256, help="side of the generated JPEGs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeat", type=int, default=2, help="runs per mode, alternating; the best counts")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    with tempfile.TemporaryDirectory(prefix="nxtrec-bench-") as tmp:
        tmp = Path(tmp)
        n = args.micro_batch * (args.steps + 2)
        t0 = time.perf_counter()
        shards = write_shards(tmp / "shards", n, image_px=args.image_px)
        print(f"{n} samples in {shards} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        common = [
            *args.overrides,
            f'data.shards=["{shards}"]',
            f"data.max_seq_len={args.max_seq_len}",
            f"train.max_steps={args.steps}",
            f"train.micro_batch_size={args.micro_batch}",
            f"train.global_batch_size={args.micro_batch}",
            "log.every=1",
            "log.progress=false",
            "log.tensorboard=false",
            f"checkpoint.every={args.steps * 10}",
            "checkpoint.export=false",
        ]
        best: dict[str, dict] = {}
        for rep in range(args.repeat):  # alternate the modes; keep each one's best run
            for padding in ("longest", "max"):
                cmd = [sys.executable, __file__, "--worker", "--config", args.config, "--warmup", str(args.warmup),
                       "--threads", str(args.threads)]
                for o in common + [f'run.dir="{tmp / f"{padding}-{rep}"}"', f'data.padding="{padding}"']:
                    cmd += ["--set", o]
                run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
                if run.returncode != 0 or line is None:
                    print(run.stderr[-4000:], file=sys.stderr)
                    return 1
                result = json.loads(line[len("RESULT ") :])
                if padding not in best or result["images_per_s"] > best[padding]["images_per_s"]:
                    best[padding] = result
    ours, fixed = best["longest"], best["max"]
    results = [ours, fixed]
    label = {"longest": "per-batch longest (ours)", "max": f"fixed {args.max_seq_len} (reference)"}
    print(f"device: {ours['device']}; config {args.config} {' '.join(args.overrides)}; "
          f"{args.micro_batch} images/step, {args.steps - args.warmup} timed steps, best of {args.repeat} runs")
    print(f"{'padding':<28} {'images/s':>9} {'text tokens/img':>16} {'targets/img':>12} {'peak RSS MiB':>13}"
          + ("  CUDA peak MiB" if "cuda_peak_allocated_mib" in ours else ""))
    for r in results:
        extra = f"  {r['cuda_peak_allocated_mib']:>13.0f}" if "cuda_peak_allocated_mib" in r else ""
        print(f"{label[r['padding']]:<28} {r['images_per_s']:>9.1f} {r['padded_tokens_per_image']:>16.1f} "
              f"{r['target_tokens_per_image']:>12.1f} {r['peak_rss_mib']:>13.0f}{extra}")
    print(f"speed-up: {ours['images_per_s'] / fixed['images_per_s']:.2f}x images/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"ours": ours, "fixed": fixed}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
