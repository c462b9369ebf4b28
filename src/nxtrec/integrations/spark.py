"""Tag a Spark DataFrame: `tag_dataframe(df, ...)` runs `df.mapInArrow` with `spark_tagger`,
whose function labels each partition's Arrow batches; `output_schema` is the result's
schema (the input's columns, the image column dropped when it holds bytes, plus `labels`,
`width`, `height`, `error`: nxtrec.integrations.arrow).

Each Python worker process loads the engine once, on its first batch, and keeps it for the
tasks it runs next (Spark reuses its Python workers: spark.python.worker.reuse). A task that
fails is run again by Spark, and only a finished task's output is kept."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

from nxtrec.integrations.arrow import ArrowTagger, TaggerConfig, label_columns

# repr(TaggerConfig) -> this Python worker's tagger, kept for the tasks it runs next
_TAGGERS: dict[str, ArrowTagger] = {}


def _tagger(config: TaggerConfig) -> ArrowTagger:
    key = repr(config)
    if key not in _TAGGERS:
        _TAGGERS[key] = ArrowTagger(config)
    return _TAGGERS[key]


def _tag_batches(config: TaggerConfig, schema, batches: Iterator) -> Iterator:
    tagger = None
    for batch in batches:
        tagger = tagger or _tagger(config)
        yield from tagger.tag_table(batch).cast(schema).to_batches()


def spark_tagger(schema, **kwargs) -> Callable[[Iterator], Iterator]:
    """The function for `df.mapInArrow(fn, output_schema(df.schema, ...))`; `schema`: that
    output schema. `kwargs`: as nxtrec.integrations.ray.RayTagger."""
    from pyspark.sql.pandas.types import to_arrow_schema

    config = TaggerConfig.of(**kwargs)
    config.decode_options()  # a bad option fails here, not in every task
    return functools.partial(_tag_batches, config, to_arrow_schema(schema))


def output_schema(schema, image_column: str = "image", confidence: bool = False):
    """The Spark schema of the tagged DataFrame of `schema`; `confidence`: the labels carry
    one (a calibrated model)."""
    import pyarrow as pa
    from pyspark.sql.pandas.types import from_arrow_type
    from pyspark.sql.types import BinaryType, StructField, StructType

    kept = [f for f in schema.fields if not (f.name == image_column and isinstance(f.dataType, BinaryType))]
    labels = label_columns([])
    if confidence:
        struct = pa.struct([*labels["labels"].type.value_type, pa.field("confidence", pa.float64())])
        labels["labels"] = pa.array([], type=pa.list_(struct))
    added = [StructField(name, from_arrow_type(column.type), True) for name, column in labels.items()]
    return StructType(kept + added)


def tag_dataframe(df, confidence: bool = False, **kwargs):
    """`df` with the label columns (mapInArrow); `kwargs`: as RayTagger."""
    schema = output_schema(df.schema, kwargs.get("image_column", "image"), confidence)
    return df.mapInArrow(spark_tagger(schema, **kwargs), schema)
