"""The contract that the Ray and Spark adapters share: an Arrow table in, the same table out
with the image column replaced by the label columns, row for row.

A column of image bytes (the img2dataset / WebDataset case) or of paths is decoded and
labelled with the same code as `nxtrec tag` (nxtrec.tagging: decode, tag_batches), so a row's
`labels` equal that image's record of `nxtrec tag`. An image that cannot be read gets null
labels and its reason in `error`; it never fails the batch. Added columns:

- `labels`: list of {label, prob} (plus `confidence` when the engine's labels carry one);
- `width`, `height`: the image's size (0 when it failed);
- `error`: null, or why the image failed.

The engine is loaded once, when the tagger is made (one per Ray actor or Spark worker
process). Torch-free with `onnx=`: the workers may run the nxtrec-runtime install."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from nxtrec.engines import load_engine
from nxtrec.errors import NxtrecError
from nxtrec.extras import require
from nxtrec.inference.engine import DecodeOptions
from nxtrec.tagging.inputs import InputItem
from nxtrec.tagging.pipeline import TagResult, batch_ranges, tag_batches
from nxtrec.tagging.prefetch import BatchDecoder, prefetched_batches

ADDED_COLUMNS = ("labels", "width", "height", "error")


class IntegrationError(NxtrecError):
    pass


@dataclass
class TaggerConfig:
    """What an adapter's workers need to build their tagger (plain values: it is pickled to
    them). `options`: `DecodeOptions` fields (top_k, min_prob, vocab, ...)."""

    model: str | None = None  # a model directory (None: the bundled default model)
    onnx: str | None = None  # an exported ONNX directory, run with ONNX Runtime
    image_column: str = "image"  # image bytes (binary) or paths (string)
    id_column: str | None = None  # names images in `error` (default: the path, or the row)
    device: str = "auto"  # auto: the GPU when the worker has one (PyTorch), else the CPU
    dtype: str = "float32"
    threads: int | None = None  # the engine's CPU threads (default: its own choice)
    batch_size: int = 32  # images per forward pass
    max_labels: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, **kwargs) -> TaggerConfig:
        """From keyword arguments: the fields, and decoding options for the rest."""
        names = {f.name for f in fields(cls)} - {"options"}
        return cls(**{k: v for k, v in kwargs.items() if k in names},
                   options={k: v for k, v in kwargs.items() if k not in names})  # fmt: skip

    def decode_options(self) -> DecodeOptions:
        options = DecodeOptions.of(**self.options)
        if options.maps:
            raise IntegrationError("maps=True is not supported by the integrations: use `nxtrec tag --maps`")
        return options


def worker_device(device: str, onnx: str | None) -> str:
    """The device of this worker: ONNX Runtime runs on the CPU; `auto` picks the GPU that the
    scheduler gave this worker (CUDA_VISIBLE_DEVICES), if any."""
    if onnx or device != "auto":
        return "cpu" if onnx else device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ArrowTagger:
    """Loads one engine, then labels Arrow tables (`tag_table`)."""

    def __init__(self, config: TaggerConfig):
        require("pyarrow")  # the Ray and Spark paths bring it: one line naming the extra if not
        self.config = config
        self.options = config.decode_options()
        device = worker_device(config.device, config.onnx)
        self.engine = load_engine(config.model, config.onnx, device=device, dtype=config.dtype,
                                  threads=config.threads)  # fmt: skip
        self.options.check(self.engine.capabilities)

    def results(self, table) -> list[TagResult]:
        """One result per row of `table` (a pyarrow Table or RecordBatch), in order."""
        items = _input_items(table, self.config.image_column, self.config.id_column)
        decoder = BatchDecoder(items, batch_ranges(0, len(items), self.config.batch_size), self.engine.preprocessing)

        def predict(pixels):
            return self.engine.predict_batch(pixels, self.options)

        # decoded here (workers=0): the pipeline runs one tagger per core or GPU already
        return list(tag_batches(predict, items, prefetched_batches(decoder, 0), self.config.max_labels))

    def tag_table(self, table):
        """`table` without its image column if it held bytes, plus the label columns."""
        import pyarrow as pa

        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        clash = [name for name in ADDED_COLUMNS if name in table.column_names]
        if clash:
            raise IntegrationError(f"the input already has a column {clash[0]!r}; rename or drop it first")
        results = self.results(table)
        if _is_binary(table.schema.field(self.config.image_column).type):
            table = table.drop_columns([self.config.image_column])
        for name, column in label_columns(results).items():
            table = table.append_column(name, column)
        return table


def _is_binary(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def _input_items(table, image_column: str, id_column: str | None) -> list[InputItem]:
    import pyarrow as pa

    if image_column not in table.column_names:
        raise IntegrationError(f"no column {image_column!r} (image_column) among {table.column_names}")
    kind = table.schema.field(image_column).type
    if not (_is_binary(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise IntegrationError(f"column {image_column!r} is {kind}: it must hold image bytes (binary) or paths (string)")
    sources = table.column(image_column).to_pylist()
    ids = [str(v) for v in table.column(id_column).to_pylist()] if id_column else [None] * len(sources)
    return [InputItem(name or (src if isinstance(src, str) else f"row {k}"), src)
            for k, (name, src) in enumerate(zip(ids, sources))]  # fmt: skip


def label_columns(results: list[TagResult]) -> dict:
    """The added columns (pyarrow arrays) of the results, in order; labels as `nxtrec tag`
    writes them, with `confidence` passed through when the labels carry one."""
    import pyarrow as pa

    labels = [None if r.error is not None else _labels(r) for r in results]
    fields = [pa.field("label", pa.string()), pa.field("prob", pa.float64())]
    if any("confidence" in lab for row in labels if row for lab in row):
        fields.append(pa.field("confidence", pa.float64()))
    return {
        "labels": pa.array(labels, type=pa.list_(pa.struct(fields))),
        "width": pa.array([r.width for r in results], type=pa.int32()),
        "height": pa.array([r.height for r in results], type=pa.int32()),
        "error": pa.array([r.error for r in results], type=pa.string()),
    }


def _labels(result: TagResult) -> list[dict]:
    return [{k: v for k, v in lab.items() if k != "map"} for lab in result.to_record()["labels"]]
