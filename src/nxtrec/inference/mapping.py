"""`--map-to FILE --map-threshold T`: decode freely, then map each label to the nearest entry
of a tag list by MiniLM cosine similarity (the metric's embedder, every form of every entry
embedded once); labels below the threshold are dropped and the probabilities of the labels
mapped to the same entry are summed. The alternative to `--vocab` (nxtrec.inference.vocab),
which restricts decoding itself."""

from __future__ import annotations

import functools

from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import Label, merge_maps
from nxtrec.inference.vocab import LabelList, as_label_list

DEFAULT_MAP_THRESHOLD = 0.5


class LabelMapper:
    def __init__(self, labels: LabelList, threshold: float = DEFAULT_MAP_THRESHOLD, embedder=None):
        if not -1.0 <= threshold <= 1.0:
            raise NxtrecError(f"--map-threshold {threshold}: a cosine similarity in [-1, 1] is expected")
        if embedder is None:
            from nxtrec.model.embedders import MiniLMEmbedder

            embedder = MiniLMEmbedder()
        self.labels = labels
        self.threshold = threshold
        self.embedder = embedder
        self.form_entry = [i for i, forms in enumerate(labels.entries) for _ in forms]
        self.form_vectors = embedder.embed([f for forms in labels.entries for f in forms])

    def map(self, labels: list[Label], top_k: int | None = None) -> list[Label]:
        """Entries for one image's labels, most probable first; `score` is the best similarity
        of a label mapped to the entry."""
        if not labels:
            return []
        sims = self.embedder.embed([lab.label for lab in labels]) @ self.form_vectors.T
        best_sim, best_form = sims.max(dim=1)
        totals: dict[str, Label] = {}
        mapped: dict[str, list[Label]] = {}
        for lab, sim, form in zip(labels, best_sim.tolist(), best_form.tolist()):
            if sim < self.threshold:
                continue
            name = self.labels.names[self.form_entry[form]]
            entry = totals.setdefault(name, Label(name, 0.0, sim))
            entry.prob += lab.prob
            entry.score = max(entry.score, sim)
            mapped.setdefault(name, []).append(lab)
        for name, entry in totals.items():  # grounding maps, when asked for, follow their labels
            entry.map = merge_maps([lab.prob for lab in mapped[name]], [lab.map for lab in mapped[name]])
        out = sorted(totals.values(), key=lambda l: l.prob, reverse=True)
        return out[:top_k] if top_k else out


def mapper_for(map_to, threshold: float = DEFAULT_MAP_THRESHOLD) -> LabelMapper | None:
    """A `LabelMapper` for a tag list (path, lines or `LabelList`), built once per list."""
    if map_to is None or isinstance(map_to, LabelMapper):
        return map_to
    key = tuple(map_to) if isinstance(map_to, list) else map_to
    return _cached_mapper(key, threshold)


@functools.lru_cache(maxsize=2)
def _cached_mapper(key, threshold: float) -> LabelMapper:
    return LabelMapper(as_label_list(key), threshold)
