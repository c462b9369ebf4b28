"""The "logit" map rule: how much each image token adds, directly, to the logit of a label's
first token at the query that chose it (the last prompt position).

At decoder layer l the last prompt position reads image token j through head h with
attention a[l, h, j] and value v[l, h, j]; the layer's output projection W_o turns what it read
into c[l, j] = W_o [a[l, h, j] v[l, h, j]]_h, a term of the residual stream. The final RMS norm
divides the stream by one scalar per image and multiplies it by g per dimension, and the output
layer's row w_t gives token t's logit, so c[l, j] adds (g * w_t) . c[l, j] to it (times the
image's scalar). A label whose first token is t gets the map sum_l (g * w_t) . c[l, j], its
negative part cut to 0 (`attention._normalise`). Unlike attention weights, which the labels
of an image share (they come from the same query), it depends on the label through w_t: the
direct-path, first-order part of gradient-weighted attention (Chefer et al. 2021), without a
backward pass. docs/grounding.md has the benchmark that picked it.
"""

from __future__ import annotations

import torch


def weight_rows(linear, rows: torch.Tensor) -> torch.Tensor:
    """float32 rows of a Linear layer's weight, whatever computes the layer: `nn.Linear` and
    the oneDNN layer of nxtrec.inference.cpu (`weight` a tensor), or torch's dynamic int8 Linear
    (`weight()` a per-channel quantised tensor; only the rows asked for are dequantised)."""
    w = linear.weight() if callable(linear.weight) else linear.weight
    if w.is_quantized:
        scale, zero = w.q_per_channel_scales()[rows, None].float(), w.q_per_channel_zero_points()[rows, None].float()
        return (w.int_repr()[rows].float() - zero) * scale
    return w[rows].float()


def image_contributions(out_projection, last_probs: torch.Tensor, values: torch.Tensor, num_image_tokens: int) -> torch.Tensor:
    """c[l, j] of one layer for every image token j: [B, P, dim] float32. `last_probs`: the last
    prompt position's attention per head [B, H, S]; `values`: the layer's values [B, H, S, D]."""
    p = num_image_tokens
    weighted = last_probs[:, :, :p, None] * values[:, :, :p].float()  # [B, H, P, D]
    return out_projection(weighted.transpose(1, 2).flatten(2).to(values.dtype)).float()


def logit_maps(contributions: torch.Tensor, output, norm_weight: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """[len(token_ids), P]: each token's logit share per image token, from one image's summed
    contributions [P, dim], the output layer and the final norm's weight g."""
    rows = torch.tensor(token_ids, dtype=torch.long, device=contributions.device)
    directions = weight_rows(output, rows) * norm_weight.float()
    return directions @ contributions.T
