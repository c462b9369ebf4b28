"""The language decoder: LLaMA-2 truncated to its first blocks, in Meta's layout
(`layers.N.attention.wq`, ...; DESIGN.md section 4).

The decoder has two ways to run attention:
- `Decoder.forward`: a whole sequence with an additive mask (training, the prompt prefix, and
  the reference's no-cache algorithm kept as a baseline);
- `Decoder.step`: one new token for each of N branches that share a cached prefix. The
  prefix's keys/values are stored once per image, never copied per branch; each branch keeps
  only its own few keys/values."""

from __future__ import annotations

import math

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
    """Rotate consecutive pairs (2i, 2i+1) of each head vector. x: [B, S, H, D]; cos/sin: [S, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


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
            self.probe.prefix(q, k, mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).flatten(2)), (k, v)

    def step(self, x, cos, sin, prefix_kv, groups, own_kv):
        """One new token per branch. x: [N, 1, dim]; prefix_kv: keys/values [B, H, Lp, D]
        shared by the branches of each image; groups: (image, start, end) row ranges of the
        branches of each image; own_kv: the branches' earlier keys/values [N, H, t, D] or None.
        Each branch attends to its image's whole prefix and to its own tokens only."""
        q, k, v = self.qkv(x, cos, sin)  # [N, H, 1, D]
        if own_kv is not None:
            k, v = torch.cat([own_kv[0], k], dim=2), torch.cat([own_kv[1], v], dim=2)
        pk, pv = prefix_kv
        n, h, _, d = q.shape
        scale = 1.0 / math.sqrt(d)
        q2 = q[:, :, 0, :]  # [N, H, D]
        pre_scores = q2.new_empty(n, h, pk.shape[2])
        for img, start, end in groups:  # bmm per image: the prefix is read, never copied
            qi = q2[start:end].transpose(0, 1)  # [H, n_i, D]
            pre_scores[start:end] = torch.bmm(qi, pk[img].transpose(1, 2)).transpose(0, 1)
        own_scores = torch.einsum("nhd,nhtd->nht", q2, k)
        probs = torch.cat([pre_scores, own_scores], dim=-1).float().mul(scale).softmax(-1).type_as(q)
        pre_p, own_p = probs.split([pk.shape[2], k.shape[2]], dim=-1)
        if self.probe is not None:
            self.probe.step(pre_p)
        out = torch.einsum("nht,nhtd->nhd", own_p, v)
        for img, start, end in groups:
            out[start:end] += torch.bmm(pre_p[start:end].transpose(0, 1), pv[img]).transpose(0, 1)
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

    def step(self, x, cos, sin, prefix_kv, groups, own_kv):
        a, kv = self.attention.step(self.attention_norm(x), cos, sin, prefix_kv, groups, own_kv)
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

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None, start_pos: int = 0, last_only: bool = False):
        """h: [B, S, dim] input embeddings; mask: additive [B or 1, 1, S, S].
        Returns logits ([B, vocab] if last_only else [B, S, vocab]) and per-layer keys/values."""
        cos, sin = self.rope(torch.arange(start_pos, start_pos + h.shape[1], device=h.device))
        kvs = []
        for layer in self.layers:
            h, kv = layer(h, cos, sin, mask)
            kvs.append(kv)
        if last_only:
            h = h[:, -1]
        return self.output(self.norm(h)), kvs

    def step(self, tokens: torch.Tensor, position: int, prefix_kvs, groups, own_kvs):
        """tokens: [N] one new token per branch, all at absolute `position`.
        Returns logits [N, vocab] and the branches' updated own keys/values."""
        h = self.embed(tokens)[:, None, :]
        cos, sin = self.rope(torch.tensor([position], device=h.device))
        new_kvs = []
        for i, layer in enumerate(self.layers):
            h, kv = layer.step(h, cos, sin, prefix_kvs[i], groups, own_kvs[i] if own_kvs else None)
            new_kvs.append(kv)
        return self.output(self.norm(h[:, 0])), new_kvs
