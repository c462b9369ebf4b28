"""Tag a Ray Data dataset: `RayTagger` is the callable class for `Dataset.map_batches`
(one engine per actor, made when the actor starts), `tag_dataset` the call with its
arguments set. Each batch is a pyarrow table with an image column (bytes or paths); the
result has the label columns of nxtrec.integrations.arrow, row for row.

An actor that dies (killed, out of memory) is restarted by Ray Data and its batch run again
(its default max_restarts and max_task_retries are -1, unlimited), and map_batches output is
kept only for batches that finished: no row is lost and none is written twice."""

from __future__ import annotations

from nxtrec.integrations.arrow import ArrowTagger, TaggerConfig


class RayTagger:
    """`ds.map_batches(RayTagger, fn_constructor_kwargs={...}, batch_format="pyarrow",
    compute=ActorPoolStrategy(size=N))`; the keyword arguments are those of `TaggerConfig` (model, onnx,
    image_column, id_column, device, dtype, threads, batch_size, max_labels) plus the
    decoding options (top_k, min_prob, vocab, ...)."""

    def __init__(self, **kwargs):
        self.tagger = ArrowTagger(TaggerConfig.of(**kwargs))

    def __call__(self, batch):
        return self.tagger.tag_table(batch)


def tag_dataset(dataset, *, concurrency: int = 1, num_cpus: float = 1, num_gpus: float = 0,
                batch_size: int = 32, **kwargs):  # fmt: skip
    """`dataset` with the label columns, from `concurrency` actors of `num_cpus` CPUs and
    `num_gpus` GPUs each (with a GPU the PyTorch engine runs on it). `kwargs`: as RayTagger."""
    from ray.data import ActorPoolStrategy

    TaggerConfig.of(**kwargs).decode_options()  # a bad option fails here, not in every actor
    return dataset.map_batches(
        RayTagger, fn_constructor_kwargs={"batch_size": batch_size, **kwargs}, batch_size=batch_size,
        batch_format="pyarrow", compute=ActorPoolStrategy(size=concurrency), num_cpus=num_cpus, num_gpus=num_gpus,
    )  # fmt: skip
