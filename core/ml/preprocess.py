"""Preprocessing shared by training and the service: grayscale film → normalised 3-channel tensor."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_gray(img: Image.Image, size: int = INPUT_SIZE) -> np.ndarray:
    """Resizes an 8-bit grayscale film to size×size (aspect ignored, as in training) and returns uint8."""
    if img.mode != "L":
        raise ValueError(f"expected mode L, got {img.mode}")
    return np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.uint8)


def normalize(batch: torch.Tensor | np.ndarray | Sequence[np.ndarray],
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Turns uint8 grayscale [N,H,W] (or float in 0..1 [N,1,H,W]) into a normalised [N,3,H,W] float tensor
    (channels_last, the layout the network runs in)."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.from_numpy(np.stack(list(batch)) if not isinstance(batch, np.ndarray) else batch)
    x = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    x = x.unsqueeze(-1) if x.dim() == 3 else x.permute(0, 2, 3, 1)  # [N,H,W,1 or 3]
    # (x − m)/s as x·(1/s) − m/s in one pass that writes [N,H,W,3], which is channels_last already: half the CPU
    # of normalising three expanded channels and then copying them into that layout.
    scale = torch.tensor([1.0 / v for v in std]).view(1, 1, 1, 3)
    shift = torch.tensor([-m / v for m, v in zip(mean, std)]).view(1, 1, 1, 3)
    return torch.addcmul(shift, x, scale).permute(0, 3, 1, 2)


def preprocess(images: Sequence[Image.Image], size: int = INPUT_SIZE) -> torch.Tensor:
    """Runs the full service preprocessing on a batch of grayscale films."""
    return normalize(np.stack([resize_gray(img, size) for img in images]))
