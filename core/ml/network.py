"""The network: torchvision DenseNet-121 with a one-logit pneumonia head."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import DenseNet121_Weights, densenet121

ARCHITECTURE = "densenet121"


class InitWeightsError(RuntimeError):
    """Raised when requested initial weights cannot be obtained."""


def build_network(init: str = "none") -> nn.Module:
    """Builds DenseNet-121 with a single-logit head; init is "none", "imagenet" or a local weights path."""
    if init == "imagenet":
        try:
            net = densenet121(weights=DenseNet121_Weights.IMAGENET1K_V1)
        except Exception as exc:  # urllib/hub errors vary by platform; all mean "not available"
            raise InitWeightsError(
                "could not fetch torchvision's ImageNet DenseNet-121 weights "
                f"({type(exc).__name__}: {exc}); use --init none or --init PATH with a local file"
            ) from exc
    else:
        net = densenet121(weights=None)
    net.classifier = nn.Linear(net.classifier.in_features, 1)
    if init not in ("none", "imagenet"):
        load_weights_file(net, Path(init), strict_head=False)
    return net


def load_weights_file(net: nn.Module, path: Path, *, strict_head: bool = True) -> None:
    """Loads a safetensors (or weights-only torch) file into the network; a 1000-class head is skipped."""
    if not path.exists():
        raise InitWeightsError(f"initial weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state)
    state = {k: v.float() for k, v in state.items()}
    if not strict_head:
        head = net.classifier.weight.shape
        state = {k: v for k, v in state.items()
                 if not (k.startswith("classifier.") and v.shape[0] != head[0])}
    missing, unexpected = net.load_state_dict(state, strict=False)
    body_missing = [k for k in missing if not k.startswith("classifier.")]
    if body_missing or unexpected or (strict_head and missing):
        raise InitWeightsError(f"weights in {path} do not fit DenseNet-121: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
