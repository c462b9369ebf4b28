"""The CLIP text-tower embedder (`--embedder clip`): a synthetic OpenAI-layout CLIP file (as a
TorchScript archive and as a plain state dict) and a synthetic BPE file in OpenAI's format,
checked against Hugging Face's independent CLIPTextModelWithProjection on the same weights."""

import gzip
import json

import pytest
import torch
import torch.nn as nn
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from nxtrec.errors import NxtrecError
from nxtrec.evaluation.metric import score_records
from nxtrec.model.embedders import (
    CLIPEmbedder,
    CLIPTextEncoder,
    clip_byte_alphabet,
    clip_tokenizer,
)

MERGES = ["d o", "do g</w>", "c a", "ca t</w>", "h o", "ho t</w>", "a p", "p l", "ap pl", "appl e</w>"]
WIDTH, LAYERS, EMBED_DIM, CONTEXT = 128, 2, 32, 77
VOCAB = 2 * 256 + len(MERGES) + 2
LABELS = ["dog", "cat", "hot dog", "apple", "Apple pie", "crème brûlée", "犬", "a", "",
          " ".join(["dog"] * 100)]  # longer than CLIP's 77 tokens: cut, still ending with <|endoftext|>


class OpenAICLIPStandIn(CLIPTextEncoder):
    """The text tower plus the other top-level tensors a real ViT-L-14.pt carries."""

    def __init__(self):
        super().__init__(VOCAB, CONTEXT, WIDTH, LAYERS, EMBED_DIM)
        self.visual = nn.Module()
        self.visual.proj = nn.Parameter(torch.randn(8, 4))
        self.logit_scale = nn.Parameter(torch.tensor(4.6))


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    vocab = d / "bpe_simple_vocab_16e6.txt.gz"
    vocab.write_bytes(gzip.compress(("bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(MERGES) + "\n").encode()))
    torch.manual_seed(0)
    model = OpenAICLIPStandIn().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        model.ln_final.weight.add_(1.0)
    jit_file = d / "ViT-L-14.pt"
    torch.jit.trace(model, torch.tensor([[VOCAB - 2, 300, VOCAB - 1]])).save(str(jit_file))
    state_file = d / "state_dict.pt"
    torch.save(model.state_dict(), state_file)
    return {"vocab": vocab, "jit": jit_file, "state": state_file, "model": model}


def hf_text_model(model: CLIPTextEncoder, eot: int) -> CLIPTextModelWithProjection:
    """The same weights in Hugging Face's layout (an independent implementation)."""
    cfg = CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                         num_attention_heads=WIDTH // 64, max_position_embeddings=CONTEXT, hidden_act="quick_gelu",
                         projection_dim=EMBED_DIM, layer_norm_eps=1e-5, bos_token_id=eot - 1, eos_token_id=eot,
                         pad_token_id=eot)
    hf = CLIPTextModelWithProjection(cfg).eval()
    sd = model.state_dict()
    new = {"text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T}
    for i in range(LAYERS):
        ours, theirs = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for part, w in zip("qkv", sd[ours + "attn.in_proj_weight"].chunk(3)):
            new[theirs + f"self_attn.{part}_proj.weight"] = w
        for part, b in zip("qkv", sd[ours + "attn.in_proj_bias"].chunk(3)):
            new[theirs + f"self_attn.{part}_proj.bias"] = b
        for a, b in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
            new[theirs + b + ".weight"] = sd[ours + a + ".weight"]
            new[theirs + b + ".bias"] = sd[ours + a + ".bias"]
    missing, unexpected = hf.load_state_dict(new, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    return hf


def test_tokenizer_follows_clips_vocabulary_layout(clip_files):
    tok = clip_tokenizer(clip_files["vocab"])
    alphabet = clip_byte_alphabet()
    assert len(alphabet) == len(set(alphabet)) == 256 and alphabet[0] == "!" and alphabet[-1] == chr(256 + 67)
    assert len(tok) == VOCAB
    sot, eot = VOCAB - 2, VOCAB - 1
    assert tok("Dog")["input_ids"] == [sot, 512 + MERGES.index("do g</w>"), eot]
    assert tok("hot dog")["input_ids"] == [sot, 512 + MERGES.index("ho t</w>"), 512 + MERGES.index("do g</w>"), eot]
    # a character with no merges falls back to its UTF-8 bytes, each a word-final or plain piece
    assert len(tok("犬")["input_ids"]) == 2 + 3


def test_long_labels_are_cut_to_the_context_keeping_end_of_text(clip_files):
    emb = CLIPEmbedder(clip_files["jit"], clip_files["vocab"])
    long_label = LABELS[-1]
    assert len(emb.tokenizer(long_label)["input_ids"]) > CONTEXT
    ids = emb.tokenizer([long_label, "dog"], truncation=True, max_length=CONTEXT, padding=True)["input_ids"]
    assert len(ids[0]) == CONTEXT and ids[0][0] == VOCAB - 2 and ids[0][-1] == VOCAB - 1
    assert ids[1][:3] == [VOCAB - 2, 512 + MERGES.index("do g</w>"), VOCAB - 1] and set(ids[1][3:]) == {VOCAB - 1}
    # 100 dogs cut to the context embed exactly like the 75 dogs that fill it
    torch.testing.assert_close(emb.embed([long_label]), emb.embed([" ".join(["dog"] * 75)]))


@pytest.mark.parametrize("source", ["jit", "state"])
def test_embeddings_match_hugging_face_clip(clip_files, source):
    emb = CLIPEmbedder(clip_files[source], clip_files["vocab"], batch_size=3)
    ours = emb.embed(LABELS)
    hf = hf_text_model(clip_files["model"], emb.tokenizer.eos_token_id)
    tok = emb.tokenizer(LABELS, padding=True, truncation=True, max_length=CONTEXT, return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**tok).text_embeds
    theirs = theirs / theirs.norm(dim=-1, keepdim=True)
    assert ours.shape == (len(LABELS), EMBED_DIM)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.allclose(ours[0], ours[1])


def test_clip_embedder_scores_and_cli(clip_files, tmp_path, capsys):
    from nxtrec.cli.main import main

    emb = CLIPEmbedder(clip_files["jit"], clip_files["vocab"])
    s = score_records([{"image": 1, "gt": ["dog", "cat"], "pred": ["cat", "dog"]}], [10], emb)[10]
    assert s.recall == pytest.approx(1.0) and s.precision == pytest.approx(1.0)
    preds = tmp_path / "pred.jsonl"
    preds.write_text(json.dumps({"image": "a", "gt": ["dog", "apple"], "labels": ["dog", "hot dog"]}) + "\n")
    assert main(["score", str(preds), "--embedder", "clip", "--clip-file", str(clip_files["jit"]),
                 "--clip-vocab", str(clip_files["vocab"]), "--top-k", "1", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2"]
    one = score_records([{"image": "a", "gt": ["dog", "apple"], "pred": ["dog"]}], [1], emb)[1]
    assert float(rows[0][3]) == pytest.approx(one.f1, abs=1e-5)


def test_clip_embedder_errors_are_one_line(clip_files, tmp_path, capsys):
    from nxtrec.cli.main import main

    preds = tmp_path / "pred.jsonl"
    preds.write_text(json.dumps({"image": "a", "gt": ["dog"], "labels": ["dog"]}) + "\n")
    assert main(["score", str(preds), "--embedder", "clip"]) != 0
    assert "--clip-file" in capsys.readouterr().err
    bad_vocab = tmp_path / "vocab.txt"
    bad_vocab.write_text("#version: 0.2\nd o\n")
    with pytest.raises(NxtrecError, match=f"515 tokens, but .* has {VOCAB} token embeddings"):
        CLIPEmbedder(clip_files["jit"], bad_vocab)
    not_a_vocab = tmp_path / "junk.txt.gz"
    not_a_vocab.write_bytes(b"not gzip")
    with pytest.raises(NxtrecError, match="not a CLIP BPE vocabulary"):
        clip_tokenizer(not_a_vocab)
    with pytest.raises(NxtrecError, match="CLIP BPE vocabulary not found"):
        clip_tokenizer(tmp_path / "missing.txt.gz")
    partial = {k: v for k, v in clip_files["model"].state_dict().items() if k != "ln_final.bias"}
    with pytest.raises(NxtrecError, match="ln_final.bias"):
        CLIPTextEncoder.from_state_dict(partial, "partial.pt")
