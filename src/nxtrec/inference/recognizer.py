"""`Recognizer`: images in, ranked labels out, with PyTorch (the `Engine` of
nxtrec.inference.engine).

    from nxtrec import Recognizer
    rec = Recognizer.from_pretrained("path/to/model-dir")
    rec.predict(["photo.jpg"], top_k=10)   # [[Label("dog", 0.41), ...]]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nxtrec.errors import NxtrecError
from nxtrec.inference.attention import DEFAULT_MAP_RULE, grounded_one_shot
from nxtrec.inference.calibration import Calibration, calibration_for
from nxtrec.inference.compat import beam_options
from nxtrec.inference.compat_greedy import greedy_as_reference
from nxtrec.inference.cpu import optimize_for_cpu
from nxtrec.inference.engine import SAMPLERS, Capabilities, DecodeOptions, Preprocessing, finish_labels, predict
from nxtrec.inference.ranking import Label
from nxtrec.inference.sampling import beam_search, greedy, one_shot
from nxtrec.inference.vocab import one_shot_limits, trie_for
from nxtrec.model.directory import DTYPES, default_model_dir, load_model_dir
from nxtrec.model.image import ImageInput
from nxtrec.model.network import NxtpModel
from nxtrec.model.tokenizer import Tokenizer

GREEDY_OPTIONS = ("temperature", "top_p", "repetition_penalty", "max_new_tokens")
BEAM_OPTIONS = ("beam_size", "max_new_tokens", "length_penalty")


class Recognizer:
    capabilities = Capabilities(samplers=SAMPLERS, maps=True, needs="the PyTorch path")

    def __init__(self, model: NxtpModel, tokenizer: Tokenizer, device="cpu", name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.config = model.config
        self.name = name
        self.calibration: Calibration | None = None  # labels get a confidence with one (from_pretrained)
        self.preprocessing = Preprocessing(self.config.encoder.image_size, tuple(self.config.image_mean),
                                           tuple(self.config.image_std))  # fmt: skip
        self.vocab_size = self.config.decoder.vocab_size
        self.prompt_ids = torch.tensor(
            tokenizer.prompt_ids(self.config.image_token, self.config.prompt), device=self.device
        )

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu", dtype: str = "float32",
                        calibration: str | Path | None = None, adapter: str | Path | None = None) -> "Recognizer":  # fmt: skip
        """Load a model directory (`None`: the bundled default model). On the CPU the model is
        prepared for fast inference (nxtrec.inference.cpu); dtype "int8" (CPU only) quantises
        its Linear layers. `calibration`: a calibration file (default: the directory's
        calibration.json, when it has one), which gives every label a `confidence`. `adapter`: a
        folder of `nxtrec teach`, merged into the weights."""
        if dtype == "int8" and torch.device(device).type != "cpu":
            raise NxtrecError(f"--dtype int8 runs on the CPU only (not {device}); use bfloat16 or float16 on a GPU")
        path = Path(path or default_model_dir())
        model, tokenizer = load_model_dir(path, device=device, dtype=DTYPES["float32" if dtype == "int8" else dtype])
        if adapter:
            from nxtrec.model.adapter import apply_adapter

            apply_adapter(model, adapter, path)
        if torch.device(device).type == "cpu":
            optimize_for_cpu(model, dtype)
        name = path.resolve().name + (f"+{Path(adapter).resolve().name}" if adapter else "")
        recognizer = cls(model, tokenizer, device, name=name)
        recognizer.calibration = calibration_for(path, calibration, adapted=bool(adapter))
        return recognizer

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (float32 for an int8 model, whose embeddings stay float32)."""
        return self.model.language_decoder.tok_embeddings.weight.dtype

    def close(self) -> None:
        """Nothing to release: the weights go with the object."""

    def pixels(self, images: list[ImageInput]) -> torch.Tensor:
        return torch.from_numpy(self.preprocessing.stack(images))

    def predict(self, images: list[ImageInput] | ImageInput, top_k: int = 10, batch_size: int = 8,
                **options) -> list[list[Label]]:  # fmt: skip
        """Labels for each image (paths, bytes or PIL images). A bad image raises
        `nxtrec.image.ImageError`. Keyword arguments are `DecodeOptions`."""
        return predict(self, images, DecodeOptions.of(top_k=top_k, **options), batch_size)

    @torch.inference_mode()
    def predict_batch(self, pixels, options: DecodeOptions | None = None, **changes) -> list[list[Label]]:
        """Labels for preprocessed images [B, 3, S, S] (a tensor or a numpy array).
        `options` (or keyword arguments naming its fields):

        top_k, extra_k (one-shot): `top_k + extra_k` branches, at most `top_k` labels after
          merging. maps (one-shot only): each label also gets `Label.map`, where the decoder
          looked while writing it, a [rows, cols] grid over the image patches that sums to 1,
          from the same pass (nxtrec.inference.attention; `map_rule` picks the rule).
        sampler "greedy": `temperature`, `top_k_tokens` (1 = argmax), `top_p`,
          `repetition_penalty`, `max_new_tokens`, `seed`. "beam": `beam_size`,
          `max_new_tokens`, `length_penalty`.
        vocab (one-shot only): a tag list (file path, lines or `LabelList`); labels are decoded
          into its entries (nxtrec.inference.vocab). map_to: decode freely, then map each label
          to the nearest entry of a tag list, dropping those below `map_threshold`
          (nxtrec.inference.mapping). compat="reference": the reference implementation's
          outputs, deviations included (nxtrec.inference.compat, docs/compat.md).
        """
        options = DecodeOptions.of(options, **changes)
        options.check(self.capabilities)
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        trie = trie_for(options.vocab, self.tokenizer, self.config.prompt)
        image_tokens = self.model.encode_images(pixels.to(self.device, self.dtype))
        branches = self._sample(image_tokens, options, trie)
        wte = self.model.language_decoder.tok_embeddings.weight

        def embed_tokens(ids):
            return wte[torch.tensor(ids, device=wte.device)].float().cpu().numpy()

        return finish_labels(branches, options, self.tokenizer.decode, self.tokenizer.delimiter_id, embed_tokens,
                             lambda i: image_tokens[i].float().cpu().numpy(), trie, self.calibration)  # fmt: skip

    def _sample(self, image_tokens: torch.Tensor, options: DecodeOptions, trie):
        tok, model, prompt = self.tokenizer, self.model, self.prompt_ids
        if options.sampler == "one-shot":
            extra = {"max_label_tokens": options.max_label_tokens} if options.max_label_tokens else {}
            if options.maps:
                extra["rule"] = options.map_rule or DEFAULT_MAP_RULE
            k = options.top_k + options.extra_k
            if trie is not None:
                k, extra["max_label_tokens"] = one_shot_limits(trie, k, options.max_label_tokens)
                extra["vocab"] = trie
            sample = grounded_one_shot if options.maps else one_shot
            return sample(model, image_tokens, prompt, k, tok.delimiter_id, **extra)
        if options.sampler == "greedy":
            gen = torch.Generator(device=self.device).manual_seed(options.seed or 0)
            kwargs = options.sampler_options(*GREEDY_OPTIONS)
            top_k = options.top_k_tokens or 1
            if options.compat:
                return greedy_as_reference(model, image_tokens, prompt, tok.delimiter_id, top_k=top_k, generator=gen,
                                           **kwargs)  # fmt: skip
            return greedy(model, image_tokens, prompt, tok.eos_id, tok.delimiter_id, top_k=top_k, generator=gen, **kwargs)
        kwargs = options.sampler_options(*BEAM_OPTIONS)
        if options.compat:
            kwargs.update(beam_options(len(prompt)))
        return beam_search(model, image_tokens, prompt, tok.eos_id, tok.delimiter_id, **kwargs)
