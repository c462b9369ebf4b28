"""`--compat reference`: the reference implementation's observable outputs, deviations included,
for comparisons with published numbers (docs/compat.md lists each one with the reference file
and function). The default decoders (nxtrec.inference.sampling) do the described, correct
thing; this module turns their results into the reference's, or runs the reference's loop
where the deviation changes what the model sees (greedy).

Post-processing shared by all reference samplers (evals/eval.py `post_process`, infer.py):
token and probability lists are walked with `zip(probs, tokens)`, a label is closed at each
delimiter (its probability included) and the tokens after the last delimiter are dropped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable

from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import Branch, Label

COMPAT_MODES = ("reference",)


def check_compat(compat: str | None) -> None:
    if compat is not None and compat not in COMPAT_MODES:
        raise NxtrecError(f"unknown compat mode {compat!r}; choose from {', '.join(COMPAT_MODES)} (or none)")


def split_at_delimiters(tokens: list[int], probs: list[float], delimiter_id: int) -> list[Branch]:
    """The reference's grouping: pairs (prob, token) up to the shorter list, a label per
    delimiter (delimiter probability included), a trailing label without delimiter dropped."""
    out, toks, ps = [], [], []
    for p, t in zip(probs, tokens):
        ps.append(p)
        if t == delimiter_id:
            out.append(Branch(toks, ps))
            toks, ps = [], []
        else:
            toks.append(t)
    return out


def one_shot_as_reference(branches: list[Branch], delimiter_id: int) -> list[Branch]:
    """One image's one-shot branches as the reference reports them (decoding.py
    `OneShotDecoder.finalize`): each branch up to its first delimiter is concatenated with its
    probabilities; a branch stopped by the update cap gets the forced delimiter without a
    probability, so every later probability pairs with the token before it and the image's
    last tokens (its last branch, at least) fall off the end of `zip`."""
    tokens, probs = [], []
    for b in branches:
        tokens += b.tokens + [delimiter_id]
        probs += b.probs  # one per token, plus the delimiter's when it was generated
    return split_at_delimiters(tokens, probs, delimiter_id)


def beam_as_reference(branches: list[Branch]) -> list[Branch]:
    """The reference's beam output: the last label ends with EOS, not a delimiter, so it is
    dropped; probabilities are reported as 0 (evals/eval.py `generate`)."""
    return [Branch(b.tokens, [0.0] * len(b.probs)) for b in branches if len(b.probs) > len(b.tokens)]


def as_reference(sampler: str, branches: list[list[Branch]], delimiter_id: int) -> list[list[Branch]]:
    """Every image's branches as the reference reports them (greedy's own loop already splits
    its labels the reference's way)."""
    if sampler == "one-shot":
        return [one_shot_as_reference(b, delimiter_id) for b in branches]
    if sampler == "beam":
        return [beam_as_reference(b) for b in branches]
    return branches


def geometric_mean(probs: list[float]) -> float:
    if any(p <= 0 for p in probs):
        return 0.0
    return math.exp(sum(math.log(p) for p in probs) / len(probs))


def rank_ppl_as_reference(branches: list[Branch], decode: Callable[[list[int]], str], top_k: int | None) -> list[Label]:
    """The reference's `ppl` ranking (evals/eval.py `post_process`): the score is the geometric
    mean of the token probabilities (`p.log().mean().exp()`, not a perplexity), the lowest over
    a label's branches, sorted ascending, so the least likely label comes first."""
    groups: dict[str, list[Branch]] = defaultdict(list)
    for br in branches:
        groups[decode(br.tokens).replace(",", "")].append(br)
    labels = [Label(name, sum(math.prod(b.probs) for b in brs), min(geometric_mean(b.probs) for b in brs))
              for name, brs in groups.items()]
    labels.sort(key=lambda l: l.score)
    return labels[:top_k] if top_k else labels


def beam_options(prompt_len: int) -> dict:
    """`sampling.beam_search` arguments for the reference's beam search (decoding.py
    `BeamSearchDecoder`): the sequence is not re-gathered by beam source (eval.py `generate`
    keeps appending to the same rows), and length normalisation counts the prompt tokens
    (`max_likelihood_rank` measures whole sequences)."""
    return {"regather": False, "length_offset": prompt_len}
