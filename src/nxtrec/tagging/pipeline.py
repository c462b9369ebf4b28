"""From batches of decoded images to per-image results: the core shared by `nxtrec tag` and
`tag_images`, for any engine (torch-free itself; the model is behind `predict_batch`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

from nxtrec.inference.engine import DecodeOptions, Engine
from nxtrec.inference.ranking import Label, keep_labels, rounded
from nxtrec.tagging.decode import image_name
from nxtrec.tagging.inputs import InputItem
from nxtrec.tagging.prefetch import BatchDecoder, DecodedBatch, prefetched_batches

# tag_images starts fresh loader workers for every this many images of its iterable.
CHUNK_IMAGES = 1024


@dataclass
class TagResult:
    id: str
    labels: list[Label] | None  # None when the image failed
    width: int = 0
    height: int = 0
    error: str | None = None

    def to_record(self) -> dict:
        labels = [{"label": lab.label, "prob": rounded(lab.prob)} for lab in self.labels]
        for record, lab in zip(labels, self.labels):
            if lab.confidence is not None:  # the model has a calibration (nxtrec.inference.calibration)
                record["confidence"] = rounded(lab.confidence)
            if lab.map is not None:  # `nxtrec tag --maps`: the grid over the image patches
                record["map"] = lab.to_dict()["map"]
        return {"id": self.id, "labels": labels, "width": self.width, "height": self.height}


def batch_ranges(start: int, end: int, batch_size: int) -> list[range]:
    return [range(b, min(b + batch_size, end)) for b in range(start, end, batch_size)]


def tag_batches(
    predict_batch: Callable, items: Sequence[InputItem], batches: Iterable[DecodedBatch],
    max_labels: int | None = None,
) -> Iterator[TagResult]:  # fmt: skip
    """One result per input, in input order; `predict_batch(pixels)` gives ranked labels
    (already above `min_prob`, a `DecodeOptions` field), at most `max_labels` kept."""
    for batch in batches:
        labels = iter(predict_batch(batch.pixels) if batch.pixels is not None else [])
        for d in batch.items:
            name = items[d.index].id
            if d.error is not None:
                yield TagResult(name, None, error=d.error)
            else:
                yield TagResult(name, keep_labels(next(labels), max_labels=max_labels), d.width, d.height)


def tag_images(
    engine: Engine, images: Iterable, top_k: int = 10, batch_size: int = 8, num_workers: int = 2,
    min_prob: float = 0.0, max_labels: int | None = None, **options,
) -> Iterator[TagResult]:  # fmt: skip
    """A `TagResult(id, labels, width, height, error)` per image of any iterable (paths, bytes,
    PIL images), in order, as batches finish: images are decoded in `num_workers` processes
    while the engine runs, read lazily in chunks, and a bad image gives `error` instead of
    raising. Ids are the paths, or positions for bytes and PIL images. Keyword arguments are
    `DecodeOptions`."""
    decode_options = DecodeOptions.of(top_k=top_k, min_prob=min_prob, **options)

    def predict(pixels):
        return engine.predict_batch(pixels, decode_options)

    images, offset = iter(images), 0
    while chunk := list(islice(images, CHUNK_IMAGES)):
        items = [InputItem(image_name(im, offset + i), im) for i, im in enumerate(chunk)]
        decoder = BatchDecoder(items, batch_ranges(0, len(items), batch_size), engine.preprocessing)
        yield from tag_batches(predict, items, prefetched_batches(decoder, num_workers), max_labels)
        offset += len(chunk)
