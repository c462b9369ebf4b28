"""`Recognizer`: images in, ranked labels out.

    from nxtrec import Recognizer
    rec = Recognizer.from_pretrained("path/to/model-dir")
    rec.predict(["photo.jpg"], top_k=10)   # [[Label("dog", 0.41), ...]]
"""

from __future__ import annotations

from pathlib import Path

import torch

from nxtrec.errors import NxtrecError
from nxtrec.inference.attention import DEFAULT_MAP_RULE, grounded_one_shot
from nxtrec.inference.compat import (
    as_reference,
    beam_options,
    check_compat,
    rank_ppl_as_reference,
)
from nxtrec.inference.compat_greedy import greedy_as_reference
from nxtrec.inference.cpu import optimize_for_cpu
from nxtrec.inference.mapping import DEFAULT_MAP_THRESHOLD, mapper_for
from nxtrec.inference.ranking import Label, rank_labels
from nxtrec.inference.sampling import beam_search, greedy, one_shot
from nxtrec.inference.vocab import keep_listed, one_shot_limits, trie_for
from nxtrec.model.directory import DTYPES, default_model_dir, load_model_dir
from nxtrec.model.image import ImageInput, load_image, preprocess
from nxtrec.model.network import NxtpModel
from nxtrec.model.tokenizer import Tokenizer

SAMPLERS = ("one-shot", "greedy", "beam")


class Recognizer:
    def __init__(self, model: NxtpModel, tokenizer: Tokenizer, device="cpu"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.config = model.config
        self.prompt_ids = torch.tensor(
            tokenizer.prompt_ids(self.config.image_token, self.config.prompt), device=self.device
        )

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str = "cpu", dtype: str = "float32") -> "Recognizer":
        """Load a model directory (`None`: the bundled default model). On the CPU the model is
        prepared for fast inference (nxtrec.inference.cpu); dtype "int8" (CPU only) quantises
        its Linear layers."""
        if dtype == "int8" and torch.device(device).type != "cpu":
            raise NxtrecError(f"--dtype int8 runs on the CPU only (not {device}); use bfloat16 or float16 on a GPU")
        model, tokenizer = load_model_dir(path or default_model_dir(), device=device,
                                          dtype=DTYPES["float32" if dtype == "int8" else dtype])
        if torch.device(device).type == "cpu":
            optimize_for_cpu(model, dtype)
        return cls(model, tokenizer, device)

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (float32 for an int8 model, whose embeddings stay float32)."""
        return self.model.language_decoder.tok_embeddings.weight.dtype

    def pixels(self, images: list[ImageInput]) -> torch.Tensor:
        cfg = self.config
        return torch.stack(
            [preprocess(load_image(im), cfg.encoder.image_size, cfg.image_mean, cfg.image_std) for im in images]
        )

    def predict(self, images: list[ImageInput] | ImageInput, top_k: int = 10, batch_size: int = 8, **kwargs) -> list[list[Label]]:
        """Labels for each image (paths, bytes or PIL images). A bad image raises
        `nxtrec.image.ImageError`. Keyword arguments go to `predict_batch`."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out: list[list[Label]] = []
        for i in range(0, len(images), batch_size):
            out += self.predict_batch(self.pixels(images[i : i + batch_size]), top_k=top_k, **kwargs)
        return out

    def tag(self, images, top_k: int = 10, batch_size: int = 8, num_workers: int = 2, min_prob: float = 0.0,
            max_labels: int | None = None, **kwargs):
        """Yield a `TagResult(id, labels, width, height, error)` per image of any iterable (paths,
        bytes, PIL images), in order, as batches finish; images are decoded in `num_workers`
        processes while the model runs, and a bad image gives `error` instead of raising."""
        from nxtrec.tagging.pipeline import tag_images

        return tag_images(self, images, top_k, batch_size, num_workers, min_prob, max_labels, **kwargs)

    @torch.inference_mode()
    def predict_batch(
        self,
        pixels: torch.Tensor,
        top_k: int = 10,
        sampler: str = "one-shot",
        ranking: str = "prob",
        extra_k: int = 0,
        max_label_tokens: int | None = None,
        maps: bool = False,
        map_rule: str | None = None,
        vocab=None,
        map_to=None,
        map_threshold: float = DEFAULT_MAP_THRESHOLD,
        compat: str | None = None,
        **sampler_kwargs,
    ) -> list[list[Label]]:
        """Labels for preprocessed images [B, 3, S, S].

        maps (one-shot only): each label also gets `Label.map`, where the decoder looked while
          writing it, a [rows, cols] grid over the image patches that sums to 1, from the same
          pass (nxtrec.inference.attention; `map_rule` picks the combination rule).

        one-shot: `top_k + extra_k` branches, at most `top_k` labels after merging.
        greedy: `temperature`, `top_k_tokens` (1 = argmax), `top_p`, `repetition_penalty`,
          `max_new_tokens`, `seed`. beam: `beam_size`, `max_new_tokens`, `length_penalty`.
        vocab (one-shot only): a tag list (file path, lines or `LabelList`); labels are decoded
          into its entries (nxtrec.inference.vocab). map_to: decode freely, then map each label
          to the nearest entry of a tag list, dropping those below `map_threshold`
          (nxtrec.inference.mapping). compat="reference": the reference implementation's
          outputs, deviations included (nxtrec.inference.compat, docs/compat.md).
        """
        check_compat(compat)
        trie = trie_for(vocab, self.tokenizer, self.config.prompt)
        if trie is not None and sampler != "one-shot":
            raise NxtrecError(f"a tag list (vocab) constrains one-shot sampling; use sampler 'one-shot', not {sampler!r}")
        if maps and sampler != "one-shot":
            raise NxtrecError(f"label maps come from one-shot sampling; drop maps or use sampler 'one-shot', not {sampler!r}")
        tok = self.tokenizer
        image_tokens = self.model.encode_images(pixels.to(self.device, self.dtype))
        if sampler == "one-shot":
            extra = {"max_label_tokens": max_label_tokens} if max_label_tokens else {}
            if maps:
                extra["rule"] = map_rule or DEFAULT_MAP_RULE
            k = top_k + extra_k
            if trie is not None:
                k, extra["max_label_tokens"] = one_shot_limits(trie, k, max_label_tokens)
                extra["vocab"] = trie
            sample = grounded_one_shot if maps else one_shot
            branches = sample(self.model, image_tokens, self.prompt_ids, k, tok.delimiter_id, **extra)
        elif sampler == "greedy":
            seed = sampler_kwargs.pop("seed", 0)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            top_k_tokens = sampler_kwargs.pop("top_k_tokens", 1)
            if compat:
                branches = greedy_as_reference(self.model, image_tokens, self.prompt_ids, tok.delimiter_id,
                                               top_k=top_k_tokens, generator=gen, **sampler_kwargs)
            else:
                branches = greedy(
                    self.model, image_tokens, self.prompt_ids, tok.eos_id, tok.delimiter_id,
                    top_k=top_k_tokens, generator=gen, **sampler_kwargs,
                )
        elif sampler == "beam":
            if compat:
                sampler_kwargs.update(beam_options(len(self.prompt_ids)))
            branches = beam_search(self.model, image_tokens, self.prompt_ids, tok.eos_id, tok.delimiter_id, **sampler_kwargs)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        if compat:
            branches = as_reference(sampler, branches, tok.delimiter_id)
        decode = tok.decode
        if trie is not None:
            branches, decode = [keep_listed(b, trie) for b in branches], trie.label
        if compat and ranking == "ppl":
            labels = [rank_ppl_as_reference(br, decode, top_k) for br in branches]
        else:
            labels = self._rank(branches, image_tokens, ranking, top_k, decode)
        mapper = mapper_for(map_to, map_threshold)
        return labels if mapper is None else [mapper.map(labs, top_k) for labs in labels]

    def _rank(self, branches, image_tokens, ranking, top_k, decode) -> list[list[Label]]:
        wte = self.model.language_decoder.tok_embeddings.weight

        def embed_tokens(ids):
            return wte[torch.tensor(ids, device=wte.device)].float().cpu().numpy()

        return [
            rank_labels(br, decode, ranking, top_k, embed_tokens=embed_tokens,
                        image_tokens=img.float().cpu().numpy() if ranking == "sim" else None,
                        delimiter_id=self.tokenizer.delimiter_id)
            for br, img in zip(branches, image_tokens)
        ]
