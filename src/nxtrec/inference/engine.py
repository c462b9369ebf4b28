"""One interface over the two engines, PyTorch (`nxtrec.inference.recognizer.Recognizer`)
and ONNX Runtime (`nxtrec.onnx.recognizer.OnnxRecognizer`). predict, tag, serve and eval
get one from `nxtrec.engines.load_engine` and use only what is here (torch-free):

- `Engine`: a name, how its images are preprocessed, what it can do, `predict_batch(pixels,
  options)` and `close()`;
- `DecodeOptions`: every decoding choice in one frozen value, whose `check` holds every rule
  about which options go together and what an engine supports;
- `predict` / `predict_files`: the one batching loop (the second one keeps going past bad
  images);
- `finish_labels`: from sampled branches to the labels a user sees (compat, tag list,
  ranking, mapping, exclude/replace rules, min_prob), the same for both engines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import numpy as np

from nxtrec.errors import ArgumentError, NxtrecError
from nxtrec.inference.calibration import add_confidence, check_confidence_options, check_confidence_range
from nxtrec.inference.compat import as_reference, check_compat, rank_ppl_as_reference
from nxtrec.inference.label_rules import rules_for
from nxtrec.inference.mapping import DEFAULT_MAP_THRESHOLD, mapper_for
from nxtrec.inference.ranking import RANKINGS, Branch, Label, keep_labels, rank_labels
from nxtrec.inference.vocab import keep_listed
from nxtrec.model.image import ImageError, ImageInput, load_image, preprocess_array

SAMPLERS = ("one-shot", "greedy", "beam")


@dataclass(frozen=True)
class Preprocessing:
    """How an engine's input images are made: shorter side resized to `size`, centre crop,
    normalised per channel."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def array(self, image, out: np.ndarray | None = None) -> np.ndarray:
        """A decoded RGB image -> [3, size, size] float32."""
        return preprocess_array(image, self.size, self.mean, self.std, out=out)

    def stack(self, images: Sequence[ImageInput]) -> np.ndarray:
        return np.stack([self.array(load_image(im)) for im in images])


@dataclass(frozen=True)
class Capabilities:
    samplers: tuple[str, ...]
    maps: bool  # per-label grounding maps (`Label.map`)
    needs: str  # what to use instead, in messages: "the PyTorch path (--model)"


@dataclass(frozen=True)
class DecodeOptions:
    """What to decode and how (`Recognizer.predict_batch` documents each option)."""

    top_k: int = 10
    extra_k: int = 0
    sampler: str = "one-shot"
    ranking: str = "prob"
    max_label_tokens: int | None = None
    maps: bool = False
    map_rule: str | None = None
    vocab: Any = None  # a tag list to decode into: file path, lines or LabelList
    map_to: Any = None  # a tag list to map free labels to
    map_threshold: float = DEFAULT_MAP_THRESHOLD
    compat: str | None = None
    # greedy and beam samplers (None: the sampler's default)
    temperature: float | None = None
    top_k_tokens: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None
    beam_size: int | None = None
    length_penalty: float | None = None
    # label rules (nxtrec.inference.label_rules), applied before the top_k cut: labels to drop
    # (a tag list: path, lines or LabelList) and `from -> to` renames (path, lines, a mapping
    # or ReplaceRules); labels renamed alike merge
    exclude: Any = None
    replace: Any = None
    min_prob: float = 0.0  # labels below this probability are dropped (after the top_k cut)
    # with a calibration (nxtrec.inference.calibration): labels below this confidence, or below
    # the threshold of the profile (precision, balanced, recall), are dropped after min_prob
    min_confidence: float = 0.0
    profile: str | None = None

    @classmethod
    def of(cls, options: DecodeOptions | None = None, **changes) -> DecodeOptions:
        """`options` with `changes` (keyword arguments of the public API), checked by name."""
        unknown = set(changes) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown decoding option {sorted(unknown)[0]!r}")
        return replace(options or cls(), **changes)

    def sampler_options(self, *names: str) -> dict:
        """The given greedy/beam options that were set."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def check(self, capabilities: Capabilities) -> None:
        """Every rule about options that do not go together, or that an engine lacks."""
        check_count("top_k", self.top_k, 1)
        check_count("extra_k", self.extra_k, 0)
        if not 0.0 <= self.min_prob <= 1.0:
            raise NxtrecError(f"min_prob must be in [0, 1] (got {self.min_prob})")
        rules_for(self.exclude, self.replace)  # a bad rule file fails here, once (cached)
        check_confidence_range(self.min_confidence, self.profile)
        if self.sampler not in SAMPLERS:
            raise NxtrecError(f"unknown sampler {self.sampler!r}; choose from {', '.join(SAMPLERS)}")
        if self.sampler not in capabilities.samplers:
            raise NxtrecError(f"this engine runs {', '.join(capabilities.samplers)} sampling only (not {self.sampler!r}); "
                              f"use {capabilities.needs}")
        if self.ranking not in RANKINGS:
            raise NxtrecError(f"unknown ranking {self.ranking!r}; choose from {', '.join(RANKINGS)}")
        check_compat(self.compat)
        if self.vocab is not None and self.map_to is not None:
            raise NxtrecError("give either --vocab (constrained decoding) or --map-to (map free labels), not both")
        if self.sampler != "one-shot" and (self.vocab is not None or self.maps):
            what = "a tag list (vocab) constrains" if self.vocab is not None else "label maps come from"
            raise NxtrecError(f"{what} one-shot sampling; use sampler 'one-shot', not {self.sampler!r}")
        if self.maps and not capabilities.maps:
            raise NxtrecError(f"label maps (--maps) need {capabilities.needs}")


class Engine(Protocol):
    name: str  # reported as "model" by serve and in tag manifests
    preprocessing: Preprocessing
    capabilities: Capabilities
    vocab_size: int

    def predict_batch(self, pixels, options: DecodeOptions | None = None, **changes) -> list[list[Label]]:
        """Labels for preprocessed images [B, 3, S, S] (numpy float32)."""

    def close(self) -> None: ...


def check_top_k(options: DecodeOptions, vocab_size: int) -> None:
    """top_k + extra_k branches must fit in the vocabulary."""
    if options.top_k + options.extra_k > vocab_size:
        raise NxtrecError(f"--top-k {options.top_k} + --extra-k {options.extra_k} is more than the model's "
                          f"{vocab_size} tokens; use --top-k {vocab_size} or less")


def check_count(name: str, value, least: int) -> None:
    """`value` an integer >= `least`, else an `ArgumentError` (a ValueError; exit 2 on the
    command line) naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ArgumentError(f"{name} must be an integer >= {least} (got {value!r})")


def predict(engine: Engine, images, options: DecodeOptions, batch_size: int = 8) -> list[list[Label]]:
    """Labels for each image (paths, bytes or PIL images), one list per image; a bad image
    raises `ImageError`, a bad argument (top_k < 1, batch_size < 1) a ValueError."""
    check_count("batch_size", batch_size, 1)
    options.check(engine.capabilities)
    if not isinstance(images, (list, tuple)):
        images = [images]
    out: list[list[Label]] = []
    for i in range(0, len(images), max(1, batch_size)):
        out += engine.predict_batch(engine.preprocessing.stack(images[i : i + batch_size]), options)
    return out


def predict_files(engine: Engine, paths: Sequence[str], options: DecodeOptions, batch_size: int = 8,
                  each: Callable | None = None) -> Iterator[tuple[str, list[Label] | None, str | None]]:  # fmt: skip
    """(path, labels, None) or (path, None, why it failed) per image, in order, batch by batch;
    a bad image is skipped and the rest of its batch still runs. `each(path, image, labels)`
    sees every decoded image with its labels (e.g. to draw maps)."""
    for start in range(0, len(paths), max(1, batch_size)):
        good, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(load_image(path))
                good.append(path)
            except ImageError as e:
                yield path, None, str(e)
        if not images:
            continue
        pixels = np.stack([engine.preprocessing.array(im) for im in images])
        for path, image, labels in zip(good, images, engine.predict_batch(pixels, options)):
            if each is not None:
                each(path, image, labels)
            yield path, labels, None


def finish_labels(branches: list[list[Branch]], options: DecodeOptions, decode: Callable, delimiter_id: int,
                  embed_tokens: Callable, image_tokens: Callable | None = None, trie=None,
                  calibration=None) -> list[list[Label]]:  # fmt: skip
    """Sampled branches -> each image's labels: the reference's quirks (compat), then the tag
    list, the ranking, the mapping to a tag list, the exclude/replace rules, the top_k cut and
    min_prob. `image_tokens(i)` gives image i's tokens for the "sim" ranking. With a
    `calibration`, each label gets its confidence, and min_confidence / profile filter."""
    check_confidence_options(options.min_confidence, options.profile, calibration)
    if options.compat:
        branches = as_reference(options.sampler, branches, delimiter_id)
    if trie is not None:
        branches, decode = [keep_listed(b, trie) for b in branches], trie.label
    rules = rules_for(options.exclude, options.replace)
    ranking = options.ranking
    cut = options.top_k if rules is None else None  # with rules: cut once they have run
    if options.compat and ranking == "ppl":
        labels = [rank_ppl_as_reference(br, decode, cut) for br in branches]
    else:
        labels = [rank_labels(br, decode, ranking, cut, embed_tokens=embed_tokens, delimiter_id=delimiter_id,
                              image_tokens=image_tokens(i) if ranking == "sim" else None)
                  for i, br in enumerate(branches)]  # fmt: skip
    mapper = mapper_for(options.map_to, options.map_threshold)
    if mapper is not None:
        labels = [mapper.map(labs, cut) for labs in labels]
    if rules is not None:  # --map-to lists are ordered by probability whatever the ranking
        by_prob = ranking == "prob" or mapper is not None
        add = options.sampler == "one-shot"  # alternative branches add up; one answer's labels do not
        labels = [rules.apply(labs, by_prob, add)[: options.top_k] for labs in labels]
    labels = [keep_labels(labs, options.min_prob) for labs in labels] if options.min_prob > 0 else labels
    return [add_confidence(labs, calibration, options.min_confidence, options.profile) for labs in labels]
