"""`--compat reference`: each of the reference's deviations (docs/compat.md) on a hand-built
case, and that the default decoders do not have them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import nxtrec.inference.recognizer as recognizer_module
from nxtrec.inference import sampling
from nxtrec.inference.compat import (
    beam_as_reference,
    one_shot_as_reference,
    rank_ppl_as_reference,
    split_at_delimiters,
)
from nxtrec.inference.compat_greedy import (
    _penalise_as_reference,
    greedy_as_reference,
    reference_inference_mask,
)
from nxtrec.inference.ranking import Branch, rank_labels
from nxtrec.inference.recognizer import Recognizer
from nxtrec.inference.sampling import _penalise, greedy
from nxtrec.model.directory import save_model_dir
from nxtrec.model.masks import inference_mask

D = 99  # the delimiter in hand-built cases
NAMES = {5: "cat", 6: "hot", 7: "dog", 8: "sun", 9: "sky"}


def decode(ids):
    return " ".join(NAMES.get(i, f"<{i}>") for i in ids)


def test_one_shot_cap_misaligns_probabilities_and_drops_the_last_branch():
    branches = [
        Branch([5], [0.5, 0.9]),  # closed by its delimiter (probability 0.9)
        Branch([6, 7], [0.4, 0.3]),  # hit the cap: the forced delimiter has no probability
        Branch([8], [0.2, 0.8]),
        Branch([9], [0.6, 0.7]),
    ]
    out = one_shot_as_reference(branches, D)
    assert [(b.tokens, b.probs) for b in out] == [([5], [0.5, 0.9]), ([6, 7], [0.4, 0.3, 0.2]), ([8], [0.8, 0.6])]
    # without a capped branch nothing changes
    normal = [Branch([5], [0.5, 0.9]), Branch([8], [0.2, 0.8])]
    assert [(b.tokens, b.probs) for b in one_shot_as_reference(normal, D)] == [(b.tokens, b.probs) for b in normal]


def test_ppl_ranking_sorts_geometric_means_ascending():
    branches = [Branch([5], [0.9, 0.9]), Branch([7], [0.1, 0.4]), Branch([8], [0.5, 0.5]), Branch([5], [0.2, 0.2])]
    ours = rank_labels(branches, decode, "ppl")
    ref = rank_ppl_as_reference(branches, decode, None)
    assert [l.label for l in ours] == ["cat", "sun", "dog"]  # lowest perplexity (best branch) first
    assert [l.label for l in ref] == ["cat", "dog", "sun"]  # lowest geometric mean, min over branches
    assert [round(l.score, 6) for l in ref] == [0.2, 0.2, 0.5]
    assert ref[0].prob == pytest.approx(0.81 + 0.04)
    assert [l.label for l in rank_ppl_as_reference(branches, decode, 2)] == ["cat", "dog"]


def test_split_drops_the_trailing_label_and_ignores_eos():
    eos = 2
    out = split_at_delimiters([5, D, eos, 7, D, 8], [0.5, 0.9, 0.1, 0.4, 0.3, 0.2], D)
    assert [(b.tokens, b.probs) for b in out] == [([5], [0.5, 0.9]), ([eos, 7], [0.1, 0.4, 0.3])]


def test_repetition_penalty_divides_negative_logits_too():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    history = [torch.tensor([0]), torch.tensor([1])]
    assert _penalise_as_reference(logits, history, 2.0).tolist() == [[1.0, -1.0, 1.0]]
    assert _penalise(logits, [[0], [1]], 2.0).tolist() == [[1.0, -4.0, 1.0]]  # CTRL: negative ones multiplied


def test_reference_mask_blocks_earlier_labels_from_the_second_delimiter_on():
    p, prompt_len = 2, 2  # positions: image 0-1, prompt 2-3 (answer a = 3), generated from 4
    text = torch.tensor([[10, 11, 5, D, 7, D, 8]])  # delimiters at positions 5 and 7
    mask = reference_inference_mask(text, prompt_len, p, D)[0, 0]
    base = inference_mask(9, p)
    blocked = (mask != base).nonzero().tolist()
    # queries after the first delimiter (6, 7, 8) no longer see keys a..d1 = 3..5
    assert blocked == [[q, k] for q in (6, 7, 8) for k in (3, 4, 5)]
    one_delimiter = torch.tensor([[10, 11, 5, D, 7]])
    assert torch.equal(reference_inference_mask(one_delimiter, prompt_len, p, D)[0, 0], inference_mask(7, p))


def test_greedy_runs_a_fixed_number_of_steps_ignoring_eos(tokenizer):
    model = tiny_model(tokenizer, seed=3)
    calls = []

    def eos_first(module, inputs, logits):  # EOS far above every other token
        calls.append(1)
        logits[..., tokenizer.eos_id] += 100.0
        return logits

    model.language_decoder.output.register_forward_hook(eos_first)
    size = model.config.encoder.image_size
    image_tokens = model.encode_images(torch.randn(2, 3, size, size)).detach()
    prompt = torch.tensor(tokenizer.prompt_ids(model.config.image_token, model.config.prompt))
    assert greedy(model, image_tokens, prompt, tokenizer.eos_id, tokenizer.delimiter_id) == [[], []]
    default_calls = len(calls)
    calls.clear()
    out = greedy_as_reference(model, image_tokens, prompt, tokenizer.delimiter_id, max_new_tokens=7)
    assert len(calls) == 7 and default_calls == 1
    assert out == [[], []]  # seven EOS tokens, no delimiter: nothing is reported


@pytest.fixture(scope="module")
def recognizer(tokenizer, tokenizer_file, tmp_path_factory):
    model = tiny_model(tokenizer, seed=11, delimiter_bias=3.0)
    return Recognizer.from_pretrained(save_model_dir(model, tokenizer_file, tmp_path_factory.mktemp("compat") / "m"))


def test_beam_reference_options_and_zero_probabilities(recognizer, monkeypatch):
    seen = {}
    original = sampling.beam_search

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    regathers = []
    monkeypatch.setattr(recognizer_module, "beam_search", spy)
    monkeypatch.setattr(sampling, "_select_rows", lambda kvs, rows: regathers.append(rows) or kvs)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = recognizer.predict_batch(pixels, sampler="beam", compat="reference", ranking="none", max_new_tokens=12)
    assert seen["regather"] is False and seen["length_offset"] == len(recognizer.prompt_ids)
    assert regathers == []  # rows are never re-gathered by beam source
    assert all(lab.prob == 0.0 for labels in out for lab in labels)
    recognizer.predict_batch(pixels, sampler="beam", max_new_tokens=12)
    assert regathers  # the default does


def test_beam_output_drops_the_label_closed_by_eos():
    out = beam_as_reference([Branch([5], [0.5, 0.9]), Branch([7], [0.4])])
    assert [(b.tokens, b.probs) for b in out] == [([5], [0.0, 0.0])]


def test_unknown_compat_mode_is_an_error(recognizer):
    with pytest.raises(Exception, match="unknown compat mode"):
        recognizer.predict_batch(torch.zeros(1, 3, 64, 64), compat="paper")


def test_one_shot_cap_on_a_model_whose_branches_never_end(tokenizer):
    model = tiny_model(tokenizer, seed=5, delimiter_bias=0.0)
    with torch.no_grad():
        model.language_decoder.output.weight[tokenizer.delimiter_id] = 0.0
    model.language_decoder.output.register_forward_hook(
        lambda m, i, logits: logits.index_fill_(-1, torch.tensor([tokenizer.delimiter_id]), -100.0))
    size = model.config.encoder.image_size
    image_tokens = model.encode_images(torch.randn(1, 3, size, size)).detach()
    prompt = torch.tensor(tokenizer.prompt_ids(model.config.image_token, model.config.prompt))
    branches = sampling.one_shot(model, image_tokens, prompt, 5, tokenizer.delimiter_id)[0]
    assert all(len(b.tokens) == 19 and len(b.probs) == 19 for b in branches)  # all capped
    out = one_shot_as_reference(branches, tokenizer.delimiter_id)
    assert [b.tokens for b in out] == [b.tokens for b in branches[:4]]  # the last branch is dropped
    flat = [p for b in branches for p in b.probs]
    # 20 tokens (forced delimiter included) per label but 19 probabilities per branch: label 1
    # takes branch 2's first probability for its delimiter, label 2 is shifted by one, ...
    assert out[0].probs == flat[:20] and out[1].probs == flat[20:40] and out[3].probs == flat[60:80]


class TableDecoder:
    """A fake decoder: the next-token distribution depends only on the last token (`table`),
    and each row's cache is the list of tokens fed to that row, recorded at every step."""

    def __init__(self, prefix_probs, table):
        self.prefix = torch.tensor(prefix_probs).log()[None]
        self.table = {t: torch.tensor(p).log() for t, p in table.items()}
        self.contexts = []

    def __call__(self, h, mask, last_only=True):
        return self.prefix.expand(h.shape[0], -1), []

    def step(self, tokens, position, prefix_kvs, rows, own_kvs):
        self.contexts.append(own_kvs[0][0].long().tolist() if own_kvs else [])
        fed = tokens[:, None].float()
        own = fed if own_kvs is None else torch.cat([own_kvs[0][0], fed], 1)
        return torch.stack([self.table[t] for t in tokens.tolist()]), [(own, own)]


class TableModel:
    def __init__(self, decoder):
        self.language_decoder = decoder

    def prefix_embeddings(self, image_tokens, prompt_ids):
        return torch.zeros(image_tokens.shape[0], 3, 1)


def _beam_model():
    eos, delim = 2, 3  # tokens 0, 1, 4, 5 are words
    table = {
        0: [0.0, 0.0, 0.6, 0.0, 0.3, 0.1],
        1: [0.0, 0.0, 0.1, 0.0, 0.7, 0.2],
        2: [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # finished rows are still computed
        3: [0.0, 0.0, 0.0, 0.0, 0.5, 0.5],
        4: [0.0, 0.0, 0.04, 0.06, 0.0, 0.9],
        5: [0.0, 0.0, 0.7, 0.1, 0.2, 0.0],
    }
    table = {t: [p or 1e-9 for p in row] for t, row in table.items()}
    return TableModel(TableDecoder([0.6, 0.4, 1e-9, 1e-9, 1e-9, 1e-9], table)), eos, delim


def test_beam_length_normalisation_with_the_prompt_changes_the_winner():
    # finished: [0, EOS] (log-prob -1.02, 2 tokens) and [1, 4, 5, EOS] (-1.74, 4 tokens):
    # per token the second wins (-0.43 > -0.51); with 8 prompt tokens counted the first does
    # (-1.02 / 10 > -1.74 / 12)
    model, eos, delim = _beam_model()
    image = torch.zeros(1, 1, 1)
    prompt = torch.zeros(8, dtype=torch.long)
    ours = sampling.beam_search(model, image, prompt, eos, delim, beam_size=2, max_new_tokens=6)
    ref = sampling.beam_search(model, image, prompt, eos, delim, beam_size=2, max_new_tokens=6, length_offset=8)
    assert [b.tokens for b in ours[0]] == [[1, 4, 5]]
    assert [b.tokens for b in ref[0]] == [[0]]


def test_beam_rows_keep_their_context_without_regather():
    # step 1 keeps [0, EOS] (finished) and [1, 4]; both new beams continue row 1
    for regather, context in ((True, [[1, 4], [1, 4]]), (False, [[0, 2], [1, 4]])):
        model, eos, delim = _beam_model()
        sampling.beam_search(model, torch.zeros(1, 1, 1), torch.zeros(8, dtype=torch.long), eos, delim, beam_size=2,
                             max_new_tokens=6, regather=regather)
        assert model.language_decoder.contexts[2] == context
