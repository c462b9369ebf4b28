"""Throughput of the Ray and Spark adapters (nxtrec.integrations) against `nxtrec tag
--processes 2` on the same images, peak memory per worker, and where the time goes.

    nxtrec synth --out /tmp/tagbench/synth --n 2000 --val 0      # the 2,000 scenes (images/train)
    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_scale.py --images /tmp/tagbench/synth/images/train

Bundled demo model, CPU, float32, one-shot top-k 10, batches of --batch-size. Each
measurement runs in its own process, --rounds times in turns; the best round is reported.
Every path uses two model processes on one thread each (this machine has 2 cores):
  tag      `nxtrec tag --processes 2` over a list of the files, from the command's start to
           its end (model loading included);
  shards   two `nxtrec tag --shard-id I --num-shards 2` jobs at once (one process each),
           then `nxtrec tag --merge`: from the start of both to the end of the merge;
  ray      Parquet of the image bytes -> ray.data.read_parquet (a block per batch) -> RayTagger
           -> write_parquet, on `ray.init(num_cpus=2)`; from the first call to the last row
           written (actor start and model loading included; ray.init excluded: a cluster
           is up already). The actors take half a CPU each, so that the read and write
           tasks are not starved (two whole-CPU actors on a 2-CPU Ray deadlock them);
  spark    the same Parquet -> spark.read.parquet (partitions of 4 MB) -> tag_dataframe ->
           write.parquet, on local[2]; session start excluded;
  io       the Ray pipeline with a map_batches that only drops the image bytes: reading,
           moving the batches between processes and writing, without decoding or model;
  parts    one process, one thread: decoding and preprocessing alone, then the model alone.
Peak memory per worker: VmHWM of each rank, actor or Spark Python worker (the largest).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "--child"
KINDS = ("tag", "shards", "ray", "spark", "io", "parts")


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _record_peak(folder: str) -> None:
    """A worker writes its own peak RSS into `folder` (one file per process)."""
    Path(folder, str(os.getpid())).write_text(str(_peak_rss_mb()))


def _peaks(folder: str) -> float:
    return max(float(p.read_text()) for p in Path(folder).iterdir())


def _files(folder: str, n: int) -> list[str]:
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".png"))[:n]


def child_tag(args, tmp: str) -> dict:
    import resource

    listing = Path(tmp) / "list.txt"
    listing.write_text("\n".join(_files(args.images, args.n)) + "\n")
    cmd = [sys.executable, "-m", "nxtrec", "tag", "--list", str(listing), "--out", str(Path(tmp) / "out"), "-q",
           "--top-k", "10", "--batch-size", str(args.batch_size), "--processes", "2", "--log-every", "1e9"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest rank
    return {"images": args.n, "seconds": seconds, "worker_peak_mb": peak}


def child_shards(args, tmp: str) -> dict:
    import resource

    listing = Path(tmp) / "list.txt"
    listing.write_text("\n".join(_files(args.images, args.n)) + "\n")
    out = str(Path(tmp) / "out")
    cmd = [sys.executable, "-m", "nxtrec", "tag", "--list", str(listing), "--out", out, "-q", "--top-k", "10",
           "--batch-size", str(args.batch_size), "--log-every", "1e9", "--num-shards", "2"]  # fmt: skip
    start = time.perf_counter()
    jobs = [subprocess.Popen([*cmd, "--shard-id", str(i)]) for i in range(2)]
    if any(job.wait() for job in jobs):
        sys.exit("a shard job failed")
    subprocess.run([sys.executable, "-m", "nxtrec", "tag", "--merge", out], check=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"images": args.n, "seconds": seconds, "worker_peak_mb": peak}


def _blocks(args) -> int:
    """One read block per batch: the two actors finish together (with large blocks, one
    actor works alone on the last block: slower, docs/scale.md)."""
    return max(2, args.n // args.batch_size)


def _start_ray():
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def child_ray(args, tmp: str, parquet: str) -> dict:
    from nxtrec.integrations.ray import RayTagger

    ray = _start_ray()
    peaks = tempfile.mkdtemp(dir=tmp)

    class MeasuredTagger(RayTagger):
        def __call__(self, batch):
            out = super().__call__(batch)
            _record_peak(peaks)
            return out

    start = time.perf_counter()
    ds = ray.data.read_parquet(parquet, override_num_blocks=_blocks(args))
    ds = ds.map_batches(MeasuredTagger, fn_constructor_kwargs={"image_column": "jpg", "top_k": 10, "threads": 1,
                                                               "batch_size": args.batch_size},
                        batch_size=args.batch_size, batch_format="pyarrow", num_cpus=0.5,
                        compute=ray.data.ActorPoolStrategy(size=2))  # fmt: skip
    ds.write_parquet(str(Path(tmp) / "out"))
    seconds = time.perf_counter() - start
    rows = ray.data.read_parquet(str(Path(tmp) / "out")).count()
    ray.shutdown()
    return {"images": rows, "seconds": seconds, "worker_peak_mb": _peaks(peaks)}


def child_io(args, tmp: str, parquet: str) -> dict:
    ray = _start_ray()
    start = time.perf_counter()
    ds = ray.data.read_parquet(parquet, override_num_blocks=_blocks(args))
    ds = ds.map_batches(lambda t: t.drop_columns(["jpg"]), batch_size=args.batch_size, batch_format="pyarrow")
    ds.write_parquet(str(Path(tmp) / "out"))
    seconds = time.perf_counter() - start
    ray.shutdown()
    return {"images": args.n, "seconds": seconds}


def child_spark(args, tmp: str, parquet: str) -> dict:
    from pyspark.sql import SparkSession

    from nxtrec.integrations.spark import output_schema, spark_tagger

    os.environ["PYSPARK_PYTHON"] = sys.executable
    spark = (SparkSession.builder.master("local[2]").config("spark.driver.host", "127.0.0.1")
             .config("spark.driver.bindAddress", "127.0.0.1").config("spark.ui.enabled", "false")
             .config("spark.sql.files.maxPartitionBytes", str(4 << 20)).getOrCreate())  # fmt: skip
    spark.sparkContext.setLogLevel("ERROR")
    peaks = tempfile.mkdtemp(dir=tmp)
    start = time.perf_counter()
    df = spark.read.parquet(parquet)
    schema = output_schema(df.schema, "jpg")
    tag = spark_tagger(schema, image_column="jpg", top_k=10, threads=1, batch_size=args.batch_size)

    def measured(batches):
        yield from tag(batches)
        _record_peak(peaks)

    df.mapInArrow(measured, schema).write.parquet(str(Path(tmp) / "out"))
    seconds = time.perf_counter() - start
    rows = spark.read.parquet(str(Path(tmp) / "out")).count()
    spark.stop()
    return {"images": rows, "seconds": seconds, "worker_peak_mb": _peaks(peaks)}


def child_parts(args) -> dict:
    """Decoding and the model, each alone, in one process on one thread."""
    import numpy as np
    import torch

    from nxtrec.engines import load_engine
    from nxtrec.inference.engine import DecodeOptions
    from nxtrec.tagging.inputs import InputItem
    from nxtrec.tagging.prefetch import BatchDecoder

    torch.set_num_threads(1)
    engine = load_engine()
    items = [InputItem(p, p) for p in _files(args.images, args.n)]
    plan = [range(i, min(i + args.batch_size, len(items))) for i in range(0, len(items), args.batch_size)]
    decoder = BatchDecoder(items, plan, engine.preprocessing)
    out = np.empty((args.batch_size, 3, engine.preprocessing.size, engine.preprocessing.size), np.float32)
    start = time.perf_counter()
    for b in range(len(plan)):
        decoder.decode_into(b, out)
    decode_s = time.perf_counter() - start
    options = DecodeOptions(top_k=10)
    start = time.perf_counter()
    for b in range(len(plan)):
        engine.predict_batch(out[: len(plan[b])], options)
    return {"images": len(items), "decode_s": decode_s, "model_s": time.perf_counter() - start}


def _write_parquet(images: str, n: int, path: Path, batch_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = _files(images, n)
    table = pa.table({"key": files, "jpg": [Path(f).read_bytes() for f in files]})
    pq.write_table(table, path, row_group_size=batch_size)


def run_child(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.child in ("tag", "shards", "parts"):
            run_local = {"tag": child_tag, "shards": child_shards, "parts": lambda args, _: child_parts(args)}
            result = run_local[args.child](args, tmp)
        else:
            run = {"ray": child_ray, "spark": child_spark, "io": child_io}[args.child]
            result = run(args, tmp, args.parquet)
    print(json.dumps(result))


def measure(args, kind: str, parquet: str) -> dict:
    cmd = [sys.executable, __file__, CHILD, kind, "--images", args.images, "--n", str(args.n),
           "--batch-size", str(args.batch_size), "--parquet", parquet]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    if "seconds" in result:
        result["images_per_s"] = result["images"] / result["seconds"]
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (nxtrec synth's images/train)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="measurements of each kind, in turns; the best is reported")
    p.add_argument("--only", nargs="+", default=list(KINDS), choices=KINDS)
    p.add_argument(CHILD, dest="child", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--parquet", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return run_child(args)
    with tempfile.TemporaryDirectory() as tmp:
        parquet = str(Path(tmp) / "images.parquet")
        _write_parquet(args.images, args.n, Path(parquet), args.batch_size)
        rounds = {kind: [measure(args, kind, parquet) for _ in range(args.rounds)] for kind in args.only}
    report(args, rounds)


def report(args, rounds: dict) -> None:
    best = {k: (min(v, key=lambda r: r["seconds"]) if "seconds" in v[0] else min(v, key=lambda r: r["model_s"]))
            for k, v in rounds.items()}  # fmt: skip
    print(f"{args.n} images, batch {args.batch_size}, best of {args.rounds} rounds")
    for kind, r in best.items():
        if kind == "parts":
            total = r["decode_s"] + r["model_s"]
            print(f"  parts   decode {1000 * r['decode_s'] / r['images']:.2f} ms/image ({r['decode_s'] / total:.1%}), "
                  f"model {1000 * r['model_s'] / r['images']:.2f} ms/image ({r['model_s'] / total:.1%}), one thread")
            continue
        peak = f", worker peak {r['worker_peak_mb']:.0f} MB" if "worker_peak_mb" in r else ""
        ratio = f", {r['images_per_s'] / best['tag']['images_per_s']:.2f}x tag" if "tag" in best and kind != "tag" else ""
        print(f"  {kind:7} {r['images']} images in {r['seconds']:.2f} s, {r['images_per_s']:.1f} images/s{ratio}{peak}")
    print(json.dumps(rounds))


if __name__ == "__main__":
    main()
