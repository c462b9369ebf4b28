"""The model behind the service: a PyTorch model directory or an exported ONNX directory,
seen through one small interface (preprocess one image, predict a batch of arrays).

Requests are decoded and preprocessed to float32 arrays in the request threads (torch-free,
`nxtrec.model.image.preprocess_array`, the same function `Recognizer.pixels` uses); the
inference worker stacks them and calls the recognizer's own `predict_batch`, so a served
image gets exactly the labels and probabilities of `nxtrec predict`. `nxtrec serve` runs the
engine in a process of its own (`nxtrec.serving.model_process`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nxtrec.errors import NxtrecError
from nxtrec.inference.ranking import Label
from nxtrec.model.image import preprocess_array


@dataclass
class Engine:
    name: str  # reported as "model" in every response
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # (pixels [B, 3, S, S] float32, top_k, maps) -> labels per image
    predict_arrays: Callable[[np.ndarray, int, bool], list[list[Label]]]
    supports_maps: bool = False  # per-label maps over the patch grid (`Label.map`)
    alive: Callable[[], bool] = lambda: True  # False once a model process has ended
    close: Callable[[], None] = lambda: None  # ends a model process (its owner calls it)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        return preprocess_array(img, self.image_size, self.mean, self.std)


def load_engine(model: str | None = None, onnx: str | None = None, device: str = "cpu", dtype: str = "float32",
                decode_options: dict | None = None) -> Engine:
    """Load a model directory (None: the bundled default model) or an ONNX directory.
    `decode_options` go to every `predict_batch` call (a tag list: `vocab`, `map_to`)."""
    if model and onnx:
        raise NxtrecError("give either --model or --onnx, not both")
    if onnx:
        return _onnx_engine(onnx, decode_options or {})
    return _torch_engine(model, device, dtype, decode_options or {})


def _onnx_engine(path: str, decode_options: dict) -> Engine:
    from nxtrec.onnx.runtime import OnnxRecognizer

    rec = OnnxRecognizer(path)
    cfg = rec.config
    return Engine(
        name=Path(path).resolve().name,
        image_size=rec.image_size,
        mean=tuple(cfg.image_mean),
        std=tuple(cfg.image_std),
        predict_arrays=lambda pixels, top_k, maps: rec.predict_batch(pixels, top_k=top_k, **decode_options),
    )


def _torch_engine(path: str | None, device: str, dtype: str, decode_options: dict) -> Engine:
    import torch

    from nxtrec.inference.recognizer import Recognizer
    from nxtrec.model.directory import default_model_dir

    model_dir = Path(path) if path else default_model_dir()
    rec = Recognizer.from_pretrained(model_dir, device=device, dtype=dtype)
    cfg = rec.config
    return Engine(
        name=model_dir.resolve().name,
        image_size=cfg.encoder.image_size,
        mean=tuple(cfg.image_mean),
        std=tuple(cfg.image_std),
        predict_arrays=lambda pixels, top_k, maps: rec.predict_batch(torch.from_numpy(pixels), top_k=top_k, maps=maps,
                                                                     **decode_options),
        supports_maps=True,
    )
