import random

import torch

from nxtrec.model.masks import inference_mask, training_mask

NEG = float("-inf")


def slow_inference_mask(s, p):
    m = [[NEG] * s for _ in range(s)]
    for i in range(s):
        for j in range(s):
            if j <= i or (i < p and j < p):
                m[i][j] = 0.0
    return torch.tensor(m)


def slow_training_mask(tokens, a, delim, p):
    """Section 7 followed literally: inference mask, block keys > a, then re-open a causal
    triangle over each delimiter-closed segment [a, d1], [d1+1, d2], ..."""
    s = len(tokens)
    m = slow_inference_mask(s, p)
    for i in range(s):
        for j in range(a + 1, s):
            m[i][j] = NEG
    start = a
    for d in [i for i in range(a + 1, s) if tokens[i] == delim]:
        for i in range(start, d + 1):
            for j in range(start, i + 1):
                m[i][j] = 0.0
        start = d + 1
    return m


def test_inference_mask_matches_slow_construction():
    for s, p in [(1, 1), (7, 3), (20, 16), (12, 0)]:
        assert torch.equal(inference_mask(s, p), slow_inference_mask(s, p))


def test_training_mask_matches_slow_construction_on_random_layouts():
    rng = random.Random(0)
    delim, p, prompt_len = 9, 5, 4
    for trial in range(40):
        b = rng.randint(1, 4)
        s = p + prompt_len + rng.randint(0, 14)
        a = p + prompt_len - 1
        tokens = torch.randint(10, 50, (b, s), generator=torch.Generator().manual_seed(trial))
        for row in range(b):
            for pos in range(a + 1, s):
                if rng.random() < 0.3:
                    tokens[row, pos] = delim
        if trial % 5 == 0:
            tokens[:, a + 1] = delim  # a delimiter right after the prompt (empty first label)
        got = training_mask(tokens, a, delim, p)
        assert got.shape == (b, 1, s, s)
        for row in range(b):
            assert torch.equal(got[row, 0], slow_training_mask(tokens[row].tolist(), a, delim, p)), (trial, row)


def test_training_mask_ignores_delimiters_inside_the_prompt():
    p, a, delim = 2, 5, 9
    tokens = torch.tensor([[0, 0, 9, 3, 3, 3, 4, 9, 4, 4]])
    mask = training_mask(tokens, a, delim, p)[0, 0]
    # labels after `a`: segment [5, 7] closed by the delimiter at 7; 8 and 9 see only <= a.
    assert mask[7, 6] == 0 and mask[7, 5] == 0 and mask[6, 7] == NEG
    assert mask[8, 7] == NEG and mask[9, 8] == NEG and mask[9, 5] == 0
    assert (mask[:2, :2] == 0).all()  # image tokens attend to each other both ways
