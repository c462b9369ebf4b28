"""ONNX deployment benchmark: our ONNX export (KV cache) vs the PyTorch path vs the released
ONNX layout (three decoder parts, no cache), on the same random weights, image, k and steps.

    python benchmarks/bench_onnx.py --preset nxtp-1.78b           # full size (~20 GB of disk)
    python benchmarks/bench_onnx.py --preset nxtp-1.78b --paths torch,torch-int8,torch-bf16,onnx,onnx-int8
    python benchmarks/bench_onnx.py --preset small --overlap-images examples
    python benchmarks/bench_onnx.py --model converted-nxtp-g3m --work /tmp/bench-real   # real weights

Stages (artifacts are kept in --work and reused by later runs; --fresh rebuilds them):
  1. a random model directory of the preset (`init_model`);
  2. `export_onnx` (float32, validated against PyTorch), then `quantize_dir` (int8) and
     `export_released_layout_dir`, each in its own process: time, peak memory, file sizes;
  3. inference, each path in its own process (so its peak memory is its own): load time,
     encoder, prefix and continuation times for one image, k branches, a fixed number of
     greedy steps for every branch (the work is the same in all paths), peak RSS;
  4. agreement: branches (tokens, probabilities) of every path against PyTorch;
  5. int8 effect on predictions: full one-shot sampling (stopping at delimiters) with the
     float and the int8 export on real images; overlap of the top-k label sets. The same for
     the PyTorch int8 and bfloat16 paths (`--paths ...,torch-int8,torch-bf16`) against
     PyTorch float32.

Peak memory is the process's peak resident set size (VmHWM), which counts memory-mapped
weight files too; the anonymous part is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nxtrec  # noqa: F401 - before torch (in the children), as in the CLI: its OpenMP setting

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------
# helpers run in child processes
# ---------------------------------------------------------------------------------------


def _memory() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    return out


def _peak_anon_sampler():
    """Track the peak of anonymous RSS (VmHWM also counts mapped files) in a thread."""
    import threading

    state = {"peak": 0.0, "run": True}

    def loop():
        while state["run"]:
            state["peak"] = max(state["peak"], _memory().get("RssAnon", 0.0))
            time.sleep(0.05)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return state


def _branches_json(branches):
    return [[{"tokens": b.tokens, "probs": b.probs} for b in img] for img in branches]


def child_prepare(args) -> dict:
    from nxtrec.model.presets import init_model

    t = time.perf_counter()
    init_model(args.preset, args.dir)
    return {"seconds": time.perf_counter() - t}


def child_export(args) -> dict:
    from nxtrec.onnx.export import export_onnx

    t = time.perf_counter()
    m = export_onnx(args.model, args.dir, image=args.image, log=lambda s: print(s, file=sys.stderr, flush=True))
    return {"seconds": time.perf_counter() - t, "validation": m["validation"], "export_seconds": m["export_seconds"]}


def child_quantize(args) -> dict:
    from nxtrec.onnx.quantize import quantize_dir

    t = time.perf_counter()
    quantize_dir(args.src, args.dir, log=lambda s: print(s, file=sys.stderr, flush=True))
    return {"seconds": time.perf_counter() - t}


def child_released(args) -> dict:
    from nxtrec.onnx.released import export_released_layout_dir

    t = time.perf_counter()
    export_released_layout_dir(args.model, args.dir, log=lambda s: print(s, file=sys.stderr, flush=True))
    return {"seconds": time.perf_counter() - t}


def child_run(args) -> dict:
    """One inference path on one image: load, a short warm-up, then the timed phases
    (`--repeat` times; the fastest of each phase is kept, which filters out other load on the
    machine)."""
    sampler = _peak_anon_sampler()
    res = {"path": args.kind}
    t0 = time.perf_counter()
    if args.kind == "torch":
        import torch

        from nxtrec.inference.recognizer import Recognizer
        from nxtrec.inference.sampling import one_shot, prefill

        if args.threads:
            torch.set_num_threads(args.threads)
        rec = Recognizer.from_pretrained(args.dir, dtype=args.dtype or "float32")
        res["load"] = time.perf_counter() - t0
        pixels = rec.pixels([args.image])
        model, prompt, delim = rec.model, rec.prompt_ids, rec.tokenizer.delimiter_id

        def phases():
            with torch.inference_mode():
                tokens = model.encode_images(pixels)
                yield "encoder", None
                prefix = prefill(model, tokens, prompt)
                yield "prefix", None
                yield "continuation", one_shot(model, tokens, prompt, args.k, delim, steps=args.steps, prefix=prefix)

        with torch.inference_mode():  # warm-up
            one_shot(model, model.encode_images(pixels), prompt, 2, delim, steps=1)
        res["threads"] = torch.get_num_threads()
    else:
        from nxtrec.onnx.recognizer import OnnxRecognizer

        rec = OnnxRecognizer(args.dir, threads=args.threads)
        dec = rec.decoder
        res["load"] = time.perf_counter() - t0
        pixels = rec.pixels([args.image])
        released = rec.layout == "released"

        def phases():
            tokens = rec.encode(pixels)
            yield "encoder", None
            x = rec.prefix_embeddings(tokens)
            if released:
                logits = dec.run(x)
            else:
                logits, kv = dec.prefill(x)
            yield "prefix", None
            if released:
                yield "continuation", dec.one_shot(x, args.k, steps=args.steps, prefix_logits=logits)
            else:
                yield "continuation", dec.continue_branches(logits, kv, x.shape[1], args.k, steps=args.steps)

        x = rec.prefix_embeddings(rec.encode(pixels))  # warm-up
        if released:
            dec.run(x)
        else:
            logits, kv = dec.prefill(x)
            dec.continue_branches(logits, kv, x.shape[1], 2, steps=1)
        res["threads"] = args.threads or "ort default"
    repeats = int(args.repeat or 1)
    res["repeats"] = repeats
    for _ in range(repeats):
        t = time.perf_counter()
        for name, out in phases():
            now = time.perf_counter()
            res[name] = min(res.get(name, float("inf")), now - t)
            t = now
            if out is not None:
                br = out
    res["total"] = res["encoder"] + res["prefix"] + res["continuation"]
    sampler["run"] = False
    mem = _memory()
    res["peak_rss_mb"] = mem["VmHWM"]
    res["peak_anon_mb"] = max(sampler["peak"], mem["RssAnon"])
    res["branches"] = _branches_json(br)
    return res


def child_labels(args) -> dict:
    """Full one-shot sampling (stopping at delimiters) on every image: top-k labels."""
    from nxtrec.model.image import list_images

    if args.kind == "torch":
        import torch

        from nxtrec.inference.recognizer import Recognizer

        if args.threads:
            torch.set_num_threads(args.threads)
        rec = Recognizer.from_pretrained(args.dir, dtype=args.dtype or "float32")
    else:
        from nxtrec.onnx.recognizer import OnnxRecognizer

        rec = OnnxRecognizer(args.dir, threads=args.threads)
    images = list_images([args.images])
    out, t = {}, time.perf_counter()
    for path in images:
        out[path] = [lab.to_dict() for lab in rec.predict([path], top_k=args.k)[0]]
    return {"labels": out, "seconds": time.perf_counter() - t, "peak_rss_mb": _memory()["VmHWM"]}


CHILDREN = {"prepare": child_prepare, "export": child_export, "quantize": child_quantize,
            "released": child_released, "run": child_run, "labels": child_labels}


# ---------------------------------------------------------------------------------------
# the parent
# ---------------------------------------------------------------------------------------


def spawn(stage: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--child", stage]
    for k, v in kw.items():
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"stage {stage} failed (exit {proc.returncode})")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "peak_rss_mb" not in res and stage != "run":
        res["peak_rss_mb"] = res.pop("_peak", None) or float("nan")
    res["wall"] = time.perf_counter() - t
    return res


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def peak_of_child(res: dict) -> str:
    return f"{res['peak_rss_mb'] / 1024:.1f} GB" if "peak_rss_mb" in res else "-"


def same_branches(a, b, tol=1e-3) -> tuple[bool, float]:
    worst, same = 0.0, True
    for ia, ib in zip(a, b):
        for x, y in zip(ia, ib):
            if x["tokens"] != y["tokens"]:
                same = False
            worst = max([worst] + [abs(p - q) for p, q in zip(x["probs"], y["probs"])])
    return same and worst < tol, worst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="nxtp-1.78b")
    p.add_argument("--work", help="artifact folder (default: /tmp/nxtrec-bench-onnx-PRESET)")
    p.add_argument("--image", default=str(ROOT / "examples" / "scene.jpg"))
    p.add_argument("--overlap-images", help="folder of real images for the int8 label overlap (default: "
                   "/work/shared/images if present, else examples/)")
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--steps", type=int, default=3, help="greedy steps after the top-k step, every branch kept")
    p.add_argument("--threads", type=int, help="intra-op threads for every path (default: each library's choice)")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions per path, fastest kept "
                   "(the released layout runs once: one repetition takes minutes at full size)")
    p.add_argument("--paths", default="torch,onnx,onnx-int8,released",
                   help="comma-separated subset of torch,torch-int8,torch-bf16,onnx,onnx-int8,released")
    p.add_argument("--no-overlap", action="store_true", help="skip the int8/bf16 label-overlap measurement")
    p.add_argument("--fresh", action="store_true", help="rebuild every artifact")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model", help="use this model directory (e.g. converted real weights) instead of a random one")
    for hidden in ("dir", "src", "kind", "k", "images", "dtype"):
        p.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        args.k = int(args.k) if args.k else args.top_k
        res = CHILDREN[args.child](args)
        res.setdefault("peak_rss_mb", _memory()["VmHWM"])
        print(json.dumps(res))
        return 0

    work = Path(args.work or f"/tmp/nxtrec-bench-onnx-{args.preset}")
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    paths = args.paths.split(",")
    model = Path(args.model) if args.model else work / "model"
    onnx, int8, released = work / "onnx", work / "onnx-int8", work / "released"
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").is_file() else {}
    results["settings"] = {"preset": args.model or args.preset, "image": args.image, "k": args.top_k, "steps": args.steps,
                           "threads": args.threads, "cpus": os.cpu_count()}
    save = lambda: (work / "results.json").write_text(json.dumps(results, indent=1))  # noqa: E731

    def stage(name, target: Path, marker: str, **kw):
        if (target / marker).is_file() and name in results.get("build", {}):
            print(f"[{name}] reusing {target}")
            return
        shutil.rmtree(target, ignore_errors=True)
        print(f"[{name}] building {target} ...", flush=True)
        res = spawn(name, dir=target, **kw)
        results.setdefault("build", {})[name] = res
        save()
        print(f"[{name}] {res['seconds']:.0f} s, peak RSS {peak_of_child(res)}", flush=True)

    if not args.model:
        stage("prepare", model, "model.safetensors", preset=args.preset)
    stage("export", onnx, "nxtrec-onnx.json", model=model, image=args.image)
    if "onnx-int8" in paths or not args.no_overlap:
        stage("quantize", int8, "nxtrec-onnx.json", src=onnx)
    if "released" in paths:
        stage("released", released, "decoder_p3.onnx", model=model)
    results["sizes"] = {name: dir_size(d) for name, d in
                        (("model", model), ("onnx", onnx), ("onnx-int8", int8), ("released", released)) if d.is_dir()}
    results["files"] = {name: {p.name: p.stat().st_size for p in sorted(d.iterdir()) if p.is_file()}
                        for name, d in (("onnx", onnx), ("onnx-int8", int8), ("released", released)) if d.is_dir()}
    save()

    runs = {"torch": dict(kind="torch", dir=model), "torch-int8": dict(kind="torch", dir=model, dtype="int8"),
            "torch-bf16": dict(kind="torch", dir=model, dtype="bfloat16"), "onnx": dict(kind="onnx", dir=onnx),
            "onnx-int8": dict(kind="onnx", dir=int8), "released": dict(kind="onnx", dir=released)}
    for name in paths:
        print(f"[run {name}] k={args.top_k} steps={args.steps} ...", flush=True)
        res = spawn("run", image=args.image, k=args.top_k, steps=args.steps, threads=args.threads,
                    repeat=1 if name == "released" else args.repeat, **runs[name])
        results.setdefault("runs", {})[name] = res
        save()
        print(f"[run {name}] total {res['total']:.2f} s (prefix {res['prefix']:.2f}, continuation "
              f"{res['continuation']:.2f}), peak RSS {res['peak_rss_mb'] / 1024:.1f} GB", flush=True)

    if not args.no_overlap:
        folder = args.overlap_images or ("/work/shared/images" if Path("/work/shared/images").is_dir() else str(ROOT / "examples"))
        # The ONNX pair always (as before); the PyTorch pairs when their reduced path ran.
        pairs = [pair for pair in OVERLAP_PAIRS if pair[1] in paths or pair == OVERLAP_PAIRS[0]]
        for name in dict.fromkeys(name for pair in pairs for name in pair):
            print(f"[labels {name}] top-{args.top_k} on {folder} ...", flush=True)
            results.setdefault("labels", {})[name] = spawn("labels", images=folder, k=args.top_k, threads=args.threads,
                                                           **runs[name])
            save()
    print()
    print(report(results))
    return 0


# (reference, reduced precision) pairs whose top-k labels are compared on real images.
OVERLAP_PAIRS = (("onnx", "onnx-int8"), ("torch", "torch-int8"), ("torch", "torch-bf16"))


def _short(labels) -> str:
    return ascii(labels[0])[:24] if labels else "-"


def report(results: dict) -> str:
    s = results["settings"]
    lines = [f"preset {s['preset']}, image {Path(s['image']).name}, k={s['k']}, {s['steps']} greedy steps for every "
             f"branch, {s['cpus']} CPUs, threads {s['threads'] or 'default'}", ""]
    build = results.get("build", {})
    if build:
        lines.append(f"{'build':<10}{'time (s)':>10}{'peak RSS':>12}")
        for name, res in build.items():
            lines.append(f"{name:<10}{res['seconds']:>10.0f}{peak_of_child(res):>12}")
        if "validation" in build.get("export", {}):
            v = build["export"]["validation"]["max_abs_diff"]
            lines.append("export validation, max |ORT - PyTorch|: " + ", ".join(f"{k} {x:.1e}" for k, x in v.items()))
        lines.append("")
    lines.append("sizes: " + ", ".join(f"{k} {gb(v)}" for k, v in results.get("sizes", {}).items()))
    lines.append("")
    runs = results.get("runs", {})
    if runs:
        head = f"{'path':<13}{'load':>8}{'encoder':>9}{'prefix':>9}{'contin.':>10}{'total':>9}{'peak RSS':>10}{'anon':>8}  same as torch"
        lines.append(head)
        ref = runs.get("torch")
        for name, r in runs.items():
            same = "-"
            if ref and name != "torch":
                ok, worst = same_branches(ref["branches"], r["branches"])
                same = f"{'yes' if ok else 'NO'} (max prob diff {worst:.1e})"
            lines.append(f"{name:<13}{r['load']:>8.1f}{r['encoder']:>9.2f}{r['prefix']:>9.2f}{r['continuation']:>10.2f}"
                         f"{r['total']:>9.2f}{r['peak_rss_mb'] / 1024:>8.1f}GB{r['peak_anon_mb'] / 1024:>6.1f}GB  {same}")
        if ref:
            for name, r in runs.items():
                if name != "torch":
                    lines.append(f"  {name}: {ref['total'] / r['total']:.2f}x the PyTorch path's speed "
                                 f"(continuation {ref['continuation'] / r['continuation']:.2f}x)")
        if "onnx" in runs and "released" in runs:
            lines.append(f"  onnx vs released layout: {runs['released']['total'] / runs['onnx']['total']:.1f}x faster")
        lines.append("")
    labels = results.get("labels", {})
    for ref, other in OVERLAP_PAIRS:
        if ref in labels and other in labels:
            lines += overlap_report(labels, ref, other)
    return "\n".join(lines)


def overlap_report(labels: dict, ref: str, other: str) -> list[str]:
    a, b = labels[ref]["labels"], labels[other]["labels"]
    lines, overlaps, firsts = [], [], []
    for img in a:
        la, lb = [x["label"] for x in a[img]], [x["label"] for x in b[img]]
        overlaps.append(len(set(la) & set(lb)) / max(len(la), 1))
        firsts.append(la[:1] == lb[:1])
        lines.append(f"  {Path(img).name:<20} top-{len(la)} overlap {overlaps[-1]:.2f}, top-1 "
                     f"{'same' if firsts[-1] else 'differs'} ({_short(la)} / {_short(lb)})")
    lines.append(f"{other} vs {ref} labels: mean top-k overlap {sum(overlaps) / len(overlaps):.2f}, same top-1 "
                 f"{sum(firsts)}/{len(firsts)}; time {labels[ref]['seconds']:.0f} s vs {labels[other]['seconds']:.0f} s")
    return lines


if __name__ == "__main__":
    sys.exit(main())
