"""A collection of 200 small images (two of them undecodable) as files and as a Parquet
table of bytes, the records `nxtrec tag` writes for it, and the comparison of a pipeline's
rows with those records: shared by the Ray, Spark and shard tests."""

from __future__ import annotations

import json
from pathlib import Path

import datagen
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nxtrec.cli.main import main
from nxtrec.tagging.output import read_records

N_IMAGES = 200
BAD = (37, 151)  # positions of the undecodable images
TAG_OPTIONS = ("--top-k", "4", "--min-prob", "0.001")


def write_collection(folder: Path, n: int = N_IMAGES) -> list[Path]:
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
        if i in BAD:
            paths.append(datagen.corrupt_jpeg(path.with_suffix(".jpg"), seed=i))
        else:
            size = (24 + i % 17, 20 + (i * 7) % 23)
            paths.append(datagen.write_image(path, i, size=size, fmt="PNG" if i % 5 == 0 else "JPEG"))
    return paths


def write_parquet(paths: list[Path], out: Path) -> Path:
    """The collection as img2dataset-like Parquet: key, image bytes, path."""
    table = pa.table({"key": [str(p) for p in paths], "jpg": [p.read_bytes() for p in paths],
                      "path": [str(p) for p in paths]})  # fmt: skip
    pq.write_table(table, out, row_group_size=25)  # several row groups: several blocks and tasks
    return out


def tag_reference(model_dir: Path, folder: Path, out: Path) -> tuple[dict, dict]:
    """`nxtrec tag` over the folder: records by id, error reasons by id."""
    code = main(["tag", str(folder), "--out", str(out), "--model", str(model_dir), "--workers", "1", *TAG_OPTIONS])
    assert code == 1  # the two undecodable images
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    return {r["id"]: r for r in read_records(out)}, {e["id"]: e["reason"] for e in errors}


def assert_rows_match(rows: list[dict], records: dict, errors: dict, id_column: str) -> None:
    """Every image once, labels as `nxtrec tag` wrote them (probabilities up to float
    batching effects), the undecodable ones with null labels and an error."""
    ids = [r[id_column] for r in rows]
    assert len(ids) == len(set(ids)) == len(records) + len(errors) == N_IMAGES
    for row in rows:
        name = row[id_column]
        if name in errors:
            assert row["labels"] is None and row["error"] and row["width"] == 0
            assert "cannot decode image" in row["error"] and "cannot decode image" in errors[name]
            continue
        want = records[name]
        assert row["error"] is None
        assert (row["width"], row["height"]) == (want["width"], want["height"])
        assert [x["label"] for x in row["labels"]] == [x["label"] for x in want["labels"]]
        assert [x["prob"] for x in row["labels"]] == pytest.approx([x["prob"] for x in want["labels"]], rel=1e-4)
