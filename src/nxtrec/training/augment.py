"""Random views of the example images for `nxtrec teach`: a few examples of a new label show
it at few sizes, angles and places, and an adapter trained on them alone learns those.

Each view is one affine map of the preprocessed image (zoom in or out, rotation, mirror,
shift), sampled with reflection at the borders; its parameters come from the step's random
generator, so a batch stays a pure function of (seed, step)."""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

ZOOM = (0.7, 1.3)  # sampling-grid scale: below 1 zooms in, above 1 zooms out
MAX_ROTATION = 30.0  # degrees
MAX_SHIFT = 0.25  # in the grid's [-1, 1] coordinates: an eighth of the side


def random_views(pixels: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """pixels: [B, 3, S, S] -> one random view of each image, same shape."""
    thetas = []
    for _ in range(pixels.shape[0]):
        scale = math.exp(rng.uniform(math.log(ZOOM[0]), math.log(ZOOM[1])))
        angle = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
        mirror = -1.0 if rng.random() < 0.5 else 1.0
        dx, dy = rng.uniform(-MAX_SHIFT, MAX_SHIFT), rng.uniform(-MAX_SHIFT, MAX_SHIFT)
        cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
        thetas.append([[cos * mirror, -sin, dx], [sin * mirror, cos, dy]])
    theta = torch.tensor(thetas, dtype=pixels.dtype)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
