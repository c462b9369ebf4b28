"""Loading an int8 model: quantised at every load (`--dtype int8` on the float model) against
saved once by `nxtrec quantize`, on a randomly initialised preset (default nxtp-1.78b).

    python benchmarks/bench_quantize.py [--preset nxtp-1.78b] [--root DIR] [--image IMG] [--repeats 1]

Each load runs in its own subprocess (`Recognizer.from_pretrained`, as `nxtrec predict` loads):
- load s: wall time of `from_pretrained` (the imports before it are not counted), and its
  CPU time (user + system, all threads: steadier than wall time on a shared machine);
- peak RSS at load: the child's ru_maxrss right after loading (imports included);
- peak RSS with a prediction: the kernel's ru_maxrss for the whole child (os.wait4), which
  then labels --image once; both paths' labels and probabilities are compared.
The float model and the `nxtrec quantize` output are written under --root (default: a
temporary folder, removed afterwards; an existing --root of the same preset is reused). The
two paths alternate over --repeats rounds; the table shows each one's fastest load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def child(model: str, dtype: str, image: str) -> None:
    import resource

    from nxtrec import Recognizer

    c1, t1 = os.times(), time.perf_counter()
    rec = Recognizer.from_pretrained(model, dtype=dtype)
    c2, t2 = os.times(), time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    cpu = c2.user + c2.system - c1.user - c1.system
    labels = rec.predict([image], top_k=10)[0]
    print(json.dumps({"load_s": t2 - t1, "load_cpu_s": cpu, "load_peak_mb": peak,
                      "labels": [[x.label, x.prob] for x in labels]}))


def run_child(*args: str) -> tuple[dict, float, float]:
    """(the child's JSON line, its peak RSS in MB, its wall time) for this script run with `args`."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)}: failed")
    line = out.strip().splitlines()[-1] if out.strip() else "{}"
    return json.loads(line), usage.ru_maxrss * 1024 / MB, time.perf_counter() - start


def nxtrec(*args: str) -> tuple[float, float]:
    """Run `nxtrec ARGS` in a subprocess: (wall seconds, peak RSS MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "nxtrec", *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nxtrec {' '.join(args)}: failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024 / MB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="nxtp-1.78b")
    ap.add_argument("--root", help="keep the models here (default: a temporary folder, removed)")
    ap.add_argument("--image", default=str(ROOT / "examples" / "scene.jpg"))
    ap.add_argument("--repeats", type=int, default=1, help="rounds of both loads")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix="bench_quantize."))
    root.mkdir(parents=True, exist_ok=True)
    float_dir, int8_dir = root / args.preset, root / f"{args.preset}-int8"
    try:
        if not (float_dir / "model.safetensors").is_file():
            secs, _ = nxtrec("init-model", "--preset", args.preset, "--out", str(float_dir))
            print(f"init-model --preset {args.preset}: {secs:.0f} s")
        if not (int8_dir / "model.safetensors").is_file():
            secs, peak = nxtrec("quantize", "--model", str(float_dir), "--out", str(int8_dir))
            print(f"quantize: {secs:.1f} s, peak RSS {peak:.0f} MB (once)")
        sizes = {d: (d / "model.safetensors").stat().st_size / MB for d in (float_dir, int8_dir)}
        print(f"model.safetensors: float32 {sizes[float_dir]:.0f} MB, int8 {sizes[int8_dir]:.0f} MB")
        paths = {"quantise at load": (float_dir, "int8"), "saved int8": (int8_dir, "int8")}
        runs: dict[str, list] = {name: [] for name in paths}
        for _ in range(args.repeats):
            for name, (model, dtype) in paths.items():
                runs[name].append(run_child("--child", str(model), dtype, args.image))
        best = {name: min(rs, key=lambda r: r[0]["load_s"]) for name, rs in runs.items()}
        print(f"{'path':18} {'load s':>7} {'CPU s':>6} {'peak RSS at load MB':>20} {'with a prediction MB':>21}")
        for name, (info, peak, _) in best.items():
            print(f"{name:18} {info['load_s']:7.1f} {info['load_cpu_s']:6.1f} {info['load_peak_mb']:20.0f} {peak:21.0f}")
        (a, peak_a, _), (b, peak_b, _) = best.values()
        print(f"saved / at load: load time x{b['load_s'] / a['load_s']:.2f}, peak RSS at load "
              f"x{b['load_peak_mb'] / a['load_peak_mb']:.2f}, with a prediction x{peak_b / peak_a:.2f}")
        if args.repeats > 1:
            for name, rs in runs.items():
                secs = ", ".join(f"{r[0]['load_s']:.1f}" for r in rs)
                print(f"{name}: load s over rounds: {secs}")
        same = [x[0] for x in a["labels"]] == [x[0] for x in b["labels"]]
        diff = max(abs(x[1] - y[1]) for x, y in zip(a["labels"], b["labels"]))
        print(f"labels on {Path(args.image).name}: {'identical' if same else 'DIFFERENT'}, max |prob difference| {diff:.1e}")
        if not same:
            raise SystemExit(1)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
