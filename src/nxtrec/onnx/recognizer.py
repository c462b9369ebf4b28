"""`OnnxRecognizer`: images in, ranked labels out, with ONNX Runtime only (onnxruntime, numpy,
sentencepiece; no torch). The `Engine` of nxtrec.inference.engine, like the PyTorch
`Recognizer`, and with the same labels and probabilities: same sampling, same merging of
branches, same ranking.

    from nxtrec import OnnxRecognizer
    rec = OnnxRecognizer("path/to/onnx-dir")
    rec.predict(["photo.jpg"], top_k=20)      # [[Label("dog", 0.41), ...]]

Two directory layouts (`nxtrec.onnx.format.detect_layout`): an `nxtrec export-onnx` folder,
decoded with its key/value cache, and the reference's released files (plus LLaMA-2's
`tokenizer.model` and optionally a model directory's `config.json` beside them), decoded as
the reference does (nxtrec.onnx.decoders). Token ids come from the tokenizer and the
configuration, never from constants.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nxtrec.inference.engine import Capabilities, DecodeOptions, Preprocessing, finish_labels, predict
from nxtrec.inference.ranking import MAX_LABEL_TOKENS, Branch, Label
from nxtrec.inference.vocab import one_shot_limits, trie_for
from nxtrec.model.config import ModelConfig
from nxtrec.model.tokenizer import Tokenizer
from nxtrec.onnx.calibration import export_calibration
from nxtrec.onnx.decoders import CachedDecoder, ReleasedDecoder
from nxtrec.onnx.format import MANIFEST, RELEASED_DECODER, detect_layout
from nxtrec.onnx.integrity import IntegrityError, check_sizes, load_embeddings
from nxtrec.onnx.sessions import OnnxRuntimeError, input_dtype, make_session


class OnnxRecognizer:
    """`threads`: ONNX Runtime's intra-op threads (default: its own choice, the physical cores)."""

    capabilities = Capabilities(samplers=("one-shot",), maps=False, needs="the PyTorch path (--model, not --onnx)")

    def __init__(self, path: str | Path, threads: int | None = None, tokenizer: str | Path | None = None,
                 calibration: str | Path | None = None):  # fmt: skip
        self.path, self.threads = Path(path), threads
        self.layout = detect_layout(self.path)
        if self.layout == "nxtrec":
            try:
                self._load_export(tokenizer)
            except KeyError as e:
                raise OnnxRuntimeError(f"{self.path / MANIFEST}: missing entry {e}") from None
        else:
            self._load_released(tokenizer)
        if self.embeddings.shape[0] != self.tokenizer.vocab_size:
            raise OnnxRuntimeError(
                f"{self.path}: the embedding table has {self.embeddings.shape[0]} rows, the tokenizer "
                f"{self.tokenizer.vocab_size} tokens (with {', '.join(self.config.special_tokens)}); wrong tokenizer.model?"
            )
        cfg = self.config
        self.name, self.vocab_size = self.path.resolve().name, self.embeddings.shape[0]
        self.preprocessing = Preprocessing(self.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))
        # `calibration`: a file (default: the one the export carries), for the labels' confidence
        self.calibration = export_calibration(self.path, self.manifest, calibration)

    def _tokenizer(self, file, config: ModelConfig) -> Tokenizer:
        file = Path(file) if file else self.path / "tokenizer.model"
        if not file.is_file():
            raise OnnxRuntimeError(f"{file}: tokenizer not found; put the model's SentencePiece tokenizer.model "
                                   "(LLaMA-2's for the released files) next to the ONNX files")  # fmt: skip
        self.tokenizer = Tokenizer(file, config.special_tokens, config.delimiter)
        self.prompt_ids = self.tokenizer.prompt_ids(config.image_token, config.prompt)
        self.delimiter_id = self.tokenizer.delimiter_id
        return self.tokenizer

    def _load_export(self, tokenizer):
        try:
            m = json.loads((self.path / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise OnnxRuntimeError(f"{self.path / MANIFEST}: invalid JSON ({e})") from None
        if m.get("format") != "nxtrec-onnx":
            raise OnnxRuntimeError(f"{self.path / MANIFEST}: not an nxtrec ONNX manifest")
        if m.get("version", 0) > 1:
            raise OnnxRuntimeError(f"{self.path / MANIFEST}: format version {m['version']} is newer than this nxtrec reads (1)")
        self.manifest, files = m, m["files"]
        self.config = ModelConfig.from_dict(m["config"], source=str(self.path / MANIFEST))
        self._tokenizer(tokenizer or self.path / files["tokenizer"], self.config)
        # The ids recorded at export must be the ones this tokenizer gives (same tokenizer file).
        if self.prompt_ids != m["prompt_ids"] or self.delimiter_id != m["special_ids"]["delimiter"]:
            raise OnnxRuntimeError(f"{self.path}: the tokenizer does not give the prompt/delimiter ids recorded at export")
        self.num_image_tokens, self.image_size = int(m["num_image_tokens"]), int(m["image_size"])
        try:
            check_sizes(self.path, m)  # a stat per file; hashes only on request (check_hashes)
            self.embeddings = load_embeddings(self.path / files["embeddings"])
        except IntegrityError as e:
            raise OnnxRuntimeError(str(e)) from None
        # Float weights stay memory-mapped (prepacking would copy every MatMul weight at load
        # and was not faster); int8 MatMuls need their packed layout.
        unpacked = not m.get("quantization")
        self.encoder = make_session(self.path / files["encoder"], self.threads, disable_prepacking=unpacked)
        # The step graph also computes the prefill (empty prefix and past), so one session
        # holds the decoder weights; the export's prefill graph would hold a second copy.
        step = make_session(self.path / files["step"], self.threads, disable_prepacking=unpacked)
        self.dtype = input_dtype(step)
        kv_shape = (int(m["n_heads"]), int(m["head_dim"]))
        self.decoder = CachedDecoder(step, int(m["n_layers"]), kv_shape, self.dtype, self.embed, self.delimiter_id)

    def _load_released(self, tokenizer):
        config_file = self.path / "config.json"
        self.config, self.manifest = ModelConfig.load(config_file) if config_file.is_file() else ModelConfig(), None
        missing = [f for f in ("encoder.onnx", "Wte.npz", "decoder_p1.onnx") if not (self.path / f).is_file()]
        if missing:
            raise OnnxRuntimeError(f"{self.path}: released ONNX layout incomplete, missing {', '.join(missing)}")
        parts = sorted((int(m.group(1)), p) for p in self.path.iterdir() if (m := RELEASED_DECODER.match(p.name)))
        if [i for i, _ in parts] != list(range(1, len(parts) + 1)):
            raise OnnxRuntimeError(f"{self.path}: decoder parts must be decoder_p1.onnx ... decoder_pN.onnx without gaps")
        self._tokenizer(tokenizer, self.config)
        try:
            with np.load(self.path / "Wte.npz") as z:
                self.embeddings = z["Wte"]
        except (KeyError, ValueError, OSError) as e:
            raise OnnxRuntimeError(f"{self.path / 'Wte.npz'}: expected an .npz with array 'Wte' ({e})") from None
        self.encoder = make_session(self.path / "encoder.onnx", self.threads)
        # No memory arena for the parts: without a cache their activations grow at every step,
        # and an arena would keep the largest of each.
        sessions = [make_session(p, self.threads, arena=False) for _, p in parts]
        # Image size and token count from the graphs where they are static (224 px and 257
        # tokens, class token included, for the released files), else from the config.
        shape, out = self.encoder.get_inputs()[0].shape, self.encoder.get_outputs()[0].shape
        self.image_size = shape[2] if isinstance(shape[2], int) else self.config.encoder.image_size
        self.num_image_tokens = (
            out[1] - 1 if len(out) == 3 and isinstance(out[1], int) else (self.image_size // self.config.encoder.patch_size) ** 2
        )
        self.dtype = input_dtype(sessions[0])
        self.decoder = ReleasedDecoder(sessions, self.num_image_tokens, self.dtype, self.embed, self.delimiter_id)

    def close(self) -> None:
        """Release the sessions (and with them the weights ONNX Runtime holds)."""
        self.encoder = self.decoder = None

    def pixels(self, images) -> np.ndarray:
        return self.preprocessing.stack(images)

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] float32 -> image tokens [B, P, dim] (the class token dropped)."""
        name = self.encoder.get_inputs()[0].name
        out = self.encoder.run(None, {name: np.ascontiguousarray(pixels, dtype=input_dtype(self.encoder))})[0]
        return out[:, 1:] if self.layout == "released" else out

    def prefix_embeddings(self, image_tokens: np.ndarray) -> np.ndarray:
        """[P image tokens][<|image|>][<s>][prompt] for each image, in the decoder's dtype."""
        text = np.asarray(self.embeddings[np.asarray(self.prompt_ids)], dtype=self.dtype)
        b = image_tokens.shape[0]
        return np.concatenate([image_tokens.astype(self.dtype), np.broadcast_to(text, (b, *text.shape))], axis=1)

    def embed(self, tokens) -> np.ndarray:
        """[N] ids -> [N, 1, dim]; negative ids index from the end, as the PyTorch path does."""
        return np.asarray(self.embeddings[np.asarray(tokens)], dtype=self.dtype)[:, None, :]

    def one_shot(self, image_tokens: np.ndarray, k: int, max_label_tokens: int = MAX_LABEL_TOKENS,
                 steps: int | None = None, vocab=None) -> list[list[Branch]]:  # fmt: skip
        """k branches per image (`nxtrec.inference.sampling.one_shot`); `vocab`, a `VocabTrie`."""
        return self.decoder.one_shot(self.prefix_embeddings(image_tokens), k, max_label_tokens, steps, vocab)

    def predict_batch(self, pixels: np.ndarray, options: DecodeOptions | None = None, **changes) -> list[list[Label]]:
        """Labels for preprocessed images [B, 3, S, S], as `Recognizer.predict_batch` (one-shot
        sampling; `map_to` embeds with MiniLM, so it needs PyTorch)."""
        options = DecodeOptions.of(options, **changes)
        options.check(self.capabilities)
        trie = trie_for(options.vocab, self.tokenizer, self.config.prompt)
        k, cap = options.top_k + options.extra_k, options.max_label_tokens or MAX_LABEL_TOKENS
        if trie is not None:
            k, cap = one_shot_limits(trie, k, options.max_label_tokens)
        image_tokens = self.encode(pixels)
        branches = self.one_shot(image_tokens, k, cap, vocab=trie)
        return finish_labels(branches, options, self.tokenizer.decode, self.delimiter_id,
                             lambda ids: self.embeddings[np.array(ids)], lambda i: image_tokens[i], trie,
                             self.calibration)  # fmt: skip

    def predict(self, images, top_k: int = 10, batch_size: int = 8, **options) -> list[list[Label]]:
        """Labels for each image (paths, bytes or PIL images); a bad image raises `ImageError`."""
        return predict(self, images, DecodeOptions.of(top_k=top_k, **options), batch_size)
