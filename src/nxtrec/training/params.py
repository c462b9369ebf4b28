"""Which parameters train: name patterns with block slices, weight-decay groups, and the
rows of the token embedding that get gradients."""

from __future__ import annotations

import re
from dataclasses import dataclass

from nxtrec.model.network import NxtpModel
from nxtrec.training.config import TrainConfig, TrainConfigError

_SLICE = re.compile(r"\{(-?\d*)(?::(-?\d*))?\}")


def _compile_pattern(pattern: str):
    """`*` matches anything; `{a:b}` a block index within the slice a:b of its block list;
    `{i}` one index (negative from the end). Returns (regex, slices per capture group)."""
    parts, slices, pos = [], [], 0
    for m in _SLICE.finditer(pattern):
        parts.append(re.escape(pattern[pos : m.start()]).replace(r"\*", ".*"))
        parts.append(r"(\d+)")
        lo, hi = m.group(1), m.group(2)
        if m.group(0).count(":"):
            slices.append(slice(int(lo) if lo else None, int(hi) if hi else None))
        else:
            if not lo:
                raise TrainConfigError(f"parameter pattern {pattern!r}: empty index {{}}")
            slices.append(int(lo))
        pos = m.end()
    parts.append(re.escape(pattern[pos:]).replace(r"\*", ".*"))
    return re.compile("".join(parts)), slices


def _block_counts(names) -> dict[str, int]:
    """For every numbered container (`...resblocks.`), how many blocks it holds."""
    counts: dict[str, set] = {}
    for n in names:
        for m in re.finditer(r"\.(\d+)(?=\.)", n):
            counts.setdefault(n[: m.start() + 1], set()).add(int(m.group(1)))
    return {k: max(v) + 1 for k, v in counts.items()}


def match_params(names: list[str], patterns: list[str], what: str) -> set[str]:
    """Names matched by any pattern; a pattern that matches nothing is an error."""
    counts = _block_counts(names)
    out: set[str] = set()
    for pattern in patterns:
        regex, slices = _compile_pattern(pattern)
        hit = False
        for n in names:
            m = regex.fullmatch(n)
            if not m:
                continue
            ok = True
            for g, sel in enumerate(slices, start=1):
                size = counts.get(n[: m.start(g)], 0)
                idx = int(m.group(g))
                allowed = range(size)[sel] if isinstance(sel, slice) else [range(size)[sel]] if -size <= sel < size else []
                ok = ok and idx in allowed
            if ok:
                out.add(n)
                hit = True
        if not hit:
            raise TrainConfigError(f"{what}: pattern {pattern!r} matches no parameter of this model")
    return out


@dataclass
class ParamPlan:
    trainable: list[str]
    decay: list[str]
    no_decay: list[str]
    embedding_rows: list[int] | None  # None: every row of tok_embeddings learns


def plan_parameters(model: NxtpModel, cfg: TrainConfig, tokenizer) -> ParamPlan:
    names = [n for n, _ in model.named_parameters()]
    trainable = match_params(names, cfg.params.trainable, "params.trainable")
    if cfg.params.frozen:
        trainable -= match_params(names, cfg.params.frozen, "params.frozen")
    if not trainable:
        raise TrainConfigError("params: no parameter is trainable")
    shapes = dict(model.named_parameters())
    no_decay = match_params(names, cfg.optim.no_decay, "optim.no_decay") if cfg.optim.no_decay else set()
    also = match_params(names, cfg.optim.decay_also, "optim.decay_also") if cfg.optim.decay_also else set()
    ordered = [n for n in names if n in trainable]
    decay = [n for n in ordered if (shapes[n].ndim >= 2 and n not in no_decay) or n in also]
    rest = [n for n in ordered if n not in set(decay)]
    rows = None
    if "*" not in cfg.params.embedding_rows:
        rows = []
        for tok in cfg.params.embedding_rows:
            if tok in tokenizer.special_ids:
                rows.append(tokenizer.special_ids[tok])
            else:
                i = tokenizer.sp.piece_to_id(tok)
                if i == tokenizer.sp.unk_id() and tok != tokenizer.sp.id_to_piece(i):
                    raise TrainConfigError(f"params.embedding_rows: {tok!r} is not a token of this tokenizer")
                rows.append(i)
    return ParamPlan(ordered, decay, rest, rows)
