"""Training augmentation, piece by piece, so each piece can be switched on or off and measured on the shift suite.

Pieces act on one film at a time, a float tensor [1,H,W] in 0..1 made from the cached uint8 film (the service's
decode + resize), and return the same shape, clamped to 0..1. None of them reproduces a family that
training.shift holds out (sharpening, JPEG, down-then-up sampling, wide borders, burned-in text): the suite's
held-out perturbations stay unseen. The affine piece's small rotations leave thin black corners; the held-out
`borders` family is far wider (12 % letterbox, bright collimation).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2

ROBUST = ("crop", "affine", "gamma", "contrast", "blur", "noise")


class RandomGamma:
    """x -> x**g with log-uniform g in [low, high] (another detector's grey-level curve)."""

    def __init__(self, low: float = 0.7, high: float = 1.5, p: float = 0.5):
        self.low, self.high, self.p = low, high, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        lo, hi = torch.log(torch.tensor(self.low)), torch.log(torch.tensor(self.high))
        g = torch.exp(lo + (hi - lo) * torch.rand(()))
        return x.clamp(0, 1).pow(g)


class RandomNoise:
    """Adds Gaussian noise with a uniformly drawn sd in [0, max_sd] (low-dose quantum noise)."""

    def __init__(self, max_sd: float = 0.05, p: float = 0.3):
        self.max_sd, self.p = max_sd, p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        return x + torch.randn_like(x) * (self.max_sd * torch.rand(()))


def piece(name: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Returns one augmentation piece by name for films of size×size."""
    pieces = {
        "crop": lambda: v2.RandomResizedCrop(size, scale=(0.65, 1.0), ratio=(0.8, 1.25), antialias=True),
        "affine": lambda: v2.RandomAffine(degrees=8, translate=(0.04, 0.04), scale=(0.9, 1.1), shear=5),
        "gamma": lambda: RandomGamma(),
        "contrast": lambda: v2.ColorJitter(brightness=0.2, contrast=0.3),
        "blur": lambda: v2.RandomApply([v2.GaussianBlur(kernel_size=7, sigma=(0.2, 1.8))], p=0.3),
        "noise": lambda: RandomNoise(),
        # The earlier, light recipe, kept so the robust one can be measured against it.
        "basic": lambda: v2.Compose([v2.RandomRotation(5), v2.ColorJitter(brightness=0.1, contrast=0.1)]),
    }
    if name not in pieces:
        raise ValueError(f"unknown augmentation {name!r}; choose from {', '.join(pieces)}, 'robust' or 'none'")
    return pieces[name]()


def parse(spec: str) -> tuple[str, ...]:
    """Parses --augment: 'robust' (all pieces), 'none', 'basic' or a comma list such as 'crop,gamma,noise'."""
    spec = spec.strip().lower()
    if spec == "none":
        return ()
    names = ROBUST if spec == "robust" else tuple(s.strip() for s in spec.split(",") if s.strip())
    for name in names:
        piece(name, 8)  # validates the name
    return names


def build(names: Sequence[str], size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Composes the named pieces for a float [1,H,W] film in 0..1; None when there are none."""
    if not names:
        return None
    chain = v2.Compose([piece(n, size) for n in names])
    return lambda x: chain(x).clamp_(0.0, 1.0)


def smooth_labels(y: torch.Tensor, eps: float) -> torch.Tensor:
    """Binary label smoothing: targets 0/1 become eps/2 and 1 - eps/2."""
    return y * (1.0 - eps) + 0.5 * eps
