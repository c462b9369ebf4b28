"""Model directories and conversion from the released formats, on tiny random weights
written in the real file formats (safetensors, weights_only pickles, TorchScript)."""

import json
import shutil

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file

from nxtrec.errors import NxtrecError
from nxtrec.model.convert import convert_llama, convert_nxtp, load_pickle
from nxtrec.model.directory import load_model_dir, save_model_dir
from nxtrec.model.masks import inference_mask


def test_model_directory_round_trip_is_exact(tokenizer, tokenizer_file, tmp_path):
    model = tiny_model(tokenizer)
    save_model_dir(model, tokenizer_file, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    loaded, tok = load_model_dir(tmp_path / "m")
    assert loaded.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    save_model_dir(loaded, tmp_path / "m" / "tokenizer.model", tmp_path / "m2")
    assert load_file(tmp_path / "m" / "model.safetensors").keys() == load_file(tmp_path / "m2" / "model.safetensors").keys()
    assert (tmp_path / "m" / "config.json").read_text() == (tmp_path / "m2" / "config.json").read_text()


def test_checkpoint_from_another_architecture_is_refused(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["decoder"]["dim"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NxtrecError, match=r"tensor 'vision_encoder.proj.weight' has shape \(64, 64\), the model expects \(128, 64\)"):
        load_model_dir(bad)


def test_partial_or_corrupt_checkpoints_are_clear_errors(tiny_model_dir, tmp_path):
    part = tmp_path / "part"
    shutil.copytree(tiny_model_dir, part)
    state = load_file(part / "model.safetensors")
    del state["language_decoder.norm.weight"]
    save_file(state, part / "model.safetensors")
    with pytest.raises(NxtrecError, match="missing tensor 'language_decoder.norm.weight'"):
        load_model_dir(part)
    (part / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(NxtrecError, match="cannot read safetensors"):
        load_model_dir(part)
    (part / "config.json").write_text('{"decoder": {"dimm": 3}}')
    with pytest.raises(NxtrecError, match="unknown key 'dimm' \\(did you mean 'dim'\\?\\)"):
        load_model_dir(part)
    with pytest.raises(NxtrecError, match="model directory not found"):
        load_model_dir(tmp_path / "nowhere")


def test_unsafe_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"model": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(NxtrecError, match="cannot be loaded safely with weights_only=True"):
        load_pickle(tmp_path / "evil.pth")


# --- synthetic files in the released layouts ---------------------------------------------


class _ClipHolder(torch.nn.Module):
    """Stands in for OpenAI's CLIP archive: a TorchScript module whose state dict has the
    `visual.*` tensors (with CLIP's own [width, 768] projection) and text-tower tensors."""

    def __init__(self, visual_state, width):
        super().__init__()
        self.visual = torch.nn.Module()
        for name, value in visual_state.items():
            module = self.visual
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, torch.nn.Module())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(value.clone()))
        self.visual.register_parameter("proj", torch.nn.Parameter(torch.randn(width, 768)))
        self.token_embedding = torch.nn.Embedding(10, 8)

    def forward(self, x):
        return x


def write_clip_archive(model, path):
    visual = {k.removeprefix("vision_encoder."): v.half() for k, v in model.state_dict().items()
              if k.startswith("vision_encoder.") and not k.startswith("vision_encoder.proj")}
    holder = _ClipHolder(visual, model.config.encoder.width)
    torch.jit.save(torch.jit.trace(holder, torch.zeros(1)), str(path))


def nxtp_trained_subset(model):
    """The released checkpoint's `model`: trained tensors only, prefixed with `module.`."""
    n_enc = model.config.encoder.layers
    keep = [f"vision_encoder.transformer.resblocks.{i}." for i in range(n_enc // 2, n_enc)]
    keep += ["vision_encoder.ln_post.", "vision_encoder.proj.", "language_decoder."]
    return {f"module.{k}": v.clone() for k, v in model.state_dict().items() if k.startswith(tuple(keep))}


def test_released_nxtp_layout_converts_to_matching_model(tokenizer, tokenizer_file, tmp_path):
    source = tiny_model(tokenizer, n_layers=3, seed=11)
    with torch.no_grad():  # CLIP ships fp16: keep the frozen encoder parts fp16-representable
        for k, v in source.vision_encoder.state_dict().items():
            if not k.startswith(("proj", "ln_post", "transformer.resblocks.1.")):
                v.copy_(v.half().float())
    write_clip_archive(source, tmp_path / "ViT-L-14.pt")
    torch.save({"epoch": 3, "global_step": 21360, "model": nxtp_trained_subset(source), "optimizer": {"state": {}},
                "scheduler": {"last_epoch": 5}}, tmp_path / "ckpt_epoch_03_iter_0021360.pth")
    out = convert_nxtp(tmp_path / "ckpt_epoch_03_iter_0021360.pth", tmp_path / "ViT-L-14.pt", tokenizer_file, tmp_path / "out",
                       decoder_heads=4, encoder_heads=4)
    model, _ = load_model_dir(out)
    assert model.config.encoder == source.config.encoder
    assert model.config.decoder == source.config.decoder
    pixels = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model.encode_images(pixels), source.encode_images(pixels), atol=1e-6)
        h = torch.randn(2, 9, source.config.decoder.dim)
        mask = inference_mask(9, 3)
        assert torch.allclose(model.language_decoder(h, mask)[0], source.language_decoder(h, mask)[0], atol=1e-6)


def test_nxtp_checkpoint_with_a_missing_tensor_names_it(tokenizer, tokenizer_file, tmp_path):
    source = tiny_model(tokenizer)
    write_clip_archive(source, tmp_path / "clip.pt")
    trained = nxtp_trained_subset(source)
    del trained["module.language_decoder.layers.1.feed_forward.w2.weight"]
    torch.save({"model": trained}, tmp_path / "ckpt.pth")
    with pytest.raises(NxtrecError, match="missing tensor 'language_decoder.layers.1.feed_forward.w2.weight'"):
        convert_nxtp(tmp_path / "ckpt.pth", tmp_path / "clip.pt", tokenizer_file, tmp_path / "out", decoder_heads=4, encoder_heads=4)
    assert not (tmp_path / "out").exists()


def _hf_permute(w, n_heads):
    """Meta -> Hugging Face q/k layout, as HF's conversion script does."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _meta_llama(llama, n_pieces: int) -> dict:
    """A decoder's state dict as Meta's LLaMA file holds it: the plain SentencePiece vocabulary,
    without the special-token rows."""
    meta = {k: v.clone() for k, v in llama.state_dict().items()}
    meta["tok_embeddings.weight"] = meta["tok_embeddings.weight"][:n_pieces].clone()
    meta["output.weight"] = meta["output.weight"][:n_pieces].clone()
    return meta


def _to_hf(meta: dict, n_heads: int) -> dict:
    """A Meta-layout LLaMA state dict under Hugging Face's names and q/k layout."""
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    hf = {"model.embed_tokens.weight": meta["tok_embeddings.weight"], "model.norm.weight": meta["norm.weight"], "lm_head.weight": meta["output.weight"]}
    for k, v in meta.items():
        if k.startswith("layers."):
            _, i, *rest = k.split(".")
            name = ".".join(rest[:-1])
            if name in ("attention.wq", "attention.wk"):
                v = _hf_permute(v, n_heads)
            hf[f"model.layers.{i}.{names[name]}.weight"] = v.contiguous()
    return hf


def _write_hf_dir(hf_dir, shards: list[dict], cfg, n_layers: int, tokenizer_file, index: bool = False) -> None:
    hf_dir.mkdir()
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, hf_dir / name)
        weight_map.update(dict.fromkeys(shard, name))
    if index:
        (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (hf_dir / "config.json").write_text(json.dumps({"hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
                                                    "num_hidden_layers": n_layers, "rms_norm_eps": 1e-5, "intermediate_size": cfg.hidden_dim}))
    shutil.copy(tokenizer_file, hf_dir / "tokenizer.model")


def test_llama_conversion_reads_only_the_kept_blocks(tokenizer, tokenizer_file, tmp_path):
    """With an index json, a shard holding only dropped blocks is never opened: converting
    without it gives the same bytes; keeping its blocks names the missing file."""
    llama = tiny_model(tokenizer, n_layers=4, seed=3).language_decoder
    n = tokenizer.n_pieces
    meta = _meta_llama(llama, n)
    hf = _to_hf(meta, llama.cfg.n_heads)
    late = {k: v for k, v in hf.items() if k.startswith(("model.layers.2.", "model.layers.3."))}
    early = {k: v for k, v in hf.items() if k not in late}
    _write_hf_dir(tmp_path / "hf", [early, late], llama.cfg, 4, tokenizer_file, index=True)
    write_clip_archive(tiny_model(tokenizer, seed=1), tmp_path / "clip.pt")
    full = convert_llama(tmp_path / "hf", tmp_path / "clip.pt", tmp_path / "full", decoder_layers=2, encoder_heads=4)
    (tmp_path / "hf" / "model-00002-of-00002.safetensors").unlink()
    partial = convert_llama(tmp_path / "hf", tmp_path / "clip.pt", tmp_path / "partial", decoder_layers=2, encoder_heads=4)
    assert (full / "model.safetensors").read_bytes() == (partial / "model.safetensors").read_bytes()
    with pytest.raises(NxtrecError, match="model-00002-of-00002.safetensors: file not found"):
        convert_llama(tmp_path / "hf", tmp_path / "clip.pt", tmp_path / "three", decoder_layers=3, encoder_heads=4)
    with pytest.raises(NxtrecError, match="--decoder-layers must be between 1 and 4, got 5"):
        convert_llama(tmp_path / "hf", tmp_path / "clip.pt", tmp_path / "five", decoder_layers=5, encoder_heads=4)


def test_meta_and_hugging_face_llama_load_to_the_same_logits(tokenizer, tokenizer_file, tmp_path):
    # A 4-block "LLaMA" in Meta's layout with the plain SentencePiece vocabulary.
    llama = tiny_model(tokenizer, n_layers=4, seed=7).language_decoder
    n = tokenizer.n_pieces
    meta = _meta_llama(llama, n)
    cfg = llama.cfg
    meta_dir, hf_dir = tmp_path / "meta", tmp_path / "hf"
    meta_dir.mkdir()
    torch.save(meta, meta_dir / "consolidated.00.pth")
    (meta_dir / "params.json").write_text(json.dumps({"dim": cfg.dim, "n_heads": cfg.n_heads, "n_layers": 4, "norm_eps": 1e-5, "multiple_of": 16, "vocab_size": -1}))
    shutil.copy(tokenizer_file, meta_dir / "tokenizer.model")
    hf = _to_hf(meta, cfg.n_heads)
    half = len(hf) // 2  # two shards, as HF writes them
    items = sorted(hf.items())
    _write_hf_dir(hf_dir, [dict(items[:half]), dict(items[half:])], cfg, 4, tokenizer_file)
    clip_source = tiny_model(tokenizer, seed=1)
    write_clip_archive(clip_source, tmp_path / "clip.pt")

    a_dir = convert_llama(meta_dir, tmp_path / "clip.pt", tmp_path / "a", decoder_layers=2, encoder_heads=4)
    b_dir = convert_llama(hf_dir, tmp_path / "clip.pt", tmp_path / "b", decoder_layers=2, encoder_heads=4)
    a, _ = load_model_dir(a_dir)
    b, _ = load_model_dir(b_dir)
    assert a.config.decoder.n_layers == 2 and a.config.decoder.vocab_size == n + 2
    ids = torch.randint(0, n, (2, 11))
    with torch.inference_mode():
        la = a.language_decoder(a.language_decoder.embed(ids), inference_mask(11, 0))[0]
        lb = b.language_decoder(b.language_decoder.embed(ids), inference_mask(11, 0))[0]
        # and both equal the original first two blocks
        ref = llama.language_decoder if hasattr(llama, "language_decoder") else llama
        ref.layers = ref.layers[:2]
        lr = ref(ref.embed(ids), inference_mask(11, 0))[0][..., :n]
    assert torch.allclose(la, lb, atol=1e-5)
    assert torch.allclose(la[..., :n], lr, atol=1e-5)
    # added rows: embeddings ~ N(0, 1); <|empty|> output row zero
    assert torch.equal(a.language_decoder.output.weight[-1], torch.zeros(cfg.dim))
    assert a.language_decoder.tok_embeddings.weight[n:].std() > 0.5
