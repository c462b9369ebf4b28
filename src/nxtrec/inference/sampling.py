"""Turning the decoder's next-token distributions into ranked labels (docs/design.md#one-shot-sampling).

- `one_shot`: the paper's one-shot sampling. The prompt prefix runs once; the top-k tokens
  after the last prompt token start k branches that continue greedily until each emits the
  delimiter. Branches share the prefix's cached keys/values, and a finished branch is no
  longer computed.
- `one_shot_no_cache`: the reference implementation's algorithm (the whole sequence of every
  branch is re-run at every step), kept as the baseline that benchmarks and tests compare to.
- `greedy` (top-k / top-p, temperature, repetition penalty) and `beam_search`: one sequence
  per image, split into labels at the delimiter; a label's probability is the product of its
  tokens' probabilities (delimiter included), a label written twice counts once.
Ranking the branches into labels is in `nxtrec.ranking` (shared with the ONNX path).
"""

from __future__ import annotations

import math

import torch

from nxtrec.inference.branches import OpenBranches
from nxtrec.inference.constrained import TorchTrieWalk
from nxtrec.inference.ranking import MAX_LABEL_TOKENS, Branch, to_branches
from nxtrec.model.decoder import BranchRows
from nxtrec.model.masks import inference_mask
from nxtrec.model.network import NxtpModel

# ---------------------------------------------------------------------------------------
# prefix
# ---------------------------------------------------------------------------------------


def prefill(model: NxtpModel, image_tokens: torch.Tensor, prompt_ids: torch.Tensor):
    """Run `[image tokens][<|image|>][<s>][prompt]` once. Returns the next-token logits after
    the last prompt token [B, vocab], the per-layer keys/values and the prefix length."""
    h = model.prefix_embeddings(image_tokens, prompt_ids)
    mask = inference_mask(h.shape[1], image_tokens.shape[1], device=h.device, dtype=h.dtype)
    logits, kvs = model.language_decoder(h, mask, last_only=True)
    return logits, kvs, h.shape[1]


def _select_rows(kvs, rows: torch.Tensor):
    return [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kvs]


# ---------------------------------------------------------------------------------------
# one-shot sampling
# ---------------------------------------------------------------------------------------


def _first_tokens(logits: torch.Tensor, k: int):
    if k > logits.shape[-1]:
        raise ValueError(f"k={k} is larger than the vocabulary ({logits.shape[-1]})")
    top_p, top_i = logits.float().softmax(-1).topk(k, dim=-1)
    return top_p.reshape(-1).tolist(), top_i.reshape(-1)


@torch.inference_mode()
def one_shot(
    model: NxtpModel,
    image_tokens: torch.Tensor,
    prompt_ids: torch.Tensor,
    k: int,
    delimiter_id: int,
    max_label_tokens: int = MAX_LABEL_TOKENS,
    steps: int | None = None,
    prefix=None,
    recorder=None,
    vocab=None,
) -> list[list[Branch]]:
    """k branches per image. `steps` (benchmarks) fixes the number of greedy steps after the
    first top-k step and keeps every branch running, as the reference does. `prefix` is the
    result of `prefill` when the caller ran it already. `recorder` (nxtrec.inference.attention)
    is told after each step which branches its rows were. `vocab` (a `VocabTrie`) restricts
    the branches to the forms of a tag list (nxtrec.inference.vocab)."""
    dec = model.language_decoder
    logits, prefix_kvs, prefix_len = prefix or prefill(model, image_tokens, prompt_ids)
    walk = None if vocab is None else TorchTrieWalk(vocab)
    first_p, tokens = _first_tokens(logits, k) if walk is None else walk.first(logits, k)
    book = OpenBranches(tokens.tolist(), first_p, k, delimiter_id, max_label_tokens, steps)
    if len(book.active) < tokens.shape[0]:
        tokens = tokens[book.active]
    own_kvs = None
    for step in range(book.steps):
        if not book.active:
            break
        rows = BranchRows.of(book.owners(), image_tokens.shape[0], tokens.device)
        logits, own_kvs = dec.step(tokens, prefix_len + step, prefix_kvs, rows, own_kvs)
        if recorder is not None:
            recorder.end_step(book.active)
        p, nxt = logits.float().softmax(-1).max(-1) if walk is None else walk.step(logits, book.active)
        keep = book.advance(nxt.tolist(), p.tolist())
        if keep is not None:
            rows_kept = torch.tensor(keep, dtype=torch.long, device=nxt.device)
            own_kvs = _select_rows(own_kvs, rows_kept)
            nxt = nxt[rows_kept]
        tokens = nxt
    return book.result()


@torch.inference_mode()
def one_shot_no_cache(
    model: NxtpModel,
    image_tokens: torch.Tensor,
    prompt_ids: torch.Tensor,
    k: int,
    delimiter_id: int,
    max_label_tokens: int = MAX_LABEL_TOKENS,
    steps: int | None = None,
    prefix_logits: torch.Tensor | None = None,
) -> list[list[Branch]]:
    """The reference's algorithm: every step re-runs the whole sequence of all k branches
    (no cache, finished branches still computed). Same results as `one_shot`, much slower.
    `prefix_logits`: the prefix's next-token logits when the caller computed them already."""
    dec = model.language_decoder
    x = model.prefix_embeddings(image_tokens, prompt_ids)
    num_image_tokens = image_tokens.shape[1]
    logits = prefix_logits
    if logits is None:
        logits, _ = dec(x, inference_mask(x.shape[1], num_image_tokens, x.device, x.dtype), last_only=True)
    first_p, tokens = _first_tokens(logits, k)
    seqs = [[t] for t in tokens.tolist()]
    probs = [[p] for p in first_p]
    x = x.repeat_interleave(k, dim=0)
    open_branches = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    n_steps = max_label_tokens - 1 if steps is None else steps
    for _ in range(n_steps):
        x = torch.cat([x, dec.embed(tokens)[:, None, :].to(x.dtype)], dim=1)
        logits, _ = dec(x, inference_mask(x.shape[1], num_image_tokens, x.device, x.dtype), last_only=True)
        p, tokens = logits.float().softmax(-1).max(-1)
        for branch, (t, pt) in enumerate(zip(tokens.tolist(), p.tolist())):
            seqs[branch].append(t)
            probs[branch].append(pt)
        open_branches &= tokens != delimiter_id
        if steps is None and not open_branches.any():
            break
    return to_branches(seqs, probs, k, delimiter_id)


# ---------------------------------------------------------------------------------------
# greedy / sampling and beam search: one sequence per image
# ---------------------------------------------------------------------------------------


def filter_logits(logits, temperature, top_k, top_p):
    """Temperature, then top-k and nucleus (top-p) filtering: filtered entries become -inf."""
    logits = logits / max(temperature, 1e-6)
    if top_k and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


def _penalise(logits, history, penalty):
    """CTRL repetition penalty: shrink the logits of tokens already generated."""
    if penalty == 1.0 or not history:
        return logits
    seen = torch.tensor(history, device=logits.device).T  # [N, t]
    picked = logits.gather(-1, seen)
    return logits.scatter(-1, seen, torch.where(picked > 0, picked / penalty, picked * penalty))


@torch.inference_mode()
def greedy(
    model: NxtpModel,
    image_tokens: torch.Tensor,
    prompt_ids: torch.Tensor,
    eos_id: int,
    delimiter_id: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 1,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[Branch]]:
    """One sequence per image: top_k=1 is plain greedy (argmax); otherwise sample from the
    top-k / nucleus-filtered, temperature-scaled distribution."""
    dec = model.language_decoder
    logits, prefix_kvs, prefix_len = prefill(model, image_tokens, prompt_ids)
    b = logits.shape[0]
    rows = BranchRows.of(list(range(b)), b)
    history: list[list[int]] = []  # [t][N]
    token_probs: list[list[float]] = []
    own_kvs = None
    for step in range(max_new_tokens):
        logits = _penalise(logits.float(), history, repetition_penalty)
        dist = logits.softmax(-1)
        if top_k == 1 and top_p is None:
            nxt = dist.argmax(-1)
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(filtered, 1, generator=generator)[:, 0]
        history.append(nxt.tolist())
        token_probs.append(dist.gather(-1, nxt[:, None])[:, 0].tolist())
        if all(eos_id in col for col in zip(*history)):
            break
        logits, own_kvs = dec.step(nxt, prefix_len + step, prefix_kvs, rows, own_kvs)
    seqs = [list(col) for col in zip(*history)]
    probs = [list(col) for col in zip(*token_probs)]
    return [_split_labels(s, p, eos_id, delimiter_id) for s, p in zip(seqs, probs)]


@torch.inference_mode()
def beam_search(
    model: NxtpModel,
    image_tokens: torch.Tensor,
    prompt_ids: torch.Tensor,
    eos_id: int,
    delimiter_id: int,
    beam_size: int = 3,
    max_new_tokens: int = 64,
    length_penalty: float | None = None,
    regather: bool = True,
    length_offset: int = 0,
) -> list[list[Branch]]:
    """Beam search over whole answers (labels joined by delimiters, ended by EOS); the best
    finished sequence per image (log-prob / length, or the GNMT penalty) is split into labels.
    `regather=False` and `length_offset` reproduce the reference (nxtrec.inference.compat)."""
    dec = model.language_decoder
    logits, prefix_kvs, prefix_len = prefill(model, image_tokens, prompt_ids)
    b = logits.shape[0]
    logp = logits.float().log_softmax(-1)
    top_lp, top_i = logp.topk(beam_size, dim=-1)
    beams = [[([t], [lp]) for t, lp in zip(top_i[i].tolist(), top_lp[i].tolist())] for i in range(b)]
    finished: list[list[tuple[list[int], list[float]]]] = [[] for _ in range(b)]
    owner = [i for i in range(b) for _ in range(beam_size)]
    branch_rows = BranchRows.of(owner, b)
    own_kvs = None

    def score(lps):
        n = len(lps) + length_offset
        return sum(lps) / (n if length_penalty is None else ((5 + n) / 6) ** length_penalty)

    for step in range(max_new_tokens):
        rows = [beam for img in beams for beam in img]
        for img in range(b):  # beams that just produced EOS
            for seq, lps in beams[img]:
                if seq[-1] == eos_id:
                    finished[img].append((seq, lps))
        if all(len(f) >= beam_size for f in finished) or step == max_new_tokens - 1:
            break
        last = torch.tensor([seq[-1] for seq, _ in rows], device=logits.device)
        logits, own_kvs = dec.step(last, prefix_len + step, prefix_kvs, branch_rows, own_kvs)
        beams, sources = _extend_beams(logits, rows, beam_size, eos_id, b)
        if regather:
            own_kvs = _select_rows(own_kvs, torch.tensor(sources, device=logits.device))
    out = []
    for img in range(b):
        pool = finished[img] or beams[img]
        seq, lps = max(pool, key=lambda sl: score(sl[1]))
        out.append(_split_labels(seq, [math.exp(x) for x in lps], eos_id, delimiter_id))
    return out


def _extend_beams(logits: torch.Tensor, rows: list, beam_size: int, eos_id: int, images: int):
    """Each image's `beam_size` best extensions of its unfinished beams (a beam row per
    entry of `rows`), and the row each came from."""
    cand_lp, cand_i = logits.float().log_softmax(-1).topk(beam_size + 1, dim=-1)
    new_beams, sources = [], []
    for img in range(images):
        cands = []
        for j in range(beam_size):
            row = img * beam_size + j
            seq, lps = rows[row]
            if seq[-1] == eos_id:
                continue
            for lp, t in zip(cand_lp[row].tolist(), cand_i[row].tolist()):
                cands.append((sum(lps) + lp, row, seq + [t], lps + [lp]))
        cands.sort(key=lambda c: c[0], reverse=True)
        chosen = cands[:beam_size]
        while len(chosen) < beam_size:  # keep the row count fixed
            chosen.append(chosen[-1])
        new_beams.append([(c[2], c[3]) for c in chosen])
        sources += [c[1] for c in chosen]
    return new_beams, sources


def _split_labels(seq, probs, eos_id, delimiter_id) -> list[Branch]:
    """Cut one answer sequence into labels at the delimiter (its probability included); the
    last label ends at EOS. A label still unfinished when the answer ran out of tokens (no
    delimiter, no EOS: e.g. "sn" of "snake") is dropped. The labels are marked as one
    answer's (`Branch.from_answer`): a repeated label is ranked once, not summed."""
    out, toks, ps = [], [], []
    for t, p in zip(seq, probs):
        if t == eos_id:
            if toks:
                out.append(Branch(toks, ps, from_answer=True))
            return out
        ps.append(p)
        if t == delimiter_id:
            out.append(Branch(toks, ps, from_answer=True))
            toks, ps = [], []
        else:
            toks.append(t)
    return out
