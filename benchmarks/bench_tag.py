"""`nxtrec tag` throughput and memory against the model alone and a loop of `predict`.

    nxtrec synth --out /tmp/tagbench/synth --n 2000 --val 0      # the 2,000 scenes (images/)
    python benchmarks/bench_tag.py --images /tmp/tagbench/synth/images
    python benchmarks/bench_tag.py --images ... --dtype float32 bfloat16 --rss-repeat 10
    python benchmarks/bench_tag.py --images ... --processes 2     # tag --processes 2, and 'split'
    python benchmarks/bench_tag.py --images ... --only ceiling --profile    # where a batch's time goes
    python benchmarks/bench_tag.py --images ... --threads 1 --workers 1 --only ceiling tag
    python benchmarks/bench_tag.py --images ... --only tag xmp      # what XMP sidecars cost
                                   # the model on fewer threads than cores: is decoding hidden?

Bundled demo model, CPU, one-shot top-k 10. Every measurement runs in its own process (so
its peak RSS is its own), one after the other, --rounds times in turns; the best round of
each kind is reported (on a shared machine the speed of a run varies by tens of percent,
and the best round is the least disturbed one):
  ceiling  the model alone: images decoded and preprocessed in memory beforehand, timed over
           `predict_batch` calls of --batch-size, in one process on torch's default threads
           or --threads (torch is imported first, so OpenMP's threads spin while they wait:
           the model's fastest setting on an idle machine; nxtrec itself makes them sleep);
  split    with --processes N: the model alone as `nxtrec tag --processes N` runs it, N
           processes on cores/N threads (or --threads), each on its share of the images,
           started together;
  tag      `nxtrec tag --processes N` on the files (its manifest's this-run time: loading the
           model and listing the inputs excluded), same batch size;
  xmp      `nxtrec tag --format xmp`, as `tag`, on a fresh copy of the files (each round
           writes a new sidecar beside each image, fsynced); compared with `tag` (JSONL);
  predict  a loop of `Recognizer.predict` over the files in batches of 8 (decoding in the
           main process, as `nxtrec predict` does);
  rss      peak RSS of `nxtrec tag` (one process) over the files, and over a --list
           repeating them --rss-repeat times (memory must not grow with the number of images).

A busy machine: `--cpus 0 --busy 1` runs every measurement on CPU 0 only, beside one other
process that spins on the same CPU for as long as the measurements last (it is ended with
them). Compare `tag` and `predict` with and without `--busy 1`: each should keep about half
its idle speed, its fair share of the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "--child"


def _peak_rss_mb() -> float:
    """This process's peak RSS, or its largest child's (a rank of `tag --processes`) if larger."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return max(int(line.split()[1]) / 1024, children)
    return float("nan")


def _files(folder: str, n: int) -> list[str]:
    from nxtrec.model.image import list_images

    files = list_images([folder])[:n]
    if len(files) < n:
        sys.exit(f"{folder}: {len(files)} images, {n} wanted")
    return files


def child_ceiling(args) -> dict:
    import torch

    from nxtrec.inference.recognizer import Recognizer

    rec = Recognizer.from_pretrained(None, dtype=args.dtype)
    files = _files(args.images, args.n)[args.share :: args.processes]
    pixels = torch.cat([rec.pixels(chunk) for chunk in _chunks(files, 256)])
    rec.predict_batch(pixels[: args.batch_size], top_k=10)  # warm-up
    if args.processes > 1:  # the shares start together
        Path(args.barrier, str(args.share)).touch()
        while len(list(Path(args.barrier).iterdir())) < args.processes:
            time.sleep(0.01)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    for i in range(0, len(pixels), args.batch_size):
        rec.predict_batch(pixels[i : i + args.batch_size], top_k=10)
    seconds = time.perf_counter() - start
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(18)
    return {"images": len(pixels), "seconds": seconds}


def child_predict(args) -> dict:
    from nxtrec.inference.recognizer import Recognizer

    rec = Recognizer.from_pretrained(None, dtype=args.dtype)
    files = _files(args.images, args.n)
    rec.predict(files[:8], top_k=10)  # warm-up
    start = time.perf_counter()
    for chunk in _chunks(files, 8):
        rec.predict(chunk, top_k=10, batch_size=8)
    return {"images": len(files), "seconds": time.perf_counter() - start}


def child_tag(args) -> dict:
    from nxtrec.cli.main import main

    with tempfile.TemporaryDirectory() as tmp:
        files = _files(args.images, args.n)
        if args.fmt == "xmp":  # the sidecars go beside the images: a copy without any
            (Path(tmp) / "images").mkdir()
            files = [str(shutil.copy(f, Path(tmp) / "images" / f"{i:05d}{Path(f).suffix}")) for i, f in enumerate(files)]
        listing = Path(tmp) / "list.txt"
        listing.write_text("\n".join(files * args.repeat) + "\n")
        out = Path(tmp) / "out"
        argv = ["tag", "--list", str(listing), "--out", str(out), "--top-k", "10", "--batch-size", str(args.batch_size),
                "--dtype", args.dtype, "--log-every", "1e9", "--format", args.fmt]  # fmt: skip
        if args.workers is not None:
            argv += ["--workers", str(args.workers)]
        if args.processes > 1:
            argv += ["--processes", str(args.processes)]
        cpu = _cpu_seconds()
        if main(argv) != 0:
            sys.exit("nxtrec tag failed")
        cpu = _cpu_seconds() - cpu
        run = json.loads((out / "manifest.json").read_text())["this_run"]
    return {"images": run["images"], "seconds": run["seconds"], "cpu_s": cpu}


def _cpu_seconds() -> float:
    """CPU time of this process and its ended children (the decoding workers): on a shared
    machine it varies far less than the time a run takes."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _chunks(items: list, size: int):
    return [items[i : i + size] for i in range(0, len(items), size)]


def _busy_loops(count: int, cpus: list[int] | None) -> list[subprocess.Popen]:
    """Processes that spin on `cpus` (normal priority) until killed."""
    spin = "import os, sys\nif sys.argv[1]: os.sched_setaffinity(0, map(int, sys.argv[1].split(',')))\nwhile True: pass"
    arg = ",".join(map(str, cpus)) if cpus else ""
    return [subprocess.Popen([sys.executable, "-c", spin, arg]) for _ in range(count)]


def measure(args, kind: str, dtype: str, repeat: int = 1, processes: int | None = None) -> dict:
    cmd = [sys.executable, __file__, CHILD, "tag" if kind == "xmp" else kind, "--images", args.images, "--n",
           str(args.n), "--dtype", dtype, "--batch-size", str(args.batch_size), "--repeat", str(repeat),
           "--fmt", "xmp" if kind == "xmp" else "jsonl"]  # fmt: skip
    if args.cpus:
        cmd = ["taskset", "-c", ",".join(map(str, args.cpus)), *cmd]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.profile:
        cmd.append("--profile")
    if kind == "split":
        return _measure_split(args, cmd)
    if kind in ("tag", "xmp"):
        cmd += ["--processes", str(processes or args.processes)]
    lines = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()
    result = json.loads(lines[-1])
    result["images_per_s"] = result["images"] / result["seconds"]
    return result


def _measure_split(args, cmd: list[str]) -> dict:
    """The model alone as `nxtrec tag --processes N` runs it: N processes on cores/N threads,
    each on its share of the images, started together."""
    cmd[cmd.index("split")] = "ceiling"
    # nxtrec.inference.threads.threads_per_process's rule, not imported: importing nxtrec here
    # would set OMP_WAIT_POLICY for every child, the spinning ceiling included
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.processes))
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    with tempfile.TemporaryDirectory() as barrier:
        shares = [subprocess.Popen([*cmd, "--processes", str(args.processes), "--share", str(r), "--barrier", barrier],
                                   stdout=subprocess.PIPE, text=True, env=env) for r in range(args.processes)]  # fmt: skip
        results = [json.loads(proc.communicate()[0].strip().splitlines()[-1]) for proc in shares]
    if any(proc.returncode for proc in shares):
        sys.exit("a share of the split ceiling failed")
    images, seconds = sum(r["images"] for r in results), max(r["seconds"] for r in results)
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds,
            "peak_rss_mb": sum(r["peak_rss_mb"] for r in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (nxtrec synth's images/)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    p.add_argument("--workers", type=int, help="nxtrec tag --workers (default: its own)")
    p.add_argument("--rounds", type=int, default=3, help="measurements of each kind, in turns; the best is reported")
    p.add_argument("--rss-repeat", type=int, default=0, help="also measure peak RSS over the files repeated this many times")
    p.add_argument("--processes", type=int, default=1,
                   help="nxtrec tag --processes; above 1, also the model alone split the same way ('split')")
    p.add_argument("--threads", type=int,
                   help="model threads per process (OMP_NUM_THREADS) in every measurement; fewer than the cores "
                        "leaves the loader cores of its own")
    p.add_argument("--only", nargs="*", default=["ceiling", "split", "tag", "predict"],
                   choices=["ceiling", "split", "tag", "xmp", "predict"])
    p.add_argument("--profile", action="store_true", help="print the ceiling run's cProfile top functions")
    p.add_argument("--cpus", type=int, nargs="+", help="run every measurement on these CPUs only (taskset)")
    p.add_argument("--busy", type=int, default=0, help="processes spinning on --cpus while the measurements run")
    p.add_argument(CHILD, dest="child", choices=["ceiling", "tag", "predict"], help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--fmt", default="jsonl", help=argparse.SUPPRESS)
    p.add_argument("--share", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--barrier", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.dtype = args.dtype[0]
        result = {"ceiling": child_ceiling, "tag": child_tag, "predict": child_predict}[args.child](args)
        print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))
        return
    if args.processes == 1 and "split" in args.only:
        args.only.remove("split")
    if args.threads:  # the children inherit it; `nxtrec tag --processes` keeps a given value
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    threads = f", {args.threads} model thread(s) per process" if args.threads else ""
    where = f", on CPUs {args.cpus}" if args.cpus else ""
    print(f"{args.n} images from {args.images}, bundled demo model, top-k 10, batch {args.batch_size}, CPU, "
          f"tag --processes {args.processes}{threads}{where}, {args.busy} busy process(es) beside")  # fmt: skip
    busy = _busy_loops(args.busy, args.cpus)
    try:
        report(args)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def report(args) -> None:
    for dtype in args.dtype:
        rounds = [{kind: measure(args, kind, dtype) for kind in args.only} for _ in range(args.rounds)]
        results = {kind: max((r[kind] for r in rounds), key=lambda r: r["images_per_s"]) for kind in args.only}
        for kind in args.only:
            every = ", ".join(f"{r[kind]['images_per_s']:.1f}" for r in rounds)
            print(f"{dtype:9s} {kind:8s} rounds: {every} images/s")
        for kind, r in results.items():
            print(f"{dtype:9s} {kind:8s} {r['images_per_s']:7.1f} images/s  ({r['images']} in {r['seconds']:.1f} s, "
                  f"peak RSS {r['peak_rss_mb']:.0f} MB)")  # fmt: skip
        for ceiling in ("ceiling", "split"):
            if ceiling in results and "tag" in results:
                print(f"{dtype:9s} tag / {ceiling} {results['tag']['images_per_s'] / results[ceiling]['images_per_s']:.1%}")
        if "xmp" in results and "tag" in results:
            overhead = results["tag"]["images_per_s"] / results["xmp"]["images_per_s"] - 1
            median = statistics.median(r["tag"]["images_per_s"] / r["xmp"]["images_per_s"] - 1 for r in rounds)
            cpu = statistics.median(r["xmp"]["cpu_s"] / r["tag"]["cpu_s"] - 1 for r in rounds)
            print(f"{dtype:9s} tag --format xmp over jsonl: {overhead:+.1%} time (best rounds), "
                  f"{median:+.1%} (median of the rounds' ratios), {cpu:+.1%} CPU time (median; whole "
                  "command, model load included)")  # fmt: skip
        if "predict" in results and "tag" in results:
            print(f"{dtype:9s} tag / predict loop {results['tag']['images_per_s'] / results['predict']['images_per_s']:.2f}x")
    if args.rss_repeat:
        # one process: with --processes the ranks are other processes than the one measured
        small = measure(args, "tag", args.dtype[0], processes=1)
        big = measure(args, "tag", args.dtype[0], args.rss_repeat, processes=1)
        print(f"peak RSS of nxtrec tag (one process): {small['peak_rss_mb']:.0f} MB for {small['images']} images, "
              f"{big['peak_rss_mb']:.0f} MB for {big['images']} ({big['peak_rss_mb'] / small['peak_rss_mb'] - 1:+.1%})")


if __name__ == "__main__":
    main()
