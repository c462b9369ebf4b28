"""Rules on the labels a user sees (`--exclude FILE`, `--replace FILE`), applied by
`nxtrec.inference.engine.finish_labels` for both engines and every command (torch-free).

- exclude: a tag list (`nxtrec.inference.vocab.LabelList`: one entry per line, synonyms
  separated by `|`, `#` comments); a label equal to any form is dropped.
- replace: one rule per line, `from -> to`; `from` may list synonyms (`kitten | kitty -> cat`).
  Rules apply once to the model's label (`a -> b` and `b -> c` turn a into b, not c).

Labels are compared after normalisation (case folded, runs of white space as one space, ends
stripped). A label is dropped when its own name or its replacement is excluded. Labels that end
up with the same name merge into one, in the place of the best-ranked one, with its score:
one-shot labels come from alternative branches, so their probabilities are summed (as the
branches of one label are; capped at 1); the labels of one greedy or beam answer are not
alternatives, so the highest probability is kept (as a repeated label keeps one occurrence).
Grounding maps merge weighted by probability; a list ranked by probability is sorted again.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import Label, merge_maps
from nxtrec.inference.vocab import LabelList, VocabError, as_label_list

ARROW = "->"
RULE_HELP = "one rule per line: `from -> to`, or `a | b -> to` for synonyms; `#` comments"


class LabelRulesError(NxtrecError, ValueError):
    pass


def normalize(label: str) -> str:
    """How labels and rules are compared: case folded, white space collapsed."""
    return " ".join(label.split()).casefold()


@dataclass(frozen=True)
class ReplaceRules:
    """`from -> to` rules: (normalised from, to as written), in file order."""

    rules: tuple[tuple[str, str], ...]
    source: str = "<rules>"

    @classmethod
    def from_lines(cls, lines, source: str = "<rules>") -> ReplaceRules:
        targets: dict[str, str] = {}
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            left, arrow, right = line.partition(ARROW)
            right = right.strip()
            forms = [normalize(f) for f in left.split("|") if f.strip()]
            if not arrow or ARROW in right or not forms or not right or "|" in right:
                raise LabelRulesError(f"{source}:{n}: {line!r} is not a rule ({RULE_HELP})")
            for form in forms:
                if targets.setdefault(form, right) != right:
                    raise LabelRulesError(f"{source}:{n}: {form!r} is already replaced by {targets[form]!r}")
        if not targets:
            raise LabelRulesError(f"{source}: no replace rules ({RULE_HELP})")
        return cls(tuple(targets.items()), source)

    @classmethod
    def load(cls, path: str | Path) -> ReplaceRules:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise LabelRulesError(f"{path}: replace rules not found ({RULE_HELP})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise LabelRulesError(f"{path}: cannot read the replace rules ({e})") from None
        return cls.from_lines(text.splitlines(), str(path))


def as_replace_rules(replace) -> ReplaceRules:
    """`ReplaceRules` from a path, lines (`"from -> to"`), a {from: to} mapping or `ReplaceRules`."""
    if isinstance(replace, ReplaceRules):
        return replace
    if isinstance(replace, (str, Path)):
        return ReplaceRules.load(replace)
    if isinstance(replace, Mapping):
        return ReplaceRules.from_lines([f"{k} {ARROW} {v}" for k, v in replace.items()])
    return ReplaceRules.from_lines(list(replace))


def as_exclude_list(exclude) -> LabelList:
    """The excluded labels from a path, lines or a `LabelList` (the tag-list format)."""
    try:
        return as_label_list(exclude)
    except VocabError as e:
        raise LabelRulesError(f"exclude list: {e}") from None


class LabelRules:
    """Both rules, ready to apply to ranked labels."""

    def __init__(self, exclude: LabelList | None = None, replace: ReplaceRules | None = None):
        forms = exclude.entries if exclude is not None else ()
        self.excluded = frozenset(normalize(f) for entry in forms for f in entry)
        self.targets = dict(replace.rules) if replace is not None else {}

    def apply(self, labels: list[Label], by_prob: bool = True, add: bool = True) -> list[Label]:
        """One image's ranked labels with the rules applied; merged labels take the place of
        their best-ranked one (probabilities summed, or the highest kept unless `add`), and
        `by_prob` sorts the result by probability again."""
        groups: dict[str, list[tuple[str, Label]]] = {}
        for lab in labels:
            key = normalize(lab.label)
            name = self.targets.get(key, lab.label)
            final = normalize(name)
            if key in self.excluded or final in self.excluded:
                continue
            groups.setdefault(final, []).append((name, lab))
        out = [merge_labels(members[0][0], [lab for _, lab in members], add) for members in groups.values()]
        if by_prob:
            out.sort(key=lambda l: l.prob, reverse=True)
        return out


def merge_labels(name: str, labels: list[Label], add: bool = True) -> Label:
    """Labels that name the same thing as one: probabilities summed (at most 1; the highest
    unless `add`), maps merged by probability, the first (best-ranked) label's score."""
    first = labels[0]
    if len(labels) == 1:
        return Label(name, first.prob, first.score, first.map)
    probs = [lab.prob for lab in labels]
    prob = min(1.0, sum(probs)) if add else max(probs)
    return Label(name, prob, first.score, merge_maps(probs, [lab.map for lab in labels]))


def rules_for(exclude=None, replace=None) -> LabelRules | None:
    """The `LabelRules` of `DecodeOptions.exclude` / `.replace` (paths, lines, a mapping or parsed
    values), read once per value; None when neither is set. A bad file raises `LabelRulesError`."""
    if exclude is None and replace is None:
        return None
    if isinstance(replace, Mapping):
        replace = as_replace_rules(replace)
    return _cached_rules(_key(exclude), _key(replace))


def _key(value):
    """A hashable cache key: paths and parsed values as they are, lines as a tuple."""
    if value is None or isinstance(value, (str, Path, LabelList, ReplaceRules)):
        return value
    return tuple(value)


@functools.lru_cache(maxsize=8)
def _cached_rules(exclude, replace) -> LabelRules:
    return LabelRules(None if exclude is None else as_exclude_list(exclude),
                      None if replace is None else as_replace_rules(replace))  # fmt: skip


__all__ = [
    "LabelRules",
    "LabelRulesError",
    "ReplaceRules",
    "as_exclude_list",
    "as_replace_rules",
    "merge_labels",
    "normalize",
    "rules_for",
]
