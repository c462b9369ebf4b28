"""What label maps cost: `Recognizer.predict` with and without `maps=True` on the same image,
alternating runs, best of N each; and, robust to a busy machine, the time spent inside the map
recording (probes, rows, maps) as a share of one `maps=True` predict's own time. Run it under
`flock /tmp/nxtrec-heavy.lock` at full size.

    nxtrec init-model --preset nxtp-1.78b --out /tmp/m178
    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_maps_overhead.py --model /tmp/m178 --repeats 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from nxtrec.inference import attention
from nxtrec.inference.attention import MAP_RULES, GroundingRecorder
from nxtrec.inference.recognizer import Recognizer


def recording_share(rec: Recognizer, image, top_k: int, rule: str) -> tuple[float, float]:
    """(seconds inside the map recording, seconds of the whole predict) for one maps=True run."""
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return wrapper

    patched = {"on_prefix": GroundingRecorder.on_prefix, "on_step": GroundingRecorder.on_step,
               "end_step": GroundingRecorder.end_step}
    attach = attention.attach_maps
    for name, fn in patched.items():
        setattr(GroundingRecorder, name, timed(fn))
    attention.attach_maps = timed(attach)
    try:
        start = time.perf_counter()
        rec.predict([image], top_k=top_k, maps=True, map_rule=rule)
        return spent[0], time.perf_counter() - start
    finally:
        for name, fn in patched.items():
            setattr(GroundingRecorder, name, fn)
        attention.attach_maps = attach


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model directory (default: the bundled demo model)")
    ap.add_argument("--image", help="image file (default: a random 320x240 image)")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rules", nargs="+", default=["mean"], choices=MAP_RULES)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    rec = Recognizer.from_pretrained(args.model, dtype=args.dtype)
    image = args.image or Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    variants = [("no maps", {})] + [(f"maps ({rule})", {"maps": True, "map_rule": rule}) for rule in args.rules]
    rec.predict([image], top_k=args.top_k)  # warm-up
    best = {name: float("inf") for name, _ in variants}
    labels = {}
    for _ in range(args.repeats):
        for name, kwargs in variants:
            start = time.perf_counter()
            out = rec.predict([image], top_k=args.top_k, **kwargs)[0]
            best[name] = min(best[name], time.perf_counter() - start)
            labels[name] = [(lab.label, lab.prob) for lab in out]
    base = best["no maps"]
    for name, _ in variants:
        same = "same labels" if labels[name] == labels["no maps"] else "DIFFERENT labels"
        print(f"{name:16s} {best[name]:8.3f} s  {100 * (best[name] / base - 1):+6.1f}%  {same}")
    for rule in args.rules:
        inside, total = recording_share(rec, image, args.top_k, rule)
        print(f"maps ({rule}): {inside:.3f} s inside the recording of a {total:.3f} s predict ({100 * inside / total:.1f}%)")


if __name__ == "__main__":
    main()
