"""Teaching new labels to the bundled model (`nxtrec teach`), against two baselines: `--vocab`
with the new names (no teaching) and a full fine-tune of the decoder (the expensive way).

Five emoji categories the bundled model never saw (nxtrec.data.synth_new), N = 5, 10, 20
example scenes per label (each scene shows the new object among 0-3 known ones and is labelled
with all of them, or with `--new-only` with the new name only). Reported per row:
- recall@5 of the new label on 500 held-out scenes that contain it (100 per label), of the
  known objects beside it there, and of the objects of 400 fresh scenes of the old categories;
- F1@10 on the usual 1,000 held-out scenes of the bundled model (`nxtrec synth` seed 0), to
  measure forgetting;
- teaching time and peak RSS (a child process on --threads threads), and the adapter's size.

Run it under the shared gate (it takes about 10 minutes on 2 cores):

    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_teach.py --out /tmp/bench-teach.json

The cost per step of teaching a full-size model (random weights are enough for the cost):

    nxtrec init-model --preset nxtp-1.78b --out /tmp/m178
    flock /tmp/nxtrec-heavy.lock python benchmarks/bench_teach.py --cost /tmp/m178 --cost-steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from nxtrec.data.synth import CATEGORIES, generate, render_scene
from nxtrec.data.synth_new import new_categories, render_new
from nxtrec.engines import load_engine
from nxtrec.evaluation.evaluate import evaluate
from nxtrec.model.adapter import ADAPTER_WEIGHTS

CHILD = [sys.executable, "-m", "nxtrec.cli.main"]


def subset(listing: Path, n: int, out: Path, new_only: bool = False) -> Path:
    """The first `n` example scenes of each label, as the JSONL `nxtrec teach` reads, each
    labelled with every object in it (the new one first), or with the new one only."""
    counts: dict[str, int] = {}
    rows = []
    for line in listing.read_text().splitlines():
        row = json.loads(line)
        label = row["labels"][0]
        counts[label] = counts.get(label, 0) + 1
        if counts[label] <= n:
            others = [] if new_only else [o for o in row["objects"] if o != label]
            rows.append({"image": str(listing.parent / row["image"]), "labels": [label, *others]})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def new_recall(engine, listing: Path, **options) -> tuple[float, float]:
    """Share of held-out scenes whose new label is among the engine's first 5 labels, and the
    same for the known objects drawn beside it (what the model does on labels it was trained on)."""
    rows = [json.loads(line) for line in listing.read_text().splitlines()]
    preds = engine.predict([str(listing.parent / r["image"]) for r in rows], top_k=10, batch_size=32, **options)
    top5 = [[lab.label for lab in p[:5]] for p in preds]
    known = [o in t for r, t in zip(rows, top5) for o in r["objects"] if o != r["labels"][0]]
    return sum(r["labels"][0] in t for r, t in zip(rows, top5)) / len(rows), sum(known) / max(1, len(known))


def own_recall(engine, scenes, **options) -> float:
    """Share of the objects of fresh scenes of the bundled model's own categories found among
    its first 5 labels (exact names): what the model does on labels it was trained on."""
    preds = engine.predict([image for image, _ in scenes], top_k=5, batch_size=32, **options)
    hits = [name in {lab.label for lab in p} for (_, names), p in zip(scenes, preds) for name in names]
    return sum(hits) / len(hits)


def old_f1(engine, val: Path, **options) -> float:
    summaries = evaluate(None, str(val), [10], load=lambda device: engine, batch_size=32, progress=False,
                         predict_kwargs=options or None)  # fmt: skip
    return summaries[10].f1


def timed_child(cmd: list[str], threads: int) -> tuple[float, float]:
    """Run `cmd`; its wall time in seconds and peak RSS in MB."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def full_finetune(examples: str, out: str, steps: int, lr: float, threads: int) -> None:
    """The baseline: every decoder weight trained (same data, batches and loss as teach, no
    adapter, no early stopping), saved as a model directory."""
    from nxtrec.model.adapter import detach_lora
    from nxtrec.model.directory import TOKENIZER_FILE, default_model_dir, save_model_dir
    from nxtrec.training.teach import Teacher, TeachOptions
    from nxtrec.training.teach_data import read_examples

    torch.set_num_threads(threads)
    teacher = Teacher(None, read_examples(examples), Path(out), TeachOptions(threads=threads))
    detach_lora(teacher.model, teacher.layers, merge=False)
    teacher.model.language_decoder.requires_grad_(True)
    teacher.optimizer = torch.optim.AdamW(teacher.model.language_decoder.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        teacher.train_step(step)
    save_model_dir(teacher.model.eval(), default_model_dir() / TOKENIZER_FILE, out)


def teach_cost(model_dir: str, steps: int, batch: int, threads: int) -> None:
    """Seconds per optimizer step of teaching `model_dir` (e.g. the 1.78B preset with random
    weights), after one warm-up step, on 8 example scenes; printed as JSON with the peak RSS."""
    import resource

    from nxtrec.training.teach import Teacher, TeachOptions
    from nxtrec.training.teach_data import read_examples

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        listing = render_new(Path(tmp) / "examples", new_categories("2"), 4)
        start = time.perf_counter()
        options = TeachOptions(batch_size=batch, held_out=0, threads=threads, replay_scenes=0)
        teacher = Teacher(model_dir, read_examples(listing.parent), Path(tmp) / "out", options)
        setup = time.perf_counter() - start
        times = []
        for step in range(steps + 1):
            start = time.perf_counter()
            teacher.train_step(step)
            times.append(time.perf_counter() - start)
    print(json.dumps({"model": model_dir, "batch": batch, "threads": threads, "setup_s": round(setup, 1),
                      "step_s": [round(t, 2) for t in times[1:]], "warmup_step_s": round(times[0], 2),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def row(name, engine, data, seconds=None, rss=None, size=None, **options) -> dict:
    new, known = new_recall(engine, data["held"], **options)
    return {"method": name, "recall@5 new": round(new, 3), "recall@5 known (same scenes)": round(known, 3),
            "recall@5 own (old scenes)": round(own_recall(engine, data["own"], **options), 3),
            "F1@10 old": round(old_f1(engine, data["val"], **options), 4), "seconds": seconds and round(seconds, 1),
            "peak RSS MB": rss and round(rss), "size MB": size and round(size / 1e6, 2)}  # fmt: skip


def prepare(tmp: Path, labels: int) -> dict:
    cats = new_categories(str(labels))
    data = {"examples": render_new(tmp / "examples", cats, 20, seed=0),
            "held": render_new(tmp / "held", cats, 500 // labels, seed=1)}  # fmt: skip
    generate(tmp / "old", n=0, seed=0, n_val=1000, size=256, progress=False)
    rng = random.Random("bench-teach/own")
    data["own"] = [(image, sorted({o.name for o in objects})) for image, _, objects in
                   (render_scene(rng) for _ in range(400))]  # fmt: skip
    data["val"] = tmp / "old" / "val"
    tags = tmp / "tags.txt"
    tags.write_text("\n".join([c.name for c in CATEGORIES] + [c.name for c in cats]) + "\n")
    data["tags"] = tags
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shots", type=int, nargs="+", default=[5, 10, 20], help="examples per new label")
    ap.add_argument("--labels", type=int, default=5, help="new categories")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-steps", type=int, default=300, help="steps of the full fine-tune baseline")
    ap.add_argument("--full-lr", type=float, default=1e-4)
    ap.add_argument("--teach-args", default="", help="more options for nxtrec teach")
    ap.add_argument("--new-only", action="store_true", help="label the examples with the new name only "
                    "(the rest left to self-distillation)")
    ap.add_argument("--no-full", action="store_true", help="skip the full fine-tune baseline")
    ap.add_argument("--out", help="JSON file for the rows")
    ap.add_argument("--cost", metavar="MODEL_DIR", help="only measure the cost per step of teaching MODEL_DIR")
    ap.add_argument("--cost-steps", type=int, default=2)
    ap.add_argument("--cost-batch", type=int, default=4)
    ap.add_argument("--full-finetune-child", nargs=2, metavar=("EXAMPLES", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.full_finetune_child:
        return full_finetune(*args.full_finetune_child, args.full_steps, args.full_lr, args.threads)
    if args.cost:
        return teach_cost(args.cost, args.cost_steps, args.cost_batch, args.threads)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(tmp, args.labels)
        base = load_engine()
        rows.append(row("bundled model", base, data))
        rows.append(row("--vocab with the new names", base, data, vocab=str(data["tags"])))
        for n in args.shots:
            examples, out = subset(data["examples"], n, tmp / f"ex{n}.jsonl", args.new_only), tmp / f"adapter{n}"
            cmd = [*CHILD, "teach", "--examples", str(examples), "--out", str(out), "--threads", str(args.threads),
                   *args.teach_args.split()]  # fmt: skip
            seconds, rss = timed_child(cmd, args.threads)
            figures = json.loads((out / "adapter.json").read_text())["figures"]
            engine = load_engine(adapter=str(out))
            rows.append(row(f"teach, N={n} ({figures['steps']} steps)", engine, data, seconds, rss,
                            (out / ADAPTER_WEIGHTS).stat().st_size))  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        n = 0 if args.no_full else max(args.shots)
        if n:
            examples, out = subset(data["examples"], n, tmp / "full.jsonl", args.new_only), tmp / "full"
            cmd = [sys.executable, __file__, "--full-finetune-child", str(examples), str(out), "--threads",
                   str(args.threads), "--full-steps", str(args.full_steps), "--full-lr", str(args.full_lr)]  # fmt: skip
            seconds, rss = timed_child(cmd, args.threads)
            rows.append(row(f"full decoder fine-tune, N={n} ({args.full_steps} steps)", load_engine(str(out)),
                            data, seconds, rss, (out / "model.safetensors").stat().st_size))  # fmt: skip
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join("" if v is None else str(v) for v in r.values()) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
