"""The model bundle: a folder with safetensors weights and a self-describing bundle.json."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.calibration import calibrator_from_dict
from core.gradcam import forward_with_cam
from core.model import ARCHITECTURE, build_network

WEIGHTS_FILE = "model.safetensors"
META_FILE = "bundle.json"
FORMAT_VERSION = 1
BF16_MAX_AUC_DROP = 0.002


class BundleError(RuntimeError):
    """Raised when a bundle folder is missing or inconsistent."""


def weights_sha256(path: Path) -> str:
    """Returns the sha256 of a weights file, used to tie calibrations to the weights they were fitted on."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_weights(net: nn.Module, directory: Path) -> str:
    """Writes the network weights as fp16 safetensors and returns their sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    return weights_sha256(directory / WEIGHTS_FILE)


def write_meta(directory: Path, meta: dict) -> None:
    """Writes bundle.json."""
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(directory: Path) -> dict:
    """Reads and checks bundle.json."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise BundleError(f"no {META_FILE} in {directory}: not a Chest-Aid model bundle")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("architecture") != ARCHITECTURE:
        raise BundleError(f"unsupported bundle in {directory}: format {meta.get('format_version')}, "
                          f"architecture {meta.get('architecture')}")
    return meta


def load_network(directory: Path) -> nn.Module:
    """Rebuilds the network from the bundle's weights alone, in fp32 and eval mode."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise BundleError(f"no {WEIGHTS_FILE} in {directory}")
    net = build_network("none")
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    return net.eval()


@dataclass
class Bundle:
    """A loaded bundle: network, calibration, threshold and the device/precision it runs with."""

    directory: Path
    meta: dict
    net: nn.Module
    device: torch.device
    use_bf16: bool
    calibrator: object = field(init=False)

    def __post_init__(self):
        self.calibrator = calibrator_from_dict(self.meta["calibration"])

    @property
    def version(self) -> str:
        return self.meta["version"]

    @property
    def calibration_version(self) -> str:
        return self.meta["calibration"]["version"]

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def input_size(self) -> int:
        return int(self.meta["input_size"])

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (logits [N], Grad-CAMs [N,h,w]) for a normalised batch, on the bundle's device."""
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                logits, cams = forward_with_cam(self.net, x)
        elif self.use_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits, cams = forward_with_cam(self.net, x)
        else:
            logits, cams = forward_with_cam(self.net, x)
        return logits.float().cpu(), cams.float().cpu()


def load_bundle(directory: str | Path, device: str | None = None) -> Bundle:
    """Loads a bundle; on CPU uses bf16 only when the bundle's recorded check allows it."""
    directory = Path(directory)
    meta = read_meta(directory)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_network(directory).to(dev).to(memory_format=torch.channels_last)
    use_bf16 = bool(meta.get("bf16_check", {}).get("use_bf16", False))
    return Bundle(directory=directory, meta=meta, net=net, device=dev, use_bf16=use_bf16)
