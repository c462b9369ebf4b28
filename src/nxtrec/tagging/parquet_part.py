"""`nxtrec tag --format parquet`: one Parquet file per part, one row per tagged image.

Schema: `id` string (for shard inputs the sample key, which is img2dataset's `key`),
`labels` list<struct<label: string, prob: float>> (float is 32-bit; a `confidence: float`
field joins the struct when the labels carry one), `width` and `height` int32, `model`
string (dictionary-encoded: one copy per file). pyarrow is the `parquet` extra."""

from __future__ import annotations

import io

from nxtrec.inference.ranking import rounded


def _schema(records: list[dict]):
    import pyarrow as pa

    fields = [pa.field("label", pa.string()), pa.field("prob", pa.float32())]
    if any("confidence" in lab for r in records for lab in r["labels"]):
        fields.append(pa.field("confidence", pa.float32()))
    return pa.schema([("id", pa.string()), ("labels", pa.list_(pa.struct(fields))), ("width", pa.int32()),
                      ("height", pa.int32()), ("model", pa.string())])  # fmt: skip


def parquet_bytes(records: list[dict], model: str) -> bytes:
    """The Parquet file of a part's records (TagResult.to_record dicts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema(records)
    names = schema.field("labels").type.value_type.names
    rows = [{"id": r["id"], "labels": [{k: lab.get(k) for k in names} for lab in r["labels"]], "width": r["width"],
             "height": r["height"], "model": model} for r in records]  # fmt: skip
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def parquet_row_count(data: bytes) -> int | None:
    """The rows of a Parquet file's bytes (from its footer); None when they are not Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
    except (pa.ArrowException, OSError):
        return None


def parquet_records(path) -> list[dict]:
    """A part's rows as records, probabilities rounded back to the digits they were written with."""
    import pyarrow.parquet as pq

    records = pq.read_table(path).to_pylist()
    for record in records:
        record.pop("model", None)
        for lab in record["labels"]:
            for k in ("prob", "confidence"):
                if lab.get(k) is not None:
                    lab[k] = rounded(lab[k])
            if lab.get("confidence", 0) is None:
                del lab["confidence"]
    return records
