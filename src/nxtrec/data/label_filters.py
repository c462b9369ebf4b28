"""Tagged nouns that are not labels, dropped in the default mode only (`compat=True` keeps the
reference's behaviour; the noise words of docs/design.md#labels-from-captions apply in both modes).

Each rule looks at the words around a noun, so a word is dropped where it frames, counts or
colours something and kept where it is a thing:
- a framing or counting noun before "of": "a photo of a cat", "a couple of giraffes", "the
  side of the road" (but "a picture on the wall" keeps its picture);
- the photograph itself: "in this picture we can see...", "taking a picture", "posing for the
  camera" (but "a man holding a camera" keeps it);
- colour words the small spaCy model tags as nouns, before the noun they colour: "a silver
  car", "a neon sign" (but "a bowl of olives" keeps them);
- words that are never object names yet get noun tags: "parked parallel to", "one with".

On 50 hand-annotated COCO captions (tests/data/coco_captions_50.json, docs/data.md) these
rules raise the spaCy backend's precision without losing recall.
"""

from __future__ import annotations

from collections.abc import Sequence

FRAME_NOUNS = frozenset((
    "picture", "photo", "photograph", "pic", "snapshot", "shot", "closeup", "close-up", "view",
    "couple", "group", "lot", "bunch", "pile", "piece", "pair", "number", "variety", "kind",
    "type", "sort", "side", "middle", "edge",
))  # fmt: skip
PHOTO_NOUNS = frozenset(("picture", "photo", "photograph", "pic", "snapshot", "camera"))
TAKING = frozenset(("take", "takes", "taking", "took", "taken", "snap", "snaps", "snapping"))
POSING = frozenset(("pose", "poses", "posing", "posed", "smile", "smiles", "smiling"))
COLOUR_WORDS = frozenset((
    "silver", "gold", "neon", "maroon", "khaki", "olive", "cream", "ivory", "navy", "lavender",
    "magenta", "turquoise", "aqua", "plaid",
))  # fmt: skip
NEVER_LABELS = frozenset(("parallel", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))
_DETERMINERS = frozenset(("a", "an", "the", "this", "that", "these", "those", "his", "her", "their", "its", "my", "our"))
_NOUN_TAG_PREFIX = "NN"


def not_a_label(tagged: Sequence[tuple[str, str, str]], i: int) -> bool:
    """Whether the noun at `i` of a caption's (word, tag, noun lemma) triples is no label."""
    word, _, lemma = tagged[i]
    if lemma in NEVER_LABELS or word in NEVER_LABELS:
        return True
    following = tagged[i + 1] if i + 1 < len(tagged) else ("", "", "")
    if lemma in FRAME_NOUNS and following[0] == "of":
        return True
    if word in COLOUR_WORDS and following[1].startswith(_NOUN_TAG_PREFIX):
        return True
    if lemma in PHOTO_NOUNS:
        before = _words_before(tagged, i)
        if before[:1] == ["in"] or (before[:1] and before[0] in TAKING):
            return True
        if before[:1] == ["for"] and len(before) > 1 and before[1] in POSING:
            return True
    return False


def _words_before(tagged: Sequence[tuple[str, str, str]], i: int, n: int = 2) -> list[str]:
    """The `n` words before `i`, nearest first, skipping determiners ("in [this] picture")."""
    words = []
    for word, _, _ in reversed(tagged[:i]):
        if word not in _DETERMINERS:
            words.append(word)
            if len(words) == n:
                break
    return words
