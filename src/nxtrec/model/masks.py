"""Additive attention masks (docs/design.md#attention-masks): the inference mask and the decoupled-label
training mask."""

from __future__ import annotations

import torch


def inference_mask(seq_len: int, num_image_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Additive [S, S]: causal, plus full attention among the image tokens [0, P)."""
    i = torch.arange(seq_len, device=device)
    allowed = (i[None, :] <= i[:, None]) | ((i[:, None] < num_image_tokens) & (i[None, :] < num_image_tokens))
    return additive(allowed, dtype)


def training_mask(
    tokens: torch.Tensor, answer_index: int, delimiter_id: int, num_image_tokens: int, dtype=torch.float32
) -> torch.Tensor:
    """Decoupled-label mask, additive [B, 1, S, S], built without a loop over delimiters.

    tokens: [B, S] ids in sequence positions (anything for image positions); answer_index:
    position `a` of the last prompt token. Queries see keys <= a (causally, image tokens
    bidirectionally); after `a`, each delimiter-closed segment [a, d1], [d1+1, d2], ... also
    sees its own earlier tokens; tokens after the last delimiter see only keys <= a.
    """
    b, s = tokens.shape
    pos = torch.arange(s, device=tokens.device)
    is_delim = (tokens == delimiter_id) & (pos > answer_index)
    # Segment of a position = number of delimiters strictly before it (after `a`).
    seg = torch.cumsum(is_delim.long(), dim=1) - is_delim.long()
    closed = seg < is_delim.sum(dim=1, keepdim=True)  # a delimiter ends this segment
    in_answer = pos >= answer_index
    q_ok = (closed & in_answer)[:, :, None]
    same_seg = (seg[:, :, None] == seg[:, None, :]) & in_answer[None, None, :]
    causal = pos[None, :] <= pos[:, None]
    image = (pos[:, None] < num_image_tokens) & (pos[None, :] < num_image_tokens)
    prefix_keys = (pos[None, :] <= answer_index) & (causal | image)
    allowed = prefix_keys[None] | (q_ok & same_seg & causal[None])
    return additive(allowed, dtype)[:, None]


def additive(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """A boolean "may attend" tensor as an additive mask: 0 where allowed, -inf elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.tensor(float("-inf"), dtype=dtype, device=allowed.device))
