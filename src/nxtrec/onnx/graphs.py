"""The modules that are exported: the encoder, the prefix pass and one cached step of the
decoder, and the reference's three decoder parts."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from nxtrec.model.config import ModelConfig
from nxtrec.model.decoder import Decoder, rope_cos_sin
from nxtrec.model.masks import inference_mask
from nxtrec.model.network import NxtpModel
from nxtrec.onnx.format import kv_names


class EncoderGraph(nn.Module):
    def __init__(self, model: NxtpModel, keep_class_token: bool = False):
        super().__init__()
        self.encoder = model.vision_encoder
        self.keep_class_token = keep_class_token

    def forward(self, pixels):
        return self.encoder(pixels, keep_class_token=self.keep_class_token)


class PrefillGraph(nn.Module):
    """[B, L, dim] prefix embeddings -> last-position logits (fp32) and every layer's keys/values."""

    def __init__(self, model: NxtpModel):
        super().__init__()
        self.decoder: Decoder = model.language_decoder
        self.num_image_tokens = model.num_image_tokens

    def forward(self, inputs_embeds):
        dec, s = self.decoder, inputs_embeds.shape[1]
        mask = inference_mask(s, self.num_image_tokens, inputs_embeds.device, inputs_embeds.dtype)
        cos, sin = dec.rope(torch.arange(s, device=inputs_embeds.device))
        h, presents = inputs_embeds, []
        for layer in dec.layers:
            h, kv = layer(h, cos, sin, mask)
            presents += kv
        return (_head(dec, h), *presents)


def _head(dec: Decoder, h):
    """Last-position logits in fp32. The position is kept as a length-1 axis so the output
    projection exports as a MatMul (which int8 dynamic quantization handles; Gemm it does not)."""
    return dec.output(dec.norm(h[:, -1:]))[:, 0].float()


def branch_attention(q, prefix_k, prefix_v, k, v, mask):
    """Attention of the new tokens of N branches over their image's shared prefix and their
    own keys.

    q: [N, H, S, D] (S new tokens per branch); prefix_k/v: [B, H, Lp, D] shared by the N/B
    branches of each image (rows b*N/B .. (b+1)*N/B - 1; B = N gives one prefix per row; Lp may
    be 0); k/v: the branch's own keys/values [N, H, T+S, D], the new tokens' included; mask:
    additive [S, T+S] over the own keys (the prefix is always visible). The prefix is read by one
    batched matmul per image ([B, H, N/B*S, D] x [B, H, D, Lp]), never copied per branch."""
    n, h, s, d = q.shape
    b, lp = prefix_k.shape[0], prefix_k.shape[2]
    qg = q.transpose(1, 2).reshape(b, -1, h, d).transpose(1, 2)  # [B, H, N/B*S, D]
    rows = qg.shape[2]
    pre = torch.matmul(qg, prefix_k.transpose(2, 3)).transpose(1, 2).reshape(n, s, h, lp).transpose(1, 2)
    own = torch.matmul(q, k.transpose(2, 3)) + mask  # [N, H, S, T+S]
    probs = torch.cat([pre, own], dim=-1).float().mul(1.0 / math.sqrt(d)).softmax(-1).type_as(q)
    p_pre, p_own = probs[..., :lp], probs[..., lp:]
    p_pre = p_pre.transpose(1, 2).reshape(b, rows, h, lp).transpose(1, 2)  # [B, H, N/B*S, Lp]
    out = torch.matmul(p_pre, prefix_v).transpose(1, 2).reshape(n, s, h * d)
    return out + torch.matmul(p_own, v).transpose(1, 2).reshape(n, s, h * d)


def cache_mask(position, new_len: int, past_len: int, num_image_tokens: int, dtype):
    """Additive [S, T+S] mask of S new tokens (absolute positions position..position+S-1) over
    T earlier own tokens (all visible) and themselves: causal, plus full attention among the
    image tokens (positions < P), as `nxtrec.model.inference_mask`."""
    i = torch.arange(new_len, device=position.device)
    a = position + i
    allowed = (i[None, :] <= i[:, None]) | ((a[:, None] < num_image_tokens) & (a[None, :] < num_image_tokens))
    zero = torch.zeros((), dtype=dtype, device=position.device)
    new = torch.where(allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=position.device))
    return torch.cat([torch.zeros(new_len, past_len, dtype=dtype, device=position.device), new], dim=1)


class StepGraph(nn.Module):
    """New tokens of N branches with explicit caches (see the module docstring). One token per
    branch is the decoding step; with an empty prefix and past, the whole prompt prefix is the
    prefill (which is how the runtime uses it: one session holds the decoder weights once)."""

    def __init__(self, model: NxtpModel):
        super().__init__()
        self.decoder: Decoder = model.language_decoder
        self.n_layers = len(self.decoder.layers)
        self.num_image_tokens = model.num_image_tokens

    def forward(self, inputs_embeds, position, *cache):
        dec, n_layers = self.decoder, self.n_layers
        prefix, past = cache[: 2 * n_layers], cache[2 * n_layers :]
        s = inputs_embeds.shape[1]
        positions = position.reshape(1) + torch.arange(s, device=inputs_embeds.device)
        cos, sin = rope_cos_sin(positions, dec.cfg.head_dim, dec.cfg.rope_theta)
        mask = cache_mask(position, s, past[0].shape[2], self.num_image_tokens, inputs_embeds.dtype)
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(dec.layers):
            q, k, v = layer.attention.qkv(layer.attention_norm(h), cos, sin)  # [N, H, S, D]
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            h = h + layer.attention.wo(branch_attention(q, prefix[2 * i], prefix[2 * i + 1], k, v, mask))
            h = h + layer.feed_forward(layer.ffn_norm(h))
            presents += [k, v]
        return (_head(dec, h), *presents)


class ReleasedDecoderPart(nn.Module):
    """The reference's split decoder: `input` [B, S, dim] + additive `mask` [B, 1, S, S] ->
    hidden states, or (last part) the logits of the last position [B, vocab]."""

    def __init__(self, model: NxtpModel, layers: range, head: bool):
        super().__init__()
        self.decoder = model.language_decoder
        self.layer_ids = list(layers)
        self.head = head

    def forward(self, input, mask):  # noqa: A002 - the released graphs' input name
        dec = self.decoder
        cos, sin = dec.rope(torch.arange(input.shape[1], device=input.device))
        h = input
        for i in self.layer_ids:
            h, _ = dec.layers[i](h, cos, sin, mask)
        return dec.output(dec.norm(h[:, -1:]))[:, 0] if self.head else h


def graph_signatures(config: ModelConfig, dtype: str = "float32") -> dict:
    """Inputs and outputs of every graph (names, element types, symbolic shapes)."""
    d, e = config.decoder, config.encoder
    H, D, V, P, L = d.n_heads, d.head_dim, d.vocab_size, e.num_patches, d.n_layers
    f, size = dtype, e.image_size

    def t(name, shape, typ=f):
        return {"name": name, "dtype": typ, "shape": shape}

    kv = lambda pre, n, length: [t(name, [n, H, length, D]) for name in kv_names(pre, L)]  # noqa: E731
    return {
        "encoder": {
            "inputs": [t("pixels", ["batch", 3, size, size], "float32")],
            "outputs": [t("image_tokens", ["batch", P, d.dim])],
        },
        "prefill": {
            "inputs": [t("inputs_embeds", ["batch", "prefix_len", d.dim])],
            "outputs": [t("logits", ["batch", V], "float32"), *kv("present", "batch", "prefix_len")],
        },
        "step": {
            "inputs": [
                t("inputs_embeds", ["branches", "new_len", d.dim]),
                t("position", [], "int64"),
                *kv("prefix", "batch", "prefix_len"),
                *kv("past", "branches", "past_len"),
            ],
            "outputs": [t("logits", ["branches", V], "float32"), *kv("present", "branches", "past_len + new_len")],
            "notes": "branches = batch * branches per image (rows of image b are contiguous); new_len is 1 when "
            "decoding; position = absolute position of the first new token; prefix_len and past_len may be 0 "
            "(prefill: prefix and past empty, position 0, new_len = prefix length)",
        },
    }
