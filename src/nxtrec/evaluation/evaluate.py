"""`nxtrec eval`: predict labels for validation shards and score them (metric.py).

Predictions are made once with the largest k and cut for every requested k. Under torchrun
each rank predicts its share of the shards; the per-image records are gathered on rank 0,
which scores them all, so the numbers are exactly those of one process.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from nxtrec.distributed import RankInfo, current_ranks, setup_distributed
from nxtrec.evaluation.calibration import Bin, confidence_report
from nxtrec.evaluation.correctness import right_labels
from nxtrec.evaluation.metric import Summary, format_table, score_records
from nxtrec.evaluation.reliability import write_reliability_diagram
from nxtrec.inference.engine import DecodeOptions, Engine
from nxtrec.model.embedders import MAX_TOKENS, build_embedder


def predict_records(engine: Engine, loader, options: DecodeOptions, limit: int | None = None,
                    progress: bool = True) -> list[dict]:  # fmt: skip
    """One record per image: {"image", "gt", "pred": [{"label", "prob"}...]}."""
    from tqdm import tqdm

    records = []
    with tqdm(total=limit or loader.num_samples, unit="img", desc="predict", disable=None if progress else True) as bar:
        for batch in loader:
            keep = [i for i in range(len(batch)) if not bool(batch.padded[i])]
            if limit is not None:
                keep = keep[: max(0, limit - len(records))]
            if not keep:
                break
            labels = engine.predict_batch(batch.pixels[keep].numpy(), options)
            for i, labs in zip(keep, labels):
                records.append({"image": batch.keys[i], "gt": batch.labels[i], "pred": [l.to_dict() for l in labs]})
            bar.update(len(keep))
            if limit is not None and len(records) >= limit:
                break
    return records


def gather_records(records: list[dict], ranks: RankInfo | None = None) -> list[dict] | None:
    """All ranks' records on rank 0 (None elsewhere); the records themselves without torchrun.
    `ranks`: default, the initialised process group's."""
    parts = (ranks or current_ranks()).gather(records, dst=0)
    return [r for part in parts for r in part] if parts is not None else None


def gather_counts(counts: dict[str, int], ranks: RankInfo | None = None) -> dict[str, int]:
    """Counts summed over all ranks (every rank gets the sum); the counts themselves without torchrun."""
    parts = (ranks or current_ranks()).gather(dict(counts))
    total: dict[str, int] = {}
    for part in parts:
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + n
    return total


def damaged_shards(loader) -> list[dict]:
    """The loader's damaged shards: {"shard", "damage", "lost"} each, `lost` the samples it
    could not deliver when its manifest says how many it held (None when unknown)."""
    return [{"shard": s.path, "damage": s.damage, "lost": s.lost}
            for shards, _ in loader.dataset.groups for s in shards if s.damage]


def add_shard_losses(skipped: dict[str, int], damaged: list[dict]) -> dict[str, int]:
    """`skipped` with the known losses of damaged shards added as "unreadable shard"."""
    lost = sum(d["lost"] or 0 for d in damaged)
    out = dict(skipped)
    if lost:
        out["unreadable shard"] = out.get("unreadable shard", 0) + lost
    return out


def label_strings(record: dict) -> list[str]:
    return [p["label"] if isinstance(p, dict) else p for p in record["pred"]]


def score(records: list[dict], k_values: list[int], embedder_name: str = "minilm", device: str = "cpu",
          clip_file: str | None = None, clip_vocab: str | None = None, max_tokens: int = MAX_TOKENS) -> dict[int, Summary]:
    embedder = build_embedder(embedder_name, device, clip_file, clip_vocab, max_tokens)
    plain = [{"image": r["image"], "gt": r["gt"], "pred": label_strings(r)} for r in records]
    return score_records(plain, k_values, embedder)


def write_outputs(records, summaries: dict[int, Summary], out: Path, info: dict) -> None:
    """`out` (JSON summary), `out` with .jsonl (per-image predictions, GT and scores), and a
    row per k appended to results.md / results.csv beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = sorted(records, key=lambda r: str(r["image"]))
    per_image = out.with_suffix(".jsonl")
    tmp = per_image.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for i, r in enumerate(records):
            scores = {str(k): vars(s.per_image[i]) for k, s in summaries.items()}
            f.write(json.dumps({**r, "scores": scores}, ensure_ascii=False) + "\n")
    os.replace(tmp, per_image)
    summary = {**info, "results": [s.row() for s in summaries.values()], "predictions": str(per_image)}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out)
    columns = ["model", "data", "k", "sampler", "ranking", "embedder", "n_images", "R", "P", "F1", "div_mean", "div_std", "seconds"]
    md, csv = out.parent / "results.md", out.parent / "results.csv"
    new_md, new_csv = not md.exists(), not csv.exists()
    with open(md, "a") as fm, open(csv, "a") as fc:
        if new_md:
            fm.write("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        if new_csv:
            fc.write(",".join(columns) + "\n")
        for s in summaries.values():
            values = [info["model"], info["data"], s.k, info["sampler"], info["ranking"], info["embedder"], s.n_images,
                      f"{s.recall:.5f}", f"{s.precision:.5f}", f"{s.f1:.5f}", f"{s.div_mean:.5f}", f"{s.div_std:.5f}",
                      f"{info['seconds']:.1f}"]
            fm.write("| " + " | ".join(str(v) for v in values) + " |\n")
            fc.write(",".join(str(v) for v in values) + "\n")


def evaluate(model, data, k_values, ranking="prob", embedder="minilm", out=None, registry=None, batch_size=16,
             device="cpu", dtype="float32", limit=None, num_workers=1, progress=True, clip_file=None,
             clip_vocab=None, max_tokens=MAX_TOKENS, predict_kwargs=None,
             skipped: dict | None = None, load: Callable[[str], Engine] | None = None,
             damaged: list | None = None, match: str = "exact", synonyms=None,
             calibration: dict | None = None) -> dict[int, Summary] | None:
    """Predict and score; returns the summaries on rank 0 (None on other ranks). The CLIP
    embedder needs `clip_file` and `clip_vocab` (see model.embedders.CLIPEmbedder); `max_tokens` is
    MiniLM's word-piece limit; `predict_kwargs` are more `DecodeOptions` (vocab, map_to,
    compat, ...). `load(device)` gives the engine on this rank's device (default: the PyTorch
    model directory `model`; `nxtrec eval` passes `nxtrec.engines.load_engine`). Samples
    the loader skipped (all ranks) are counted by reason into the `skipped` dict, when given,
    and into the summary JSON, with the samples lost in damaged shards (when their manifest
    says how many) as "unreadable shard"; the damaged shards go into the `damaged` list.
    The labels' calibration (ECE, bins; `match` and `synonyms` say when a label is right,
    nxtrec.evaluation.correctness) goes into the summary JSON, a reliability diagram beside it
    (.reliability.png), and into the `calibration` dict, when given."""
    from nxtrec.data.loader import build_loader
    from nxtrec.inference.recognizer import Recognizer

    load = load or (lambda dev: Recognizer.from_pretrained(model, device=dev, dtype=dtype))
    options = DecodeOptions.of(top_k=max(k_values), ranking=ranking, **(predict_kwargs or {}))

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        ranks = setup_distributed("cuda" if device.startswith("cuda") else "cpu")
    else:
        ranks = current_ranks()
    try:
        start = time.perf_counter()
        engine = load(str(ranks.device) if ranks.world > 1 else device)
        loader = build_loader(data, registry, batch_size=batch_size, image_size=engine.preprocessing.size,
                              num_workers=num_workers, balance="exact")
        with torch.inference_mode():
            records = predict_records(engine, loader, options, limit, progress)
        broken = damaged_shards(loader)  # the same on every rank: counted once
        skipped_here = add_shard_losses(gather_counts(loader.skipped, ranks), broken)
        if skipped is not None:
            skipped.update(skipped_here)
        if damaged is not None:
            damaged.extend(broken)
        records = gather_records(records, ranks)
    finally:
        ranks.close()
    if records is None:
        return None
    summaries = score(records, sorted(k_values), embedder, "cpu", clip_file, clip_vocab, max_tokens)
    info = {"model": str(model or "bundled default model"), "data": str(data), "sampler": "one-shot", "ranking": ranking, "embedder": embedder,
            "seconds": time.perf_counter() - start, "metric_max_tokens": max_tokens, "skipped": skipped_here,
            "damaged_shards": broken,
            **{key: str(getattr(value, "source", value)) for key, value in (predict_kwargs or {}).items()}}
    info["calibration"] = report = confidence_report(records, right_labels(records, match, synonyms))
    if calibration is not None:
        calibration.update(report, match=match)
    if out:
        write_outputs(records, summaries, out, info)
        write_reliability_diagram(Path(out).with_suffix(".reliability.png"), {
            name: ([Bin(**b) for b in report[name]["bins"]], report[name]["ece"]) for name in ("prob", "confidence")
            if name in report}, title=f"{info['model']} on {data}")  # fmt: skip
    return summaries


__all__ = ["evaluate", "predict_records", "score", "format_table", "write_outputs"]
