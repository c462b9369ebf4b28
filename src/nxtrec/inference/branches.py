"""The bookkeeping of one-shot sampling, shared by the PyTorch and ONNX Runtime loops (each
keeps only its own arithmetic): the k branches of each image, their tokens and token
probabilities, and which of them are still being decoded (docs/design.md#one-shot-sampling).
Torch-free."""

from __future__ import annotations

from nxtrec.inference.ranking import MAX_LABEL_TOKENS, Branch, to_branches


class OpenBranches:
    """Branch i belongs to image i // k. Until `steps` is given (benchmarks: that many steps
    for every branch, as the reference runs), a branch closes when it writes the delimiter, and
    one whose first token is the delimiter is complete at once (an empty label)."""

    def __init__(self, first_tokens: list[int], first_probs: list[float], k: int, delimiter_id: int,
                 max_label_tokens: int = MAX_LABEL_TOKENS, steps: int | None = None):  # fmt: skip
        self.seqs = [[t] for t in first_tokens]
        self.probs = [[p] for p in first_probs]
        self.k, self.delimiter_id = k, delimiter_id
        self.stop_at_delimiter = steps is None
        self.steps = max_label_tokens - 1 if steps is None else steps
        self.active = [i for i, t in enumerate(first_tokens) if not (self.stop_at_delimiter and t == delimiter_id)]

    def owners(self) -> list[int]:
        """The image of each open branch."""
        return [i // self.k for i in self.active]

    def advance(self, tokens: list[int], probs: list[float]) -> list[int] | None:
        """Append each open branch's next token. Returns the positions (among the branches
        open before) of those still open when some closed, else None: the caller keeps those
        rows of its cache."""
        for branch, t, p in zip(self.active, tokens, probs):
            self.seqs[branch].append(t)
            self.probs[branch].append(p)
        if not self.stop_at_delimiter:
            return None
        keep = [i for i, t in enumerate(tokens) if t != self.delimiter_id]
        if len(keep) == len(self.active):
            return None
        self.active = [self.active[i] for i in keep]
        return keep

    def result(self) -> list[list[Branch]]:
        return to_branches(self.seqs, self.probs, self.k, self.delimiter_id)
