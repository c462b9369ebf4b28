"""The vision encoder: OpenAI CLIP's ViT with `proj` mapping every token to the decoder
width (docs/design.md#vision-encoder). Parameter names are CLIP's `visual.*`."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nxtrec.model.config import EncoderConfig


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, as CLIP does for fp16 weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (causal in
    CLIP's text tower, see metric.py)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, s, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, w))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = LayerNorm(width)
        self.attn = CLIPAttention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class CLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig, out_dim: int):
        super().__init__()
        w = cfg.width
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_patches + 1, w))
        self.ln_pre = LayerNorm(w)
        self.transformer = CLIPTransformer(w, cfg.layers, cfg.heads)
        self.ln_post = LayerNorm(w)
        # Replaces CLIP's projection: every token is mapped to the decoder width.
        self.proj = nn.Linear(w, out_dim, bias=False)

    def forward(self, pixels: torch.Tensor, keep_class_token: bool = False) -> torch.Tensor:
        """[B, 3, H, W] -> [B, P, out_dim] image tokens (the class token is dropped unless asked)."""
        x = self.conv1(pixels.to(self.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.proj(self.ln_post(x))
        return x if keep_class_token else x[:, 1:]
