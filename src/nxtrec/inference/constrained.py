"""The PyTorch side of decoding into a tag list (`nxtrec.inference.vocab` has the trie): the
first top-k and each greedy step restricted to the ids the trie allows, with index ops on the
device. The reported probabilities are the unconstrained softmax probabilities."""

from __future__ import annotations

import torch

from nxtrec.inference.vocab import ROOT, TrieWalk, VocabTrie, check_k


class TorchTrieWalk(TrieWalk):
    def __init__(self, trie: VocabTrie):
        super().__init__(trie)
        self._first_ids: dict[torch.device, torch.Tensor] = {}

    def first(self, logits: torch.Tensor, k: int) -> tuple[list[float], torch.Tensor]:
        """Top-k per image among the tokens that start a form: probabilities (flat list) and
        ids [B * k], as `sampling._first_tokens` returns them."""
        check_k(self.trie, k)
        ids = self._first_ids.get(logits.device)
        if ids is None:
            ids = self._first_ids[logits.device] = torch.from_numpy(self.trie.allowed[ROOT]).to(logits.device)
        top_p, j = logits.float().softmax(-1)[:, ids].topk(k, dim=-1)
        tokens = ids[j].reshape(-1)
        self.start(tokens.tolist())
        return top_p.reshape(-1).tolist(), tokens

    def step(self, logits: torch.Tensor, branches: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The most probable allowed token of each row (`branches[i]` is row i's branch) and its
        unconstrained probability; the branches move to their next trie nodes."""
        cand = torch.from_numpy(self.candidates(branches)).to(logits.device)
        probs = logits.float().softmax(-1).gather(-1, cand.clamp(min=0)).masked_fill(cand < 0, -1.0)
        p, j = probs.max(-1)
        nxt = cand.gather(-1, j[:, None])[:, 0]
        self.advance(branches, nxt.tolist())
        return p, nxt
