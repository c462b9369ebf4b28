"""Decoding into a tag list (`--vocab`): the list format, the token trie, and constrained
one-shot sampling on random tiny models and random lists."""

from __future__ import annotations

import contextlib
import io
import json
import random

import numpy as np
import pytest
import torch
from conftest import tiny_model

from nxtrec.cli.main import main
from nxtrec.inference.mapping import LabelMapper
from nxtrec.inference.ranking import Label
from nxtrec.inference.recognizer import Recognizer
from nxtrec.inference.sampling import one_shot, prefill
from nxtrec.inference.vocab import LabelList, VocabError, VocabTrie, as_label_list
from nxtrec.model.directory import save_model_dir
from nxtrec.model.masks import inference_mask

PROMPT = "The objects in the image are"
WORDS = ["cat", "dog", "car", "cart", "card", "tree", "apple", "table", "bear", "bean", "red", "stop", "snake",
         "ring", "plane", "pear", "dish", "fish", "ox", "zebra"]


def random_list(rng: random.Random, n: int) -> LabelList:
    """Entries mixing single words, words that are prefixes of others (car / cart), multi-word
    entries that extend single ones (cat / cat food) and synonyms."""
    lines = []
    for _ in range(n):
        form = " ".join(rng.sample(WORDS, rng.choice([1, 1, 2, 3])))
        if rng.random() < 0.3:
            form += " | " + rng.choice(WORDS) + " " + rng.choice(WORDS)
        lines.append(form)
    return LabelList.from_lines(lines)


# ---------------------------------------------------------------------------------------
# the list file
# ---------------------------------------------------------------------------------------


def test_list_file_format(tmp_path):
    path = tmp_path / "tags.txt"
    path.write_text("# my tags\n\ntv | television | television set\n  dog  \ncat|kitten\ntelevision\n")
    labels = LabelList.load(path)
    assert labels.entries == (("tv", "television", "television set"), ("dog",), ("cat", "kitten"))
    assert labels.names == ["tv", "dog", "cat"]  # "television" twice: its first entry keeps it
    assert as_label_list(path) == labels and as_label_list(["a", "b|c"]).entries == (("a",), ("b", "c"))


@pytest.mark.parametrize("text,message", [("", "empty"), ("# only a comment\n\n", "empty"), ("a\n | \n", ":2: an entry")])
def test_list_file_errors(tmp_path, text, message):
    path = tmp_path / "tags.txt"
    path.write_text(text)
    with pytest.raises(VocabError, match=message):
        LabelList.load(path)
    with pytest.raises(VocabError, match="not found"):
        LabelList.load(tmp_path / "missing.txt")


def test_trie_allows_the_delimiter_only_where_a_form_ends(tokenizer):
    trie = VocabTrie(LabelList.from_lines(["cat", "cat food | cat chow", "car"]), tokenizer, PROMPT)
    cat = tokenizer.encode(PROMPT + " cat")[len(tokenizer.encode(PROMPT)):]
    node = 0
    for t in cat:
        assert tokenizer.delimiter_id not in trie.allowed[node]
        node = trie.child(node, t)
    assert tokenizer.delimiter_id in trie.allowed[node]  # "cat" ends here, "cat food" continues
    assert len(trie.allowed[node]) >= 2
    chow = tokenizer.encode(PROMPT + " cat chow")[len(tokenizer.encode(PROMPT)):]
    assert trie.label(chow) == "cat food" and trie.label(cat) == "cat" and trie.label([]) is None
    assert tokenizer.delimiter_id not in trie.first_ids
    with pytest.raises(VocabError, match="delimiter"):
        VocabTrie(LabelList.from_lines(["salt, pepper"]), tokenizer, PROMPT)


# ---------------------------------------------------------------------------------------
# constrained one-shot sampling
# ---------------------------------------------------------------------------------------


def _unconstrained_probs(model, image_tokens, prompt_ids, tokens, delimiter_id):
    """The model's softmax probability of each token of a branch (delimiter appended), by
    running the whole sequence without a cache."""
    dec = model.language_decoder
    x = model.prefix_embeddings(image_tokens, prompt_ids)
    seq = torch.tensor(tokens + [delimiter_id])
    x = torch.cat([x, dec.embed(seq[:-1])[None]], 1)
    logits, _ = dec(x, inference_mask(x.shape[1], image_tokens.shape[1]))
    n = len(prompt_ids) + image_tokens.shape[1]
    probs = logits[0, n - 1 :].float().softmax(-1)
    return probs, probs[torch.arange(len(seq)), seq]


@pytest.mark.parametrize("seed", [0, 1, 2])
@torch.inference_mode()
def test_constrained_labels_are_listed_and_probabilities_are_the_models(tokenizer, seed):
    rng = random.Random(seed)
    model = tiny_model(tokenizer, n_layers=2, seed=seed, delimiter_bias=rng.choice([0.0, 2.0]))
    labels = random_list(rng, rng.randint(3, 25))
    trie = VocabTrie(labels, tokenizer, PROMPT)
    prompt_ids = torch.tensor(tokenizer.prompt_ids("<|image|>", PROMPT))
    torch.manual_seed(seed)
    image_tokens = model.encode_images(torch.randn(2, 3, 64, 64))
    k = rng.randint(1, trie.max_branches)
    branches = one_shot(model, image_tokens, prompt_ids, k, tokenizer.delimiter_id, trie.max_tokens + 1, vocab=trie)
    logits, _, _ = prefill(model, image_tokens, prompt_ids)
    for img, image_branches in enumerate(branches):
        assert len(image_branches) == k
        first = logits[img].float().softmax(-1)[torch.from_numpy(trie.first_ids)].topk(k).indices
        assert sorted(b.tokens[0] for b in image_branches) == sorted(trie.first_ids[first.numpy()].tolist())
        for br in image_branches:
            assert trie.label(br.tokens) in labels.names  # never a label outside the list
            assert len(br.probs) == len(br.tokens) + 1  # closed by the delimiter
            full, own = _unconstrained_probs(model, image_tokens[img : img + 1], prompt_ids, br.tokens,
                                             tokenizer.delimiter_id)
            np.testing.assert_allclose(br.probs, own.numpy(), rtol=1e-4, atol=1e-7)
            # each greedy step took the most probable token the trie allowed
            node = trie.child(0, br.tokens[0])
            for step, t in enumerate(br.tokens[1:] + [tokenizer.delimiter_id], start=1):
                allowed = torch.from_numpy(trie.allowed[node])
                assert t == allowed[full[step, allowed].argmax()].item()
                node = trie.child(node, t)


def test_recognizer_vocab_batches_synonyms_and_every_k(tokenizer, tokenizer_file, tmp_path):
    model_dir = save_model_dir(tiny_model(tokenizer, seed=4), tokenizer_file, tmp_path / "model")
    rec = Recognizer.from_pretrained(model_dir)
    lines = ["dog | puppy | hound", "cat", "cat food", "car", "cart", "red apple", "apple"]
    names = [line.split("|")[0].strip() for line in lines]
    trie = VocabTrie(LabelList.from_lines(lines), tokenizer, rec.config.prompt)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for k in (1, 4, len(lines) + 1):  # beyond the distinct first tokens: fewer branches, no error
        out = rec.predict_batch(pixels, top_k=k, vocab=lines)
        assert len(out) == 3
        for labels in out:
            assert 1 <= len(labels) <= min(k, trie.max_branches)
            assert {lab.label for lab in labels} <= set(names)
            assert [lab.prob for lab in labels] == sorted((lab.prob for lab in labels), reverse=True)
    one_by_one = [rec.predict_batch(pixels[i : i + 1], top_k=5, vocab=lines)[0] for i in range(3)]
    together = rec.predict_batch(pixels, top_k=5, vocab=lines)
    for a, b in zip(one_by_one, together):
        assert [x.label for x in a] == [x.label for x in b]
        np.testing.assert_allclose([x.prob for x in a], [x.prob for x in b], rtol=1e-5)
    # synonyms reached by different branches are summed under the first form
    words = rec.predict_batch(pixels[:1], top_k=3, vocab=["dog | puppy | hound"])[0]
    assert [lab.label for lab in words] == ["dog"]
    per_form = [rec.predict_batch(pixels[:1], top_k=1, vocab=[f])[0][0].prob for f in ("dog", "puppy", "hound")]
    assert words[0].prob == pytest.approx(sum(per_form), rel=1e-5)


def test_vocab_with_another_sampler_is_an_error(tokenizer, tokenizer_file, tmp_path):
    rec = Recognizer.from_pretrained(save_model_dir(tiny_model(tokenizer), tokenizer_file, tmp_path / "m"))
    with pytest.raises(Exception, match="one-shot"):
        rec.predict_batch(torch.randn(1, 3, 64, 64), sampler="greedy", vocab=["dog"])


def test_predict_cli_vocab(tokenizer, tokenizer_file, tmp_path):
    model_dir = save_model_dir(tiny_model(tokenizer, seed=5), tokenizer_file, tmp_path / "model")
    tags = tmp_path / "tags.txt"
    tags.write_text("# tags\nsnake | serpent\nring\nstar\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["predict", "examples/scene.jpg", "--model", str(model_dir), "--vocab", str(tags), "--json", "--top-k", "3"])
    assert code == 0
    labels = json.loads(out.getvalue())["labels"]
    assert labels and {x["label"] for x in labels} <= {"snake", "ring", "star"}
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["predict", "examples/scene.jpg", "--model", str(model_dir), "--vocab", str(empty)])
    assert code == 2 and "tag list is empty" in err.getvalue()


# ---------------------------------------------------------------------------------------
# --map-to
# ---------------------------------------------------------------------------------------


class TableEmbedder:
    """Fixed unit vectors per string (the real MiniLM is tested in test_metric_tokens)."""

    def __init__(self, table):
        self.table = {k: torch.nn.functional.normalize(torch.tensor(v, dtype=torch.float32), dim=0) for k, v in table.items()}

    def embed(self, texts):
        return torch.stack([self.table[t] for t in texts])


def test_map_to_sums_per_entry_and_drops_below_threshold():
    embedder = TableEmbedder({"dog": [1, 0, 0], "puppy": [0.9, 0.1, 0], "cat": [0, 1, 0], "hound": [0.95, 0, 0.05],
                              "kitten": [0.1, 0.9, 0], "car": [0, 0, 1], "sky": [0.4, 0.4, -0.8]})
    mapper = LabelMapper(LabelList.from_lines(["dog | puppy", "cat", "car"]), threshold=0.5, embedder=embedder)
    out = mapper.map([Label("hound", 0.3), Label("kitten", 0.25), Label("sky", 0.2), Label("dog", 0.1)])
    assert [(x.label, round(x.prob, 6)) for x in out] == [("dog", 0.4), ("cat", 0.25)]
    assert mapper.map([]) == []


def test_map_to_merges_grounding_maps_by_probability():
    embedder = TableEmbedder({"dog": [1, 0], "hound": [0.95, 0.05], "cat": [0, 1]})
    mapper = LabelMapper(LabelList.from_lines(["dog", "cat"]), threshold=0.5, embedder=embedder)
    left, right = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    out = mapper.map([Label("hound", 0.3, map=left), Label("dog", 0.1, map=right), Label("cat", 0.2, map=right)])
    assert [x.label for x in out] == ["dog", "cat"]
    np.testing.assert_allclose(out[0].map, [[0.75, 0.25]], rtol=1e-6)
    np.testing.assert_allclose(out[1].map, right)
    assert mapper.map([Label("dog", 0.5)])[0].map is None


@pytest.mark.slow  # packs scenes with spaCy and loads MiniLM
def test_eval_cli_vocab_and_map_to(tiny_model_dir, tmp_path, capsys):
    from nxtrec.data.synth import generate, write_tag_list

    generate(tmp_path / "synth", n=0, n_val=4, size=96, shard_size=4, progress=False)
    tags = write_tag_list(tmp_path / "tags.txt")
    names = set(LabelList.load(tags).names)
    base = ["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "synth" / "val"), "--top-k", "3",
            "--batch-size", "4", "--workers", "0"]
    for option in ("--vocab", "--map-to"):
        out = tmp_path / f"{option[2:]}.json"
        assert main([*base, option, str(tags), "--out", str(out)]) == 0
        rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
        assert len(rows) == 4 and all({p["label"] for p in r["pred"]} <= names for r in rows)
        assert json.loads(out.read_text())[option[2:].replace("-", "_")] == str(tags)
    assert main([*base, "--vocab", str(tags), "--map-to", str(tags)]) == 2
    assert "not both" in capsys.readouterr().err
