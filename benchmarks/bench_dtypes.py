"""Which dtype is fastest on this CPU: images/s of the bundled demo model on every CPU path,
float32, bfloat16 and int8 on PyTorch, float32 and int8 on ONNX Runtime, in the same run.

    nxtrec synth --out /tmp/tagbench/synth --n 2000 --val 0
    python benchmarks/bench_dtypes.py --images /tmp/tagbench/synth/images
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bench_dtypes.py --images ...
                      # the kernels of an AVX2-only CPU for oneDNN and ATen (fbgemm and ONNX
                      # Runtime still pick their own, from the real CPU)

Each path runs in its own process: the images are decoded and preprocessed beforehand, then
`predict_batch` (one-shot, top-k 10) is timed over --n images in batches of --batch-size,
--rounds times in turns; the best round is reported with the process's peak RSS, and each
path's speed as a ratio to float32 on PyTorch measured in the same run. The ONNX export of the
bundled model (float32, and int8 with `--quantize int8`) is made once into --work. For the
1.78B preset on random weights, `benchmarks/bench_onnx.py --paths
torch,torch-bf16,torch-int8,onnx,onnx-int8` measures the same paths (seconds per image).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PATHS = ("float32", "bfloat16", "int8", "onnx-float32", "onnx-int8")


def child(args) -> dict:
    import numpy as np

    from nxtrec.engines import load_engine
    from nxtrec.inference.engine import DecodeOptions
    from nxtrec.model.image import list_images

    onnx = {"onnx-float32": args.work + "/onnx", "onnx-int8": args.work + "/onnx-int8"}.get(args.path)
    engine = load_engine(onnx=onnx) if onnx else load_engine(dtype=args.path)
    files = list_images([args.images])[: args.n]
    pixels = engine.preprocessing.stack(files)
    options = DecodeOptions(top_k=10)
    engine.predict_batch(pixels[: args.batch_size], options)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(pixels), args.batch_size):
        engine.predict_batch(np.ascontiguousarray(pixels[i : i + args.batch_size]), options)
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmHWM:"))  # fmt: skip
    return {"images": len(pixels), "seconds": seconds, "peak_rss_mb": peak}


def export(work: Path) -> None:
    """The bundled model's ONNX export, float32 and int8, once."""
    from nxtrec.model.directory import default_model_dir

    for name, extra in (("onnx", []), ("onnx-int8", ["--quantize", "int8"])):
        if not (work / name / "nxtrec-onnx.json").is_file():
            subprocess.run([sys.executable, "-m", "nxtrec", "export-onnx", "--model", str(default_model_dir()),
                            "--out", str(work / name), *extra], check=True)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (nxtrec synth's images/)")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--work", default="/tmp/nxtrec-bench-dtypes", help="where the ONNX exports are kept")
    p.add_argument("--child", dest="path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.path:
        print(json.dumps(child(args)))
        return
    export(Path(args.work))
    info = json.loads(subprocess.run([sys.executable, "-m", "nxtrec", "info", "--json"], check=True,
                                     capture_output=True, text=True).stdout)  # fmt: skip
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    print(f"{info['cpu']['model']}, {info['cpu']['cores']} cores, flags {' '.join(info['cpu']['flags'])}"
          + (f"; ONEDNN_MAX_CPU_ISA={cap}" if cap else "") + f"; ATen {info.get('torch_cpu_capability')}")
    print(f"bundled demo model, {args.n} images, batch {args.batch_size}, one-shot top-k 10, best of {args.rounds} rounds")
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for path in args.paths:
            cmd = [sys.executable, __file__, "--child", path, "--images", args.images, "--n", str(args.n),
                   "--batch-size", str(args.batch_size), "--work", args.work]  # fmt: skip
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
            row[path] = json.loads(out.strip().splitlines()[-1])
        rounds.append(row)
    base = max(r["float32"]["images"] / r["float32"]["seconds"] for r in rounds) if "float32" in args.paths else None
    for path in args.paths:
        best = max((r[path] for r in rounds), key=lambda r: r["images"] / r["seconds"])
        speed = best["images"] / best["seconds"]
        every = ", ".join(f"{r[path]['images'] / r[path]['seconds']:.1f}" for r in rounds)
        ratio = f"{speed / base:5.2f}x float32" if base else ""
        print(f"{path:13s} {speed:7.1f} images/s  {ratio}  peak RSS {best['peak_rss_mb']:.0f} MB  (rounds: {every}); "
              f"kernel: {info.get('kernels', {}).get(path, 'ONNX Runtime')}")


if __name__ == "__main__":
    main()
