"""The reference's greedy decoding (`--compat reference`, docs/compat.md), which differs from
`sampling.greedy` in what the model sees, so it runs its own loop: like the reference, every
step re-runs the whole sequence (no cache), because the attention mask of earlier positions
changes as delimiters appear.

- a fixed `max_new_tokens` steps (64 in the reference's evals/eval.py), EOS ignored;
- the inference mask plus the reference's decoupled-label rule (models/lang.py
  `Transformer.forward`, `is_train=False`): from the second delimiter on, every position after
  an earlier delimiter d (not the last one) no longer sees the keys from the last prompt token
  through d;
- the repetition penalty divides every penalised logit, negative ones too (decoding.py
  `GreedyDecoder.update`; the CTRL rule multiplies negative ones);
- labels are split as the reference does (`compat.split_at_delimiters`: the trailing label
  without a delimiter is dropped).
"""

from __future__ import annotations

import torch

from nxtrec.inference.compat import split_at_delimiters
from nxtrec.inference.ranking import Branch
from nxtrec.inference.sampling import filter_logits
from nxtrec.model.masks import additive, inference_mask
from nxtrec.model.network import NxtpModel


def reference_inference_mask(text_ids: torch.Tensor, prompt_len: int, num_image_tokens: int, delimiter_id: int,
                             dtype=torch.float32) -> torch.Tensor:
    """Additive [B, 1, S, S] for sequences `[P image tokens][text_ids]` (text_ids [B, T]: the
    `prompt_len` prompt ids, the last at the answer position, then the generated ids)."""
    b, t = text_ids.shape
    s = num_image_tokens + t
    answer = num_image_tokens + prompt_len - 1
    pos = torch.arange(s, device=text_ids.device)
    is_delim = torch.zeros(b, s, dtype=torch.bool, device=text_ids.device)
    is_delim[:, num_image_tokens:] = text_ids == delimiter_id
    count = is_delim.long().cumsum(1)
    not_last = is_delim & (count < count[:, -1:])
    # before[q]: the last delimiter (the very last one excluded) strictly before q; -1: none.
    marks = torch.where(not_last, pos, -1)
    before = torch.cat([torch.full_like(marks[:, :1], -1), marks[:, :-1]], 1).cummax(1).values
    blocked = (pos[None, None, :] >= answer) & (pos[None, None, :] <= before[:, :, None])
    allowed = (inference_mask(s, num_image_tokens, text_ids.device) == 0)[None] & ~blocked
    return additive(allowed, dtype)[:, None]


def _penalise_as_reference(logits: torch.Tensor, history: list[torch.Tensor], penalty: float) -> torch.Tensor:
    """Divide the logits of every token generated so far by `penalty` (once per token)."""
    if penalty == 1.0 or not history:
        return logits
    seen = torch.stack(history, 1)
    return logits.scatter(-1, seen, logits.gather(-1, seen) / penalty)


@torch.inference_mode()
def greedy_as_reference(
    model: NxtpModel,
    image_tokens: torch.Tensor,
    prompt_ids: torch.Tensor,
    delimiter_id: int,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 1,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[Branch]]:
    """`sampling.greedy`'s token choice (argmax, or top-k / top-p sampling) in the reference's
    loop; see the module docstring for what differs."""
    dec = model.language_decoder
    x = model.prefix_embeddings(image_tokens, prompt_ids)
    b, p_len = x.shape[0], len(prompt_ids)
    num_image_tokens = image_tokens.shape[1]
    history: list[torch.Tensor] = []
    token_probs: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        text = torch.cat([prompt_ids.to(x.device).expand(b, -1), *[h[:, None] for h in history]], 1)
        mask = reference_inference_mask(text, p_len, num_image_tokens, delimiter_id, x.dtype)
        logits, _ = dec(x, mask, last_only=True)
        logits = _penalise_as_reference(logits.float(), history, repetition_penalty)
        dist = logits.softmax(-1)
        if top_k == 1 and top_p is None:
            nxt = dist.argmax(-1)
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(filtered, 1, generator=generator)[:, 0]
        history.append(nxt)
        token_probs.append(dist.gather(-1, nxt[:, None])[:, 0])
        x = torch.cat([x, dec.embed(nxt)[:, None, :].to(x.dtype)], dim=1)
    seqs = torch.stack(history, 1).tolist()
    probs = torch.stack(token_probs, 1).tolist()
    return [split_at_delimiters(s, p, delimiter_id) for s, p in zip(seqs, probs)]
