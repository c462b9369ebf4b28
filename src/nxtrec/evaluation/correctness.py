"""When a predicted label counts as right: it names one of the image's ground-truth labels.

- "exact" (the default): the two are equal after normalisation: lower case, spaces and
  hyphens collapsed to one space, a plural ending removed from the last word ("apples" ->
  "apple", "cherries" -> "cherry", "boxes" -> "box"), and the synonyms of a tag list (`--vocab`:
  every form of an entry stands for its first form).
- "semantic": the MiniLM cosine similarity of the two (the paper's metric's embedding) is at
  least `SEMANTIC_THRESHOLD`.

The plural rule is a few lines of suffix rules rather than a lemmatiser: the ground truth
of `nxtrec pack` is lemmatised already (spaCy or NLTK), and the predictions are the model's
own lemma-like labels, so only the common regular plurals need folding, without loading a
language model for every comparison.
"""

from __future__ import annotations

import re

MATCHES = ("exact", "semantic")
# all-MiniLM-L6-v2 cosines (docs/calibration.md): plural forms 0.68-0.90, near synonyms 0.71-0.80
# ("taxi"/"cab", "puppy"/"dog"), neighbouring categories 0.6-0.7 ("cat"/"dog" 0.66, "car"/"truck"
# 0.69), unrelated nouns about 0.3; 0.75 accepts close variants, not neighbours.
SEMANTIC_THRESHOLD = 0.75
_SPACES = re.compile(r"[\s\-_]+")
_KEEP_S = ("ss", "us", "is", "ous")  # "glass", "cactus", "axis": not plurals


def singular(word: str) -> str:
    if len(word) > 3 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith(("ches", "shes", "xes", "sses", "zes")):
        return word[:-2]
    if len(word) > 2 and word.endswith("s") and not word.endswith(_KEEP_S):
        return word[:-1]
    return word


def normalise(label: str, synonyms: dict[str, str] | None = None) -> str:
    """The comparable form of a label (see the module's docstring)."""
    text = _SPACES.sub(" ", label.strip().lower())
    if synonyms and text in synonyms:
        return synonyms[text]
    words = text.split(" ")
    text = " ".join(words[:-1] + [singular(words[-1])])
    return synonyms.get(text, text) if synonyms else text


def synonym_table(vocab) -> dict[str, str]:
    """Every form of a tag list (a `LabelList`) -> its entry's first form, normalised."""
    table: dict[str, str] = {}
    for forms in vocab.entries if vocab is not None else ():
        head = normalise(forms[0])
        for form in forms:
            table[_SPACES.sub(" ", form.strip().lower())] = head
            table[normalise(form)] = head
    return table


def exact_matches(records: list[dict], synonyms: dict[str, str] | None = None) -> list[list[bool]]:
    """For each record {"gt": [...], "pred": [{"label", ...}...]}, whether each prediction is right."""
    out = []
    for r in records:
        truth = {normalise(g, synonyms) for g in r["gt"]}
        out.append([normalise(p["label"], synonyms) in truth for p in r["pred"]])
    return out


def semantic_matches(records: list[dict], embedder, threshold: float = SEMANTIC_THRESHOLD) -> list[list[bool]]:
    """As `exact_matches`, right when the label's embedding is within `threshold` cosine of a
    ground-truth label's (`embedder.embed(texts)`: normalised rows)."""
    out = []
    for r in records:
        if not r["gt"] or not r["pred"]:
            out.append([False] * len(r["pred"]))
            continue
        sims = embedder.embed([p["label"] for p in r["pred"]]) @ embedder.embed(list(r["gt"])).T
        out.append([bool(v >= threshold) for v in sims.max(dim=1).values.tolist()])
    return out


def right_labels(records: list[dict], match: str = "exact", synonyms=None) -> list[list[bool]]:
    """Whether each predicted label of each record is right; `synonyms`: a tag list (path,
    lines or `LabelList`) for "exact"."""
    if match not in MATCHES:
        raise ValueError(f"unknown match {match!r}; choose from {', '.join(MATCHES)}")
    if match == "semantic":
        from nxtrec.model.embedders import build_embedder

        return semantic_matches(records, build_embedder("minilm"))
    from nxtrec.inference.vocab import as_label_list

    return exact_matches(records, synonym_table(as_label_list(synonyms)) if synonyms is not None else None)
