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
    """Turns uint8 grayscale [N,H,W] (or float in 0..1 [N,1,H,W]) into a normalised [N,3,H,W] float tensor."""
    if not isinstance(batch, torch.Tensor):
        batch = torch.from_numpy(np.stack(list(batch)) if not isinstance(batch, np.ndarray) else batch)
    x = batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()
    if x.dim() == 3:
        x = x.unsqueeze(1)
    x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def preprocess(images: Sequence[Image.Image], size: int = INPUT_SIZE) -> torch.Tensor:
    """Runs the full service preprocessing on a batch of grayscale films."""
    return normalize(np.stack([resize_gray(img, size) for img in images]))
