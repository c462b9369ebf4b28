"""The whole nxtp model: the vision encoder's image tokens prefix the language decoder.

Parameter names follow the released checkpoints, so state dicts load without renaming:
`vision_encoder.*` is OpenAI CLIP's `visual.*` and `language_decoder.*` is Meta's LLaMA
layout (`layers.N.attention.wq`, ...)."""

from __future__ import annotations

import torch
import torch.nn as nn

from nxtrec.model.config import ModelConfig
from nxtrec.model.decoder import Decoder
from nxtrec.model.encoder import VisionEncoder


class NxtpModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.vision_encoder = VisionEncoder(config.encoder, config.decoder.dim)
        self.language_decoder = Decoder(config.decoder)

    @property
    def num_image_tokens(self) -> int:
        return self.config.encoder.num_patches

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.vision_encoder(pixels)

    def prefix_embeddings(self, image_tokens: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
        """[P image tokens][<|image|>][<s>][prompt] for every image: [B, P + T, dim]."""
        text = self.language_decoder.embed(prompt_ids.to(image_tokens.device))
        text = text.to(image_tokens.dtype).expand(image_tokens.shape[0], -1, -1)
        return torch.cat([image_tokens, text], dim=1)
