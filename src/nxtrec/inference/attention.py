"""Where the decoder looks: attention probabilities recorded during the normal forward passes.

Two views, both read from the decoder's own queries and keys (an opt-in probe on each
`Attention` module; without a probe the decoder runs exactly as before):

- The reference's view (`image_attention`): for decoder layer L and head H, the softmax
  attention among the P image tokens in the prefix pass, a [P, P] array (row = query image
  token, column = key image token). Image tokens attend only to image tokens (the inference
  mask), so each row sums to 1. This is the block that nxtp's `save_attention_map` caches
  (its full [S, S] probabilities sliced to the image tokens) and plots.
- Per-label grounding maps (`grounded_one_shot`): during one-shot sampling, each label's
  branch is a sequence of queries (the last prompt position, whose top-k starts the
  branches, then the branch's own step tokens up to its delimiter). Their attention to the
  image tokens, combined over heads, layers and queries by one of `MAP_RULES`, is the
  label's map over the patch grid (sums to 1). It comes from the same one-shot pass: the
  prefix runs once, as without maps. The default rule, "logit" (nxtrec.inference.attribution),
  weighs what the last prompt position read from each image token by the label's own output
  direction, so the labels of one image get different maps.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from nxtrec.errors import NxtrecError
from nxtrec.inference.attribution import image_contributions, logit_maps
from nxtrec.inference.ranking import Branch
from nxtrec.inference.sampling import one_shot, prefill
from nxtrec.model.network import NxtpModel

# How a label's map combines its queries' attention to the image tokens (always averaged over
# heads): "last": the last decoder layer, all the label's queries; "first": the first layer;
# "mean": all layers; "tokens": all layers, only the label's own tokens as queries (not the
# last prompt position, which all labels share; used alone for a label without own tokens);
# "rollout": attention rollout (Abnar & Zuidema 2020) through the prefix, see `_rollout_map`;
# "logit": each image token's direct share of the label's first-token logit
# (nxtrec.inference.attribution). The default was picked by the discriminative score and the
# pointing game (benchmarks/bench_grounding.py, docs/grounding.md); "rollout" was the default
# before, and every rule stays selectable (`map_rule`), so earlier maps can be made again.
MAP_RULES = ("last", "first", "mean", "tokens", "rollout", "logit")
DEFAULT_MAP_RULE = "logit"


class AttentionError(NxtrecError, ValueError):
    pass


def grid_shape(model: NxtpModel) -> tuple[int, int]:
    """(rows, columns) of the image-token grid."""
    side = model.config.encoder.image_size // model.config.encoder.patch_size
    return side, side


@dataclass
class _LayerProbe:
    """Set as `Attention.probe` of decoder layer `layer` while a recorder listens."""

    recorder: object
    layer: int

    def prefix(self, q, k, v, mask):
        self.recorder.on_prefix(self.layer, q, k, v, mask)

    def step(self, prefix_probs):
        self.recorder.on_step(self.layer, prefix_probs)


@contextmanager
def recording(model: NxtpModel, recorder):
    """Attach `recorder` to every decoder layer for the duration of the block."""
    layers = model.language_decoder.layers
    for i, layer in enumerate(layers):
        layer.attention.probe = _LayerProbe(recorder, i)
    try:
        yield recorder
    finally:
        for layer in layers:
            layer.attention.probe = None


def _softmax_rows(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, rows: slice) -> torch.Tensor:
    """fp32 softmax(q k^T / sqrt(d) + mask) for the query positions `rows`: [B, H, rows, S]."""
    scores = q[:, :, rows].float() @ k.float().transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask[..., rows, :].float()
    return scores.softmax(-1)


# ---------------------------------------------------------------------------------------
# the reference's view: image tokens attending to image tokens in the prefix pass
# ---------------------------------------------------------------------------------------


class ImageBlockRecorder:
    """Keeps the [B, H, P, P] image-token block of the prefix attention of chosen layers."""

    def __init__(self, num_image_tokens: int, layers):
        self.num_image_tokens = num_image_tokens
        self.layers = set(layers)
        self.blocks: dict[int, torch.Tensor] = {}

    def on_prefix(self, layer, q, k, v, mask):
        if layer in self.layers:
            p = self.num_image_tokens
            self.blocks[layer] = _softmax_rows(q, k, mask, slice(0, p))[..., :p]

    def on_step(self, layer, prefix_probs):
        pass


@torch.inference_mode()
def image_attention(model: NxtpModel, pixels: torch.Tensor, prompt_ids: torch.Tensor, layers: list[int]) -> dict[int, np.ndarray]:
    """For each decoder layer in `layers`: the prefix pass's attention among the image tokens
    of the first image, [heads, P, P] float32 (one prefix pass for all layers)."""
    n_layers = model.config.decoder.n_layers
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise AttentionError(f"--layer {bad[0]}: the decoder has layers 0 to {n_layers - 1}")
    image_tokens = model.encode_images(pixels)
    recorder = ImageBlockRecorder(image_tokens.shape[1], layers)
    with recording(model, recorder):
        prefill(model, image_tokens, prompt_ids)
    return {i: recorder.blocks[i][0].cpu().numpy() for i in layers}


# ---------------------------------------------------------------------------------------
# per-label grounding maps from the one-shot pass
# ---------------------------------------------------------------------------------------


class GroundingRecorder:
    """Head-averaged attention of every query a label's branch makes to the prefix.

    Prefix pass: the last prompt position's row per layer ([B, Lp]); with `rollout`, also the
    whole head-averaged prefix attention ([B, Lp, Lp]) per layer; with `out_projections` (each
    layer's `attention.wo`, for the "logit" rule), what that position read from each image
    token, summed over layers ([B, P, dim]). Each step: every running branch's row to the
    prefix per layer; `end_step(active)` says which branches the rows were.
    """

    def __init__(self, n_layers: int, num_image_tokens: int, rollout: bool = False, out_projections=None):
        self.n_layers = n_layers
        self.num_image_tokens = num_image_tokens
        self.rollout = rollout
        self.out_projections = out_projections
        self.contributions: torch.Tensor | None = None
        self.prefix_rows: list[torch.Tensor | None] = [None] * n_layers
        self.prefix_attention: list[torch.Tensor | None] = [None] * n_layers
        self.branch_rows: dict[int, list[torch.Tensor]] = {}  # branch -> [L, Lp] per step
        self._step: list[torch.Tensor | None] = [None] * n_layers

    @classmethod
    def for_rules(cls, model: NxtpModel, num_image_tokens: int, rules) -> GroundingRecorder:
        """A recorder that keeps what the map rules `rules` need."""
        wo = [layer.attention.wo for layer in model.language_decoder.layers] if "logit" in rules else None
        return cls(model.config.decoder.n_layers, num_image_tokens, rollout="rollout" in rules, out_projections=wo)

    def on_prefix(self, layer, q, k, v, mask):
        if self.out_projections is not None:
            last = _softmax_rows(q, k, None, slice(-1, None))[:, :, 0]  # [B, H, Lp]
            c = image_contributions(self.out_projections[layer], last, v, self.num_image_tokens)
            self.contributions = c if self.contributions is None else self.contributions + c
        if self.rollout:
            full = _softmax_rows(q, k, mask, slice(None)).mean(1)  # [B, S, S]
            self.prefix_attention[layer] = full
            self.prefix_rows[layer] = full[:, -1]
        else:  # the last position attends to every prefix key: no mask needed
            self.prefix_rows[layer] = _softmax_rows(q, k, None, slice(-1, None)).mean(1)[:, 0]

    def on_step(self, layer, prefix_probs):
        self._step[layer] = prefix_probs.float().mean(1)  # [N, Lp]

    def end_step(self, active: list[int]) -> None:
        rows = torch.stack(self._step, dim=1)  # [N, L, Lp]
        if rows.shape[0] != len(active):
            raise RuntimeError(f"recorded {rows.shape[0]} branch rows for {len(active)} active branches")
        for row, branch in enumerate(active):
            self.branch_rows.setdefault(branch, []).append(rows[row])
        self._step = [None] * self.n_layers

    def queries(self, branch: int, image: int, n_queries: int) -> torch.Tensor:
        """[Q, L, Lp]: the branch's first query (last prompt position) and its step queries."""
        first = torch.stack([r[image] for r in self.prefix_rows])
        return torch.stack([first] + self.branch_rows.get(branch, [])[: n_queries - 1])

    def prefix_rollout(self, image: int) -> list[torch.Tensor]:
        """R_0 = I, R_{l+1} = (I + A_l) R_l / 2 over the prefix (A_l head-averaged)."""
        a0 = self.prefix_attention[0][image]
        mats = [torch.eye(a0.shape[0], dtype=a0.dtype, device=a0.device)]
        for a in self.prefix_attention:
            mats.append(0.5 * (mats[-1] + a[image] @ mats[-1]))
        return mats

    def branch_map(self, branch: int, image: int, n_queries: int, rule: str, rollout=None) -> np.ndarray:
        """The branch's map over the P image tokens (flat, sums to 1)."""
        rows = self.queries(branch, image, n_queries)  # [Q, L, Lp]
        p = self.num_image_tokens
        if rule == "last":
            m = rows[:, -1, :p].mean(0)
        elif rule == "first":
            m = rows[:, 0, :p].mean(0)
        elif rule == "mean":
            m = rows[:, :, :p].mean((0, 1))
        elif rule == "tokens":
            m = rows[1:, :, :p].mean((0, 1)) if rows.shape[0] > 1 else rows[0, :, :p].mean(0)
        else:
            m = torch.stack([_rollout_map(q, rollout, i == 0) for i, q in enumerate(rows)]).mean(0)[:p]
        return _normalise(m.cpu().numpy().astype(np.float64))


def _rollout_map(rows: torch.Tensor, prefix_rollout: list[torch.Tensor], is_prefix_query: bool) -> torch.Tensor:
    """Rollout of one query through the layers: r_{l+1} = (r_l + a_l R_l + o_l r_l) / 2, with
    a_l its attention to the prefix, R_l the prefix's rollout and o_l the attention mass on
    the branch's own tokens (counted as the query's own path). The first query is the last
    prompt position, a prefix token itself (r_0 = its one-hot); step tokens start at 0."""
    lp = rows.shape[-1]
    r = torch.zeros(lp, dtype=rows.dtype, device=rows.device)
    if is_prefix_query:
        r[-1] = 1.0
    for layer, a in enumerate(rows):
        own = 1.0 - a.sum()
        r = 0.5 * (r + a @ prefix_rollout[layer] + own * r)
    return r


def _normalise(m: np.ndarray) -> np.ndarray:
    m = np.where(np.isfinite(m), np.maximum(m, 0.0), 0.0)
    total = m.sum()
    return (m / total if total > 0 else np.full_like(m, 1.0 / m.size)).astype(np.float32)


def _check_rule(rule: str) -> None:
    if rule not in MAP_RULES:
        raise AttentionError(f"unknown map rule {rule!r}; choose from {', '.join(MAP_RULES)}")


@torch.inference_mode()
def recorded_one_shot(model: NxtpModel, image_tokens, prompt_ids, k: int, delimiter_id: int,
                      rules=(DEFAULT_MAP_RULE,), **one_shot_kwargs) -> tuple[list[list[Branch]], GroundingRecorder]:
    """`one_shot` with a `GroundingRecorder` listening, keeping what the map rules `rules`
    need. Maps for those rules then come from `attach_maps`, without running again."""
    recorder = GroundingRecorder.for_rules(model, image_tokens.shape[1], rules)
    with recording(model, recorder):
        branches = one_shot(model, image_tokens, prompt_ids, k, delimiter_id, recorder=recorder, **one_shot_kwargs)
    return branches, recorder


@torch.inference_mode()
def attach_maps(model: NxtpModel, branches: list[list[Branch]], recorder: GroundingRecorder, k: int, rule: str,
                delimiter_id: int) -> None:  # fmt: skip
    """Set every branch's `map`: [rows, cols] float32 over the patch grid, sums to 1."""
    _check_rule(rule)
    if (rule == "rollout" and not recorder.rollout) or (rule == "logit" and recorder.contributions is None):
        raise AttentionError(f"the {rule} rule needs a recorder made for it (GroundingRecorder.for_rules)")
    shape = grid_shape(model)
    for image, image_branches in enumerate(branches):
        if rule == "logit":
            _attach_logit_maps(model, image_branches, recorder.contributions[image], delimiter_id)
            continue
        rollout = recorder.prefix_rollout(image) if rule == "rollout" else None
        for j, br in enumerate(image_branches):
            # A branch's queries are the positions whose next-token distributions gave its
            # tokens: one per probability (the first token, ..., the delimiter).
            br.map = recorder.branch_map(image * k + j, image, len(br.probs), rule, rollout).reshape(shape)


def _attach_logit_maps(model: NxtpModel, branches: list[Branch], contributions: torch.Tensor, delimiter_id: int) -> None:
    """The "logit" rule for one image's branches, from the token each branch started with."""
    dec = model.language_decoder
    first = [br.tokens[0] if br.tokens else delimiter_id for br in branches]
    maps = logit_maps(contributions, dec.output, dec.norm.weight, first).cpu().numpy().astype(np.float64)
    for br, m in zip(branches, maps):
        br.map = _normalise(m).reshape(grid_shape(model))


def grounded_one_shot(model: NxtpModel, image_tokens, prompt_ids, k: int, delimiter_id: int,
                      rule: str = DEFAULT_MAP_RULE, **one_shot_kwargs) -> list[list[Branch]]:
    """`one_shot` that also gives every branch its map over the patch grid, combined by `rule`."""
    _check_rule(rule)
    branches, recorder = recorded_one_shot(model, image_tokens, prompt_ids, k, delimiter_id, rules=(rule,),
                                           **one_shot_kwargs)  # fmt: skip
    attach_maps(model, branches, recorder, k, rule, delimiter_id)
    return branches
