"""Text batches: the sequence of each image (template, shuffled labels, EOS), targets and
dynamic padding."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from nxtrec.training.config import TrainConfigError
from nxtrec.training.errors import TrainError

IGNORE = -100


@dataclass
class TextBatch:
    tokens: torch.Tensor  # [B, T] text ids (pad_id after each sample's end)
    targets: torch.Tensor  # [B, T-1] target of the logits at text position j, IGNORE if none
    answer_index: int  # position `a` of the last prompt token in the whole sequence
    n_targets: int


def text_rng(seed: int, step: int, slot: int) -> random.Random:
    """Template and label order of micro-batch `slot` (= micro index x world + rank) of
    optimizer step `step`: a pure function of them, so a resumed run draws the same."""
    return random.Random(f"nxtrec/{seed}/{step}/{slot}")


def make_text_batch(
    tokenizer,
    labels: list[list[str]],
    template: str,
    rng: random.Random,
    num_image_tokens: int,
    max_seq_len: int,
    padding: str = "longest",
    span: str = "text",
    image_token: str = "<|image|>",
    close_last: bool = False,
) -> TextBatch:
    """Encode `image_token + template + " " + ", ".join(shuffled labels)` with BOS and EOS,
    swap the first two ids, truncate to `max_seq_len` in all, pad, and build the targets:
    the next token at every text position, except padding and EOS; with `span="answer"`
    only from the last prompt token on. `close_last`: end the last label with the delimiter too
    (EOS is no target, so a label only ever seen alone would never learn where it ends, and
    one-shot sampling ends a label at the delimiter)."""
    p = num_image_tokens
    prompt = tokenizer.prompt_ids(image_token, template)
    room = max_seq_len - p
    if room < len(prompt) + 1:
        raise TrainConfigError(
            f"data.max_seq_len {max_seq_len} leaves no room for labels after {p} image tokens and a "
            f"{len(prompt)}-token prompt"
        )
    seqs = []
    for labs in labels:
        labs = list(labs)
        rng.shuffle(labs)
        text = ", ".join(labs) + ("," if close_last and labs else "")
        ids = tokenizer.encode(image_token + template + " " + text, bos=True, eos=True)
        ids[0], ids[1] = ids[1], ids[0]
        if ids[: len(prompt)] != prompt:
            raise TrainError(f"the tokenizer merges the prompt {template!r} with the labels that follow it")
        seqs.append(ids[:room])
    t = room if padding == "max" else max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), t), tokenizer.pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    targets = tokens[:, 1:].clone()
    targets[(targets == tokenizer.pad_id) | (targets == tokenizer.eos_id)] = IGNORE
    if span == "answer":
        targets[:, : len(prompt) - 1] = IGNORE
    return TextBatch(tokens, targets, p + len(prompt) - 1, int((targets != IGNORE).sum()))
