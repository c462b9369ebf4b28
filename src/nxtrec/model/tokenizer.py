"""SentencePiece tokenizer plus nxtp's added special tokens.

Every id the model depends on (BOS/EOS, `<|image|>`, `<|empty|>`, the label delimiter, the
prompt) is derived here from the tokenizer file, never hard-coded, so any SentencePiece model
works (LLaMA-2's 32000 pieces, or the small ones the tests and the demo model train).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import sentencepiece as spm

from nxtrec.errors import NxtrecError


class TokenizerError(NxtrecError):
    pass


class Tokenizer:
    def __init__(self, model_file: str | Path, special_tokens: list[str], delimiter: str = ","):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise TokenizerError(f"{model_file}: tokenizer file not found (a SentencePiece .model is expected there)")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{model_file}: not a SentencePiece model ({e})") from None
        self.model_file = model_file
        self.n_pieces = self.sp.get_piece_size()
        self.special_tokens = list(special_tokens)
        self.special_ids = {t: self.n_pieces + i for i, t in enumerate(self.special_tokens)}
        self._special_re = (
            re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
            if self.special_tokens
            else None
        )
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        # -1 in LLaMA's tokenizer: as an embedding index it selects the last row (<|empty|>).
        self.pad_id = self.sp.pad_id()
        self.delimiter = delimiter
        self.delimiter_id = self.sp.piece_to_id(delimiter)
        if self.delimiter_id == self.sp.unk_id() or self.sp.id_to_piece(self.delimiter_id) != delimiter:
            raise TokenizerError(f"{model_file}: the label delimiter {delimiter!r} is not a piece of this tokenizer")

    @property
    def vocab_size(self) -> int:
        return self.n_pieces + len(self.special_tokens)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Encode text; special-token strings map to their ids, the rest to SentencePiece ids."""
        ids: list[int] = []
        parts = self._special_re.split(text) if self._special_re else [text]
        for part in parts:
            if part in self.special_ids:
                ids.append(self.special_ids[part])
            elif part:
                ids += self.sp.encode(part)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: list[int]) -> str:
        out, run = [], []
        inverse = {v: k for k, v in self.special_ids.items()}
        for i in ids:
            if i in inverse:
                out += [self.sp.decode(run), inverse[i]]
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def prompt_ids(self, image_token: str, prompt: str, trailing_space: bool = False) -> list[int]:
        """`[<|image|>, <s>, prompt...]`: encode image token + prompt with BOS, then swap the
        first two ids so the image token precedes BOS (the layout the released model saw)."""
        ids = self.encode(image_token + prompt + (" " if trailing_space else ""), bos=True)
        ids[0], ids[1] = ids[1], ids[0]
        return ids


def train_tokenizer(texts: list[str], out_file: str | Path, vocab_size: int = 512, pieces: list[str] = ()) -> Path:
    """Train a small BPE SentencePiece model with LLaMA's conventions (unk=0, bos=1, eos=2,
    no pad id, byte fallback) on `texts`. `pieces` are forced to be whole pieces."""
    out_file = Path(out_file)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        user_defined_symbols=list(pieces),
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(buf.getvalue())
    return out_file


def pad_tokenizer(model_file: str | Path, out_file: str | Path, n_pieces: int) -> Path:
    """Copy a SentencePiece model and append never-used filler pieces up to `n_pieces`
    (e.g. 32000, LLaMA's size) so benchmarks get real-sized embedding and output matrices."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    missing = n_pieces - len(proto.pieces)
    if missing < 0:
        raise TokenizerError(f"{model_file}: already has {len(proto.pieces)} > {n_pieces} pieces")
    low = min(p.score for p in proto.pieces) - 1.0
    for i in range(missing):
        piece = proto.pieces.add()
        piece.piece = f"\u2581filler{i:05d}"
        piece.score = low - i
        piece.type = pb.ModelProto.SentencePiece.NORMAL
    Path(out_file).write_bytes(proto.SerializeToString())
    return Path(out_file)
