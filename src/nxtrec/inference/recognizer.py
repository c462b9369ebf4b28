"""`Recognizer`: images in, ranked labels out.

    from nxtrec import Recognizer
    rec = Recognizer.from_pretrained("path/to/model-dir")
    rec.predict(["photo.jpg"], top_k=10)   # [[Label("dog", 0.41), ...]]
"""

from __future__ import annotations

from pathlib import Path

import torch

from nxtrec.inference.ranking import Label, rank_labels
from nxtrec.inference.sampling import beam_search, greedy, one_shot
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
        """Load a model directory (`None`: the bundled default model)."""
        model, tokenizer = load_model_dir(path or default_model_dir(), device=device, dtype=DTYPES[dtype])
        return cls(model, tokenizer, device)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_decoder.output.weight.dtype

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

    @torch.inference_mode()
    def predict_batch(
        self,
        pixels: torch.Tensor,
        top_k: int = 10,
        sampler: str = "one-shot",
        ranking: str = "prob",
        extra_k: int = 0,
        max_label_tokens: int | None = None,
        **sampler_kwargs,
    ) -> list[list[Label]]:
        """Labels for preprocessed images [B, 3, S, S].

        one-shot: `top_k + extra_k` branches, at most `top_k` labels after merging.
        greedy: `temperature`, `top_k_tokens` (1 = argmax), `top_p`, `repetition_penalty`,
          `max_new_tokens`, `seed`. beam: `beam_size`, `max_new_tokens`, `length_penalty`.
        """
        tok = self.tokenizer
        image_tokens = self.model.encode_images(pixels.to(self.device, self.dtype))
        if sampler == "one-shot":
            extra = {"max_label_tokens": max_label_tokens} if max_label_tokens else {}
            branches = one_shot(self.model, image_tokens, self.prompt_ids, top_k + extra_k, tok.delimiter_id, **extra)
        elif sampler == "greedy":
            seed = sampler_kwargs.pop("seed", 0)
            gen = torch.Generator(device=self.device).manual_seed(seed)
            top_k_tokens = sampler_kwargs.pop("top_k_tokens", 1)
            branches = greedy(
                self.model, image_tokens, self.prompt_ids, tok.eos_id, tok.delimiter_id,
                top_k=top_k_tokens, generator=gen, **sampler_kwargs,
            )
        elif sampler == "beam":
            branches = beam_search(self.model, image_tokens, self.prompt_ids, tok.eos_id, tok.delimiter_id, **sampler_kwargs)
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
        wte = self.model.language_decoder.tok_embeddings.weight

        def embed_tokens(ids):
            return wte[torch.tensor(ids, device=wte.device)].float().cpu().numpy()

        return [
            rank_labels(br, tok.decode, ranking, top_k, embed_tokens=embed_tokens,
                        image_tokens=img.float().cpu().numpy() if ranking == "sim" else None, delimiter_id=tok.delimiter_id)
            for br, img in zip(branches, image_tokens)
        ]
