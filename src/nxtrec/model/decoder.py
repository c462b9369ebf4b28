"""The language decoder: LLaMA-2 truncated to its first blocks, in Meta's layout
(`layers.N.attention.wq`, ...; docs/design.md#language-decoder).

The decoder has two ways to run attention:
- `Decoder.forward`: a whole sequence with an additive mask (training, the prompt prefix, and
  the reference's no-cache algorithm kept as a baseline);
- `Decoder.step`: one new token for each of N branches that share a cached prefix. The
  prefix's keys/values are stored once per image, never copied per branch; each branch keeps
  only its own few keys/values. `BranchRows` says which image each branch belongs to."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nxtrec.model.config import DecoderConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [len(positions), head_dim/2] in fp32 for Meta's rotary convention."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device)[: head_dim // 2].float() / head_dim))
    angles = torch.outer(positions.float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (2i, 2i+1) of each head vector. x: [B, S, H, D]; cos/sin: [S, D/2].
    As a complex multiplication (Meta's formulation): one pass over x, where the same rotation
    on real strided views takes seven and is much slower on the CPU. ONNX has no complex
    type, so an export traces the real form."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = cos[:, None, :], sin[:, None, :]
    if torch.compiler.is_exporting():
        x0, x1 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    else:
        out = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


@dataclass(frozen=True)
class BranchRows:
    """Where the N branch rows of a step sit in a [images, width] grid: row r belongs to image
    slots[r] // width. Branches of one image are consecutive rows, in image order; images
    may have different numbers of branches (finished ones are dropped), at most `width`.
    The grid lets one batched matmul per layer read every image's prefix."""

    images: int
    width: int
    slots: torch.Tensor | None  # [N] grid positions; None when row r is slot r (full grid)

    @classmethod
    def of(cls, owner: list[int], images: int, device=None) -> "BranchRows":
        """From the image of each row (non-decreasing, as branches are kept in order)."""
        ranks, count = [], {}
        for img in owner:
            ranks.append(count.get(img, 0))
            count[img] = ranks[-1] + 1
        width = max(count.values(), default=0)
        if len(owner) == images * width:
            return cls(images, width, None)
        slots = [img * width + rank for img, rank in zip(owner, ranks)]
        return cls(images, width, torch.tensor(slots, dtype=torch.long, device=device))

    def to_grid(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, H, X] rows -> [images, H, width, X], zeros where a slot has no row."""
        if self.slots is not None:
            rows = rows.new_zeros(self.images * self.width, *rows.shape[1:]).index_copy_(0, self.slots, rows)
        return rows.unflatten(0, (self.images, self.width)).transpose(1, 2)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """[images, H, width, X] -> the [N, H, X] rows."""
        rows = grid.transpose(1, 2).flatten(0, 1)
        return rows if self.slots is None else rows.index_select(0, self.slots)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.wq = nn.Linear(cfg.dim, inner, bias=False)
        self.wk = nn.Linear(cfg.dim, inner, bias=False)
        self.wv = nn.Linear(cfg.dim, inner, bias=False)
        self.wo = nn.Linear(inner, cfg.dim, bias=False)
        # Set only while nxtrec.inference.attention records attention probabilities.
        self.probe = None

    def qkv(self, x, cos, sin):
        b, s, _ = x.shape
        shape = (b, s, self.n_heads, self.head_dim)
        q = apply_rope(self.wq(x).view(shape), cos, sin)
        k = apply_rope(self.wk(x).view(shape), cos, sin)
        v = self.wv(x).view(shape)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, S, D]

    def forward(self, x, cos, sin, mask):
        """Whole sequence. Returns the output and this layer's keys/values [B, H, S, D]."""
        q, k, v = self.qkv(x, cos, sin)
        if self.probe is not None:
            self.probe.prefix(q, k, v, mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).flatten(2)), (k, v)

    def step(self, x, cos, sin, prefix_kv, rows: BranchRows, own_kv):
        """One new token per branch. x: [N, 1, dim]; prefix_kv: keys/values [B, H, Lp, D]
        shared by the branches of each image; rows: which image each branch belongs to;
        own_kv: the branches' earlier keys/values [N, H, t, D] or None.
        Each branch attends to its image's whole prefix and to its own tokens only."""
        q, k, v = self.qkv(x, cos, sin)  # [N, H, 1, D]
        if own_kv is not None:
            k, v = torch.cat([own_kv[0], k], dim=2), torch.cat([own_kv[1], v], dim=2)
        pk, pv = prefix_kv
        n, h, _, d = q.shape
        scale = 1.0 / math.sqrt(d)
        q2 = q[:, :, 0, :]  # [N, H, D]
        # The prefix is read in place by one matmul over the grid, never copied per branch.
        pre_scores = rows.from_grid(torch.matmul(rows.to_grid(q2), pk.transpose(2, 3)))
        own_scores = torch.einsum("nhd,nhtd->nht", q2, k)
        probs = torch.cat([pre_scores, own_scores], dim=-1).float().mul(scale).softmax(-1).type_as(q)
        pre_p, own_p = probs.split([pk.shape[2], k.shape[2]], dim=-1)
        if self.probe is not None:
            self.probe.step(pre_p)
        out = torch.einsum("nht,nhtd->nhd", own_p, v) + rows.from_grid(torch.matmul(rows.to_grid(pre_p), pv))
        return self.wo(out.reshape(n, 1, h * d)), (k, v)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.hidden_dim)

    def forward(self, x, cos, sin, mask):
        a, kv = self.attention(self.attention_norm(x), cos, sin, mask)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), kv

    def step(self, x, cos, sin, prefix_kv, rows, own_kv):
        a, kv = self.attention.step(self.attention_norm(x), cos, sin, prefix_kv, rows, own_kv)
        h = x + a
        return h + self.feed_forward(self.ffn_norm(h)), kv


class Decoder(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; negative ids index from the end (pad id -1 -> `<|empty|>`)."""
        return self.tok_embeddings(torch.where(ids < 0, ids + self.cfg.vocab_size, ids))

    def rope(self, positions: torch.Tensor):
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, start_pos: int = 0, last_only: bool = False,
                select: torch.Tensor | None = None):
        """h: [B, S, dim] input embeddings; mask: additive [B or 1, 1, S, S].
        Returns logits ([B, vocab] if last_only else [B, S, vocab]) and per-layer keys/values.
        `select` (bool [B, S]): logits only at those positions, [K, vocab] in row-major order,
        and no keys/values (the training loss: the output layer is the widest matmul, and
        keeping every layer's keys/values would defeat activation checkpointing)."""
        cos, sin = self.rope(torch.arange(start_pos, start_pos + h.shape[1], device=h.device))
        kvs = []
        for layer in self.layers:
            h, kv = layer(h, cos, sin, mask)
            if select is None:
                kvs.append(kv)
        if select is not None:
            h = h[select]
        elif last_only:
            h = h[:, -1]
        return self.output(self.norm(h)), kvs

    def step(self, tokens: torch.Tensor, position: int, prefix_kvs, rows: BranchRows, own_kvs):
        """tokens: [N] one new token per branch, all at absolute `position`; rows: which image
        each branch belongs to. Returns logits [N, vocab] and the branches' updated own keys/values."""
        h = self.embed(tokens)[:, None, :]
        cos, sin = self.rope(torch.tensor([position], device=h.device))
        new_kvs = []
        for i, layer in enumerate(self.layers):
            h, kv = layer.step(h, cos, sin, prefix_kvs[i], rows, own_kvs[i] if own_kvs else None)
            new_kvs.append(kv)
        return self.output(self.norm(h[:, 0])), new_kvs
