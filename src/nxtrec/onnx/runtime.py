"""Recognition with ONNX Runtime only: onnxruntime + numpy + sentencepiece (no torch).

    from nxtrec.onnx.runtime import OnnxRecognizer
    rec = OnnxRecognizer("path/to/onnx-dir")
    rec.predict(["photo.jpg"], top_k=20)      # [[Label("dog", 0.41), ...]]

Two directory layouts are recognised (`detect_layout`):

- `nxtrec`: written by `nxtrec export-onnx` (`nxtrec-onnx.json`, `encoder.onnx`,
  `embeddings.npy`, `decoder_prefill.onnx`, `decoder_step.onnx`, `tokenizer.model`). One-shot
  sampling with a key/value cache: the prompt prefix runs once, its keys/values are shared by
  the k branches of the image, and every step runs one token per unfinished branch.
- `released`: the reference project's released ONNX files (`encoder.onnx`, `Wte.npz`,
  `decoder_p1.onnx`, `decoder_p2.onnx`, `decoder_p3.onnx`) plus a `tokenizer.model` (LLaMA-2's)
  and optionally a model directory's `config.json` placed next to them. These graphs have no
  cache: as in the reference, every step re-runs the whole sequence of every branch.

Both give the labels of the PyTorch path (`nxtrec.recognizer.Recognizer`): same sampling, same
merging of branches by decoded string, same probabilities. Token ids (prompt, delimiter) come
from the tokenizer and the configuration, never from constants.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from nxtrec.errors import NxtrecError
from nxtrec.inference.compat import as_reference, check_compat, rank_ppl_as_reference
from nxtrec.inference.mapping import DEFAULT_MAP_THRESHOLD, mapper_for
from nxtrec.inference.ranking import (
    MAX_LABEL_TOKENS,
    Branch,
    Label,
    rank_labels,
    to_branches,
)
from nxtrec.inference.vocab import TrieWalk, keep_listed, one_shot_limits, trie_for
from nxtrec.model.config import ModelConfig
from nxtrec.model.image import ImageError, load_image, preprocess_array
from nxtrec.model.tokenizer import Tokenizer
from nxtrec.onnx.integrity import IntegrityError, check_sizes, load_embeddings

MANIFEST = "nxtrec-onnx.json"
RELEASED_DECODER = re.compile(r"decoder_p(\d+)\.onnx$")
NP_DTYPES = {"float32": np.float32, "float16": np.float16}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OnnxRuntimeError(NxtrecError):
    pass


# ---------------------------------------------------------------------------------------
# sessions and small numpy helpers
# ---------------------------------------------------------------------------------------


def make_session(path: str | Path, threads: int | None = None, disable_prepacking: bool = False, arena: bool = True):
    """A CPU session. `arena=False` returns activation memory to the system after each run
    (for graphs whose activation sizes keep growing, like the released no-cache decoder)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OnnxRuntimeError(f"{path}: file not found")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not arena:
        opts.enable_cpu_mem_arena = False
    if threads:
        opts.intra_op_num_threads = threads
    if disable_prepacking:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OnnxRuntimeError(f"{path}: cannot load ONNX model ({msg})") from None


def _input_dtype(session, index: int = 0):
    return ORT_TYPES.get(session.get_inputs()[index].type, np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    """float32 softmax over the last axis (what the PyTorch path computes)."""
    x = np.asarray(x, dtype=np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def topk(p: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k values and indices of each row, highest first."""
    if k > p.shape[-1]:
        raise OnnxRuntimeError(f"k={k} is larger than the vocabulary ({p.shape[-1]})")
    idx = np.argpartition(-p, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(p, idx, -1), axis=-1, kind="stable")
    idx = np.take_along_axis(idx, order, -1)
    return np.take_along_axis(p, idx, -1), idx


def inference_mask(seq_len: int, num_image_tokens: int, dtype=np.float32) -> np.ndarray:
    """Additive [S, S]: causal, plus full attention among the image tokens [0, P)."""
    i = np.arange(seq_len)
    allowed = (i[None, :] <= i[:, None]) | ((i[:, None] < num_image_tokens) & (i[None, :] < num_image_tokens))
    return np.where(allowed, 0.0, -np.inf).astype(dtype)


# ---------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------


def detect_layout(path: str | Path) -> str:
    """'nxtrec' (our export) or 'released' (the reference's files); an error says what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise OnnxRuntimeError(f"{path}: ONNX directory not found")
    if (path / MANIFEST).is_file():
        return "nxtrec"
    if (path / "decoder_p1.onnx").is_file() or (path / "Wte.npz").is_file():
        return "released"
    raise OnnxRuntimeError(
        f"{path}: not an ONNX model directory (expected {MANIFEST} from `nxtrec export-onnx`, or the released "
        "files encoder.onnx, Wte.npz, decoder_p1.onnx ... with tokenizer.model)"
    )


class OnnxRecognizer:
    """Images in, ranked labels out, with ONNX Runtime on the CPU.

    `threads`: ONNX Runtime intra-op threads (default: its own choice, the physical cores).
    `cache` (our layout): "shared" keeps one copy of the prefix keys/values per image, read by
    all its branches; "repeat" copies them once per branch after the prefill (the plain
    past-key-values scheme; kept for comparison). `use_prefill_graph` runs the prefix with
    `decoder_prefill.onnx` instead of the step graph (same numbers; a second session holding
    the decoder weights again)."""

    def __init__(self, path: str | Path, threads: int | None = None, cache: str = "shared",
                 tokenizer: str | Path | None = None, use_prefill_graph: bool = False):
        self.path = Path(path)
        self.use_prefill_graph = use_prefill_graph
        self.layout = detect_layout(self.path)
        if cache not in ("shared", "repeat"):
            raise OnnxRuntimeError(f"cache={cache!r}: choose 'shared' or 'repeat'")
        self.cache = cache
        self.threads = threads
        if self.layout == "nxtrec":
            try:
                self._load_nxtrec(tokenizer)
            except KeyError as e:
                raise OnnxRuntimeError(f"{self.path / MANIFEST}: missing entry {e}") from None
        else:
            self._load_released(tokenizer)
        self.prompt_ids = self.tokenizer.prompt_ids(self.config.image_token, self.config.prompt)
        self.delimiter_id = self.tokenizer.delimiter_id
        if self.embeddings.shape[0] != self.tokenizer.vocab_size:
            raise OnnxRuntimeError(
                f"{self.path}: the embedding table has {self.embeddings.shape[0]} rows, the tokenizer "
                f"{self.tokenizer.vocab_size} tokens (with {', '.join(self.config.special_tokens)}); wrong tokenizer.model?"
            )

    @classmethod
    def from_dir(cls, path: str | Path, **kwargs) -> "OnnxRecognizer":
        return cls(path, **kwargs)

    # -- loading -------------------------------------------------------------------------

    def _tokenizer(self, file, config: ModelConfig) -> Tokenizer:
        file = Path(file) if file else self.path / "tokenizer.model"
        if not file.is_file():
            raise OnnxRuntimeError(
                f"{file}: tokenizer not found; put the model's SentencePiece tokenizer.model (LLaMA-2's for the "
                "released files) next to the ONNX files"
            )
        return Tokenizer(file, config.special_tokens, config.delimiter)

    def _load_nxtrec(self, tokenizer):
        try:
            m = json.loads((self.path / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise OnnxRuntimeError(f"{self.path / MANIFEST}: invalid JSON ({e})") from None
        if m.get("format") != "nxtrec-onnx":
            raise OnnxRuntimeError(f"{self.path / MANIFEST}: not an nxtrec ONNX manifest")
        if m.get("version", 0) > 1:
            raise OnnxRuntimeError(f"{self.path / MANIFEST}: format version {m['version']} is newer than this nxtrec reads (1)")
        self.manifest = m
        self.config = ModelConfig.from_dict(m["config"], source=str(self.path / MANIFEST))
        files = m["files"]
        self.tokenizer = self._tokenizer(tokenizer or self.path / files["tokenizer"], self.config)
        # The ids recorded at export must be the ones this tokenizer gives (same tokenizer file).
        if self.tokenizer.prompt_ids(self.config.image_token, self.config.prompt) != m["prompt_ids"] or (
            self.tokenizer.delimiter_id != m["special_ids"]["delimiter"]
        ):
            raise OnnxRuntimeError(f"{self.path}: the tokenizer does not give the prompt/delimiter ids recorded at export")
        self.num_image_tokens = int(m["num_image_tokens"])
        self.n_layers = int(m["n_layers"])
        self.image_size = int(m["image_size"])
        try:
            check_sizes(self.path, m)  # a stat per file; hashes only on request (check_hashes)
            self.embeddings = load_embeddings(self.path / files["embeddings"])
        except IntegrityError as e:
            raise OnnxRuntimeError(str(e)) from None
        # Float weights are used where ONNX Runtime memory-maps them: prepacking would copy
        # every MatMul weight at load (5x the load time, the weights' size again in RAM) and
        # was not faster. int8 MatMuls need their packed layout (slower without).
        unpacked = not m.get("quantization")
        self.encoder = make_session(self.path / files["encoder"], self.threads, disable_prepacking=unpacked)
        # The step graph also computes the prefill (empty prefix and past), so one session
        # holds the decoder weights; the dedicated prefill graph would hold a second copy.
        self.step_session = make_session(self.path / files["step"], self.threads, disable_prepacking=unpacked)
        self.prefill_session = (make_session(self.path / files["prefill"], self.threads, disable_prepacking=unpacked)
                                if self.use_prefill_graph else None)
        self.dtype = _input_dtype(self.step_session)
        self.kv_names = {p: [f"{p}_{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]
                         for p in ("prefix", "past")}
        self.kv_shape = (int(m["n_heads"]), int(m["head_dim"]))

    def _load_released(self, tokenizer):
        config_file = self.path / "config.json"
        self.config = ModelConfig.load(config_file) if config_file.is_file() else ModelConfig()
        self.manifest = None
        missing = [f for f in ("encoder.onnx", "Wte.npz", "decoder_p1.onnx") if not (self.path / f).is_file()]
        if missing:
            raise OnnxRuntimeError(f"{self.path}: released ONNX layout incomplete, missing {', '.join(missing)}")
        parts = sorted((int(m.group(1)), p) for p in self.path.iterdir() if (m := RELEASED_DECODER.match(p.name)))
        if [i for i, _ in parts] != list(range(1, len(parts) + 1)):
            raise OnnxRuntimeError(f"{self.path}: decoder parts must be decoder_p1.onnx ... decoder_pN.onnx without gaps")
        self.tokenizer = self._tokenizer(tokenizer, self.config)
        try:
            with np.load(self.path / "Wte.npz") as z:
                self.embeddings = z["Wte"]
        except (KeyError, ValueError, OSError) as e:
            raise OnnxRuntimeError(f"{self.path / 'Wte.npz'}: expected an .npz with array 'Wte' ({e})") from None
        self.encoder = make_session(self.path / "encoder.onnx", self.threads)
        # No memory arena for the parts: without a cache their activations grow at every step,
        # and an arena keeps the largest of each (13 GB instead of 9 GB peak at 1.78B).
        self.parts = [make_session(p, self.threads, arena=False) for _, p in parts]
        # Image size and token count from the graphs where they are static (224 px and 257
        # tokens, class token included, for the released files), else from the config.
        shape = self.encoder.get_inputs()[0].shape
        self.image_size = shape[2] if isinstance(shape[2], int) else self.config.encoder.image_size
        out = self.encoder.get_outputs()[0].shape
        self.num_image_tokens = (
            out[1] - 1 if len(out) == 3 and isinstance(out[1], int) else (self.image_size // self.config.encoder.patch_size) ** 2
        )
        self.dtype = _input_dtype(self.parts[0])

    # -- the pipeline ----------------------------------------------------------------------

    def pixels(self, images) -> np.ndarray:
        cfg = self.config
        return np.stack([preprocess_array(load_image(im), self.image_size, cfg.image_mean, cfg.image_std) for im in images])

    def encode(self, pixels: np.ndarray) -> np.ndarray:
        """[B, 3, S, S] float32 -> image tokens [B, P, dim] (the class token dropped)."""
        name = self.encoder.get_inputs()[0].name
        out = self.encoder.run(None, {name: np.ascontiguousarray(pixels, dtype=_input_dtype(self.encoder))})[0]
        if self.layout == "released":
            out = out[:, 1:]
        return out

    def prefix_embeddings(self, image_tokens: np.ndarray) -> np.ndarray:
        """[P image tokens][<|image|>][<s>][prompt] for each image, in the decoder's dtype."""
        text = np.asarray(self.embeddings[np.asarray(self.prompt_ids)], dtype=self.dtype)
        b = image_tokens.shape[0]
        return np.concatenate([image_tokens.astype(self.dtype), np.broadcast_to(text, (b, *text.shape))], axis=1)

    def embed(self, tokens) -> np.ndarray:
        """[N] ids -> [N, 1, dim]; negative ids index from the end, as the PyTorch path does."""
        return np.asarray(self.embeddings[np.asarray(tokens)], dtype=self.dtype)[:, None, :]

    def one_shot(self, image_tokens: np.ndarray, k: int, max_label_tokens: int = MAX_LABEL_TOKENS,
                 steps: int | None = None, vocab=None) -> list[list[Branch]]:
        """k branches per image (see `nxtrec.sampling.one_shot`). `steps` fixes the number of
        greedy steps after the top-k step and keeps every branch running (benchmarks). `vocab`
        (a `VocabTrie`) restricts the branches to a tag list (nxtrec.inference.vocab)."""
        if self.layout == "released":
            return self.one_shot_no_cache(image_tokens, k, max_label_tokens, steps, vocab=vocab)
        x = self.prefix_embeddings(image_tokens)
        logits, kv = self.prefill(x)
        results = []
        for b in range(x.shape[0]):
            prefix = [t[b : b + 1] for t in kv]
            results += self.continue_branches(logits[b : b + 1], prefix, x.shape[1], k, max_label_tokens, steps, vocab)
        return results

    def prefill(self, x: np.ndarray):
        """Prefix embeddings [B, L, dim] -> next-token logits [B, vocab] and every layer's
        keys/values [B, H, L, D]."""
        if self.prefill_session is not None:
            out = self.prefill_session.run(None, {"inputs_embeds": x})
        else:
            empty = np.zeros((x.shape[0], *self.kv_shape[:1], 0, self.kv_shape[1]), dtype=self.dtype)
            feed = {"inputs_embeds": x, "position": np.array(0, dtype=np.int64)}
            feed.update((name, empty) for name in self.kv_names["prefix"] + self.kv_names["past"])
            out = self.step_session.run(None, feed)
        return out[0], out[1:]

    def step(self, tokens, position: int, prefix, past):
        """One token per branch: logits [N, vocab] and the branches' own keys/values."""
        feed = {"inputs_embeds": self.embed(tokens), "position": np.array(position, dtype=np.int64)}
        feed.update(zip(self.kv_names["prefix"], prefix))
        feed.update(zip(self.kv_names["past"], past))
        out = self.step_session.run(None, feed)
        return out[0], out[1:]

    def continue_branches(self, logits, prefix, prefix_len: int, k: int, max_label_tokens: int = MAX_LABEL_TOKENS,
                          steps: int | None = None, vocab=None) -> list[list[Branch]]:
        """One image, after its prefill (`logits` [1, vocab], `prefix` keys/values [1, H, L, D]):
        top-k, then greedy steps over the unfinished branches with the step graph."""
        walk = None if vocab is None else TrieWalk(vocab)
        first_p, first = topk(softmax(logits), k) if walk is None else walk.first(softmax(logits), k)
        tokens = first.reshape(-1)
        seqs = [[int(t)] for t in tokens]
        probs = [[float(p)] for p in first_p.reshape(-1)]
        delim = self.delimiter_id
        stop_at_delimiter = steps is None
        n_steps = max_label_tokens - 1 if steps is None else steps
        active = [i for i in range(k) if not (stop_at_delimiter and seqs[i][0] == delim)]
        tokens = tokens[active]
        if self.cache == "repeat":  # one prefix copy per branch, made once
            prefix = [np.repeat(t, len(active), axis=0) for t in prefix]
        past = [np.zeros((len(active), *t.shape[1:2], 0, t.shape[3]), dtype=t.dtype) for t in prefix]
        for step in range(n_steps):
            if not active:
                break
            logits, past = self.step(tokens, prefix_len + step, prefix, past)
            p = softmax(logits)
            if walk is None:
                nxt = p.argmax(-1)
                pmax = p[np.arange(len(nxt)), nxt]
            else:
                pmax, nxt = walk.step(p, active)
            for branch, t, pt in zip(active, nxt.tolist(), pmax.tolist()):
                seqs[branch].append(t)
                probs[branch].append(pt)
            if stop_at_delimiter:
                keep = np.flatnonzero(nxt != delim)
                if len(keep) < len(active):
                    active = [active[i] for i in keep]
                    past = [t[keep] for t in past]
                    if self.cache == "repeat":
                        prefix = [t[keep] for t in prefix]
                    nxt = nxt[keep]
            tokens = nxt
        return to_branches(seqs, probs, k, delim)

    def run_released(self, x: np.ndarray) -> np.ndarray:
        """Released layout: the decoder parts on a whole sequence -> last-position logits."""
        s = x.shape[1]
        mask = np.ascontiguousarray(
            np.broadcast_to(inference_mask(s, self.num_image_tokens, self.dtype), (x.shape[0], 1, s, s))
        )
        h = x
        for part in self.parts:
            h = part.run(None, {"input": h, "mask": mask})[0]
        return h

    def one_shot_no_cache(self, image_tokens, k: int, max_label_tokens: int = MAX_LABEL_TOKENS,
                          steps: int | None = None, prefix_logits: np.ndarray | None = None,
                          vocab=None) -> list[list[Branch]]:
        """Released layout, the reference's loop: every step re-runs the whole sequence of all
        branches (no cache), finished branches included, until every branch has emitted the
        delimiter. `prefix_logits`: the prefix's logits when the caller computed them already."""
        x = self.prefix_embeddings(image_tokens)
        logits = self.run_released(x) if prefix_logits is None else prefix_logits
        walk = None if vocab is None else TrieWalk(vocab)
        first_p, first = topk(softmax(logits), k) if walk is None else walk.first(softmax(logits), k)
        tokens = first.reshape(-1)
        seqs = [[int(t)] for t in tokens]
        probs = [[float(p)] for p in first_p.reshape(-1)]
        x = np.repeat(x, k, axis=0)
        open_ = np.ones(len(tokens), dtype=bool)
        n_steps = max_label_tokens - 1 if steps is None else steps
        for _ in range(n_steps):
            x = np.concatenate([x, self.embed(tokens)], axis=1)
            p = softmax(self.run_released(x))
            if walk is None:
                tokens = p.argmax(-1)
                pmax = p[np.arange(len(tokens)), tokens]
            else:
                pmax, tokens = walk.step(p, list(range(len(tokens))))
            for branch, (t, pt) in enumerate(zip(tokens.tolist(), pmax.tolist())):
                seqs[branch].append(t)
                probs[branch].append(pt)
            open_ &= tokens != self.delimiter_id
            if steps is None and not open_.any():
                break
        return to_branches(seqs, probs, k, self.delimiter_id)

    def predict_batch(self, pixels: np.ndarray, top_k: int = 10, extra_k: int = 0, ranking: str = "prob",
                      max_label_tokens: int | None = None, vocab=None, map_to=None, map_threshold: float = DEFAULT_MAP_THRESHOLD,
                      compat: str | None = None) -> list[list[Label]]:
        """Labels for preprocessed images [B, 3, S, S]: `top_k + extra_k` branches, at most
        `top_k` labels after merging. `vocab`, `map_to` / `map_threshold` and `compat` as in
        `Recognizer.predict_batch` (`map_to` embeds with MiniLM, so it needs PyTorch)."""
        if top_k < 1:
            raise OnnxRuntimeError(f"top_k must be >= 1 (got {top_k})")
        check_compat(compat)
        trie = trie_for(vocab, self.tokenizer, self.config.prompt)
        k, cap = top_k + extra_k, max_label_tokens or MAX_LABEL_TOKENS
        if trie is not None:
            k, cap = one_shot_limits(trie, k, max_label_tokens)
        image_tokens = self.encode(pixels)
        branches = self.one_shot(image_tokens, k, cap, vocab=trie)
        if compat:
            branches = as_reference("one-shot", branches, self.delimiter_id)
        decode = self.tokenizer.decode
        if trie is not None:
            branches, decode = [keep_listed(b, trie) for b in branches], trie.label
        if compat and ranking == "ppl":
            labels = [rank_ppl_as_reference(br, decode, top_k) for br in branches]
        else:
            labels = [
                rank_labels(br, decode, ranking, top_k, embed_tokens=lambda ids: self.embeddings[np.array(ids)],
                            image_tokens=img, delimiter_id=self.delimiter_id)
                for br, img in zip(branches, image_tokens)
            ]
        mapper = mapper_for(map_to, map_threshold)
        return labels if mapper is None else [mapper.map(labs, top_k) for labs in labels]

    def predict(self, images, top_k: int = 10, batch_size: int = 8, **kwargs) -> list[list[Label]]:
        """Labels for each image (paths, bytes or PIL images); a bad image raises `ImageError`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out: list[list[Label]] = []
        for i in range(0, len(images), batch_size):
            out += self.predict_batch(self.pixels(images[i : i + batch_size]), top_k=top_k, **kwargs)
        return out


def predict_paths(onnx_dir: str | Path, paths: list[str], top_k: int = 20, batch_size: int = 8,
                  threads: int | None = None, **kwargs):
    """For `nxtrec predict --onnx DIR`: yields (path, labels as dicts, None) or
    (path, None, error message) per image, in order, batch by batch (unreadable images are
    skipped with their message; the rest of the batch still runs)."""
    rec = OnnxRecognizer(onnx_dir, threads=threads)
    batch_size = max(1, batch_size)
    for start in range(0, len(paths), batch_size):
        good, arrays = [], []
        for path in paths[start : start + batch_size]:
            try:
                img = load_image(path)
                arrays.append(preprocess_array(img, rec.image_size, rec.config.image_mean, rec.config.image_std))
                good.append(path)
            except ImageError as e:
                yield path, None, str(e)
        if arrays:
            for path, labels in zip(good, rec.predict_batch(np.stack(arrays), top_k=top_k, **kwargs)):
                yield path, [lab.to_dict() for lab in labels], None


__all__ = ["OnnxRecognizer", "Label", "Branch", "predict_paths", "detect_layout", "rank_labels", "make_session"]

