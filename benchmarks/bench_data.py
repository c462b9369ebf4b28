"""Data pipeline throughput: packing (samples/s, labels included) and the streaming loader
(images/s, JPEG decode + CLIP preprocessing in DataLoader workers).

    python benchmarks/bench_data.py [--images 512] [--size 640x480] [--workers 2]

Images are generated (smooth colour fields with noise, saved as JPEG quality 90, about the
size of a COCO photo) with COCO-like captions, into a temporary folder removed afterwards
(or --keep DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = [
    "A man riding a horse on a beach at sunset.",
    "Two dogs playing with a frisbee in a grassy park.",
    "A kitchen with a stove, a sink and wooden cabinets.",
    "A red double decker bus driving down a city street.",
    "A plate of pasta with tomatoes next to a glass of wine.",
    "A group of people standing around a table with laptops.",
    "A cat sleeping on a couch beside a pile of pillows.",
    "A small boat floating on a calm lake near the mountains.",
]


def make_images(root: Path, n: int, size: tuple[int, int]) -> Path:
    """n JPEGs and a JSONL listing them with two captions each (as a COCO image has five)."""
    rng = np.random.default_rng(0)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    lines = []
    for i in range(n):
        phase = rng.uniform(0, 6.28, 3)
        base = np.stack([np.sin(x / (40 + 7 * c) + y / (55 + 5 * c) + phase[c]) for c in range(3)], -1)
        arr = np.clip(127 + 100 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:06d}.jpg", quality=90)
        caption = f"{CAPTIONS[i % len(CAPTIONS)]} {CAPTIONS[(i * 3 + 1) % len(CAPTIONS)]}"
        lines.append(json.dumps({"image": f"{i:06d}.jpg", "caption": caption}))
    (root / "list.jsonl").write_text("\n".join(lines) + "\n")
    return root / "list.jsonl"


def bench_pack(jsonl: Path, out: Path, workers: int, shard_size: int, resize_shorter=None) -> dict:
    from nxtrec.data.pack import PackOptions, pack
    from nxtrec.data.sources import jsonl_records

    records = jsonl_records(jsonl)
    start = time.perf_counter()
    options = PackOptions(shard_size, resize_shorter)
    summary = pack(records, out, "jsonl", options=options, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return {"samples": summary.written, "seconds": seconds, "samples_per_s": summary.written / seconds}


def bench_labels(n: int) -> dict:
    from nxtrec.data.labels import extract_labels_batch, get_tagger

    get_tagger("spacy")  # loading the model is not part of the rate
    captions = [f"{CAPTIONS[i % 8]} {CAPTIONS[(i * 3 + 1) % 8]}" for i in range(n)]
    start = time.perf_counter()
    extract_labels_batch(captions)
    seconds = time.perf_counter() - start
    return {"captions": n, "seconds": seconds, "captions_per_s": n / seconds}


def bench_loader(shards: Path, workers: int, batch_size: int, epochs: int) -> dict:
    from nxtrec.data.loader import build_loader

    loader = build_loader(str(shards), batch_size=batch_size, num_workers=workers, shuffle=True, shuffle_buffer=256)
    rates = []
    for epoch in range(epochs):  # the first epoch includes starting the workers
        loader.set_epoch(epoch)
        start = time.perf_counter()
        n = sum(len(b) for b in loader)
        rates.append(n / (time.perf_counter() - start))
    return {"images": n, "workers": workers, "batch_size": batch_size, "images_per_s": rates}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", default="640x480", help="generated image size WxH")
    p.add_argument("--workers", type=int, default=2, help="pack processes and loader workers")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--keep", help="work in this folder and keep it")
    args = p.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="nxtrec-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        (root / "images").mkdir(exist_ok=True)
        jsonl = make_images(root / "images", args.images, size)
        mb = sum(f.stat().st_size for f in (root / "images").glob("*.jpg")) / 2**20
        results = {
            "machine": {"cpus": os.cpu_count()},
            "data": {"images": args.images, "size": args.size, "jpeg_MiB": round(mb, 1)},
            # packing first, as a fresh `nxtrec pack` run: loading spaCy is included
            "pack_copy": bench_pack(jsonl, root / "shards", args.workers, args.shard_size),
            "pack_resize_shorter_256": bench_pack(jsonl, root / "shards256", args.workers, args.shard_size, 256),
            "labels_spacy_1proc": bench_labels(2000),
            "loader_224": bench_loader(root / "shards", args.workers, args.batch_size, args.epochs),
            "loader_224_no_workers": bench_loader(root / "shards", 0, args.batch_size, 1),
        }
    finally:
        if not args.keep:
            shutil.rmtree(root)
    print(json.dumps(results, indent=1))
    print(
        f"\npack (copy, labels, {args.workers} processes): {results['pack_copy']['samples_per_s']:.0f} samples/s; "
        f"pack (resize 256): {results['pack_resize_shorter_256']['samples_per_s']:.0f} samples/s; "
        f"spaCy labels: {results['labels_spacy_1proc']['captions_per_s']:.0f} captions/s per process\n"
        f"loader ({args.workers} workers, decode + preprocess 224): "
        f"{max(results['loader_224']['images_per_s']):.0f} images/s (best epoch); "
        f"in the main process: {results['loader_224_no_workers']['images_per_s'][0]:.0f} images/s"
    )


if __name__ == "__main__":
    main()
