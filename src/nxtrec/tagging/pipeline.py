"""From batches of decoded images to per-image results: the core shared by `nxtrec tag` and
`Recognizer.tag` (torch-free itself; the model is behind `predict_batch`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice

from nxtrec.inference.ranking import Label, keep_labels
from nxtrec.tagging.decode import Preprocess, image_name
from nxtrec.tagging.inputs import InputItem
from nxtrec.tagging.prefetch import Batch, BatchDecoder, prefetched_batches

# Recognizer.tag starts fresh loader workers for every this many images of its iterable.
CHUNK_IMAGES = 1024


@dataclass
class TagResult:
    id: str
    labels: list[Label] | None  # None when the image failed
    width: int = 0
    height: int = 0
    error: str | None = None

    def to_record(self) -> dict:
        labels = [{"label": lab.label, "prob": lab.prob} for lab in self.labels]
        for record, lab in zip(labels, self.labels):
            if lab.map is not None:  # `nxtrec tag --maps`: the grid over the image patches
                record["map"] = lab.to_dict()["map"]
        return {"id": self.id, "labels": labels, "width": self.width, "height": self.height}


def batch_ranges(start: int, end: int, batch_size: int) -> list[range]:
    return [range(b, min(b + batch_size, end)) for b in range(start, end, batch_size)]


def tag_batches(
    predict_batch: Callable, items: Sequence[InputItem], batches: Iterable[Batch],
    min_prob: float = 0.0, max_labels: int | None = None,
) -> Iterator[TagResult]:  # fmt: skip
    """One result per input, in input order; `predict_batch(pixels)` gives ranked labels."""
    for batch in batches:
        labels = iter(predict_batch(batch.pixels) if batch.pixels is not None else [])
        for d in batch.items:
            name = items[d.index].id
            if d.error is not None:
                yield TagResult(name, None, error=d.error)
            else:
                yield TagResult(name, keep_labels(next(labels), min_prob, max_labels), d.width, d.height)


def tag_images(
    recognizer, images: Iterable, top_k: int = 10, batch_size: int = 8, num_workers: int = 2,
    min_prob: float = 0.0, max_labels: int | None = None, **kwargs,
) -> Iterator[TagResult]:  # fmt: skip
    """`Recognizer.tag`: results for any iterable of images (paths, bytes, PIL images), read
    lazily in chunks; ids are the paths, or positions for bytes and PIL images."""
    cfg = recognizer.config
    prep = Preprocess(cfg.encoder.image_size, cfg.image_mean, cfg.image_std)

    def predict(pixels):
        return recognizer.predict_batch(pixels, top_k=top_k, **kwargs)

    images, offset = iter(images), 0
    while chunk := list(islice(images, CHUNK_IMAGES)):
        items = [InputItem(image_name(im, offset + i), im) for i, im in enumerate(chunk)]
        decoder = BatchDecoder(items, batch_ranges(0, len(items), batch_size), prep)
        batches = prefetched_batches(decoder, num_workers, as_tensor=True)
        yield from tag_batches(predict, items, batches, min_prob, max_labels)
        offset += len(chunk)
