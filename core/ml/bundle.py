"""The model bundle: a folder with safetensors weights and a self-describing bundle.json."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from core.ml import precision
from core.ml.calibration import calibrator_from_dict
from core.ml.network import ARCHITECTURE, build_network
from core.ml.ood import OodError, OodGuard, load_guard
from core.ml.threads import ThreadFit

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
    """Reads and checks bundle.json (as a plain dict; BundleMeta.read gives the typed description)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise BundleError(f"no {META_FILE} in {directory}: not a Chest-Aid model bundle")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION or meta.get("architecture") != ARCHITECTURE:
        raise BundleError(f"unsupported bundle in {directory}: format {meta.get('format_version')}, "
                          f"architecture {meta.get('architecture')}")
    return meta


@dataclass(frozen=True)
class BundleMeta:
    """bundle.json, typed: what the service and the tools read is a field; the figures and reports (metrics,
    training, split, reference_scores, shift_suite, recalibration, ...) stay in `extra`, written back unchanged.

    Optional fields left None are not written, so a bundle read and written again keeps exactly its keys.
    """

    version: str
    calibration: dict  # core.ml.calibration.calibrator_to_dict, plus its "version" and where it was fitted
    threshold: float
    weights_sha256: str | None = None  # sha256 of model.safetensors; load_bundle refuses weights that differ
    target_sensitivity: float | None = None  # the operating point the threshold was chosen for
    input_size: int | None = None
    channels: int | None = None
    normalization: dict | None = None
    bf16_check: dict | None = None  # the recorded accuracy check that allows or forbids bf16 inference
    ood: dict | None = None  # the out-of-distribution guard's section (core.ml.ood.load_guard)
    format_version: int = FORMAT_VERSION
    architecture: str = ARCHITECTURE
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, meta: dict) -> "BundleMeta":
        """Splits a bundle.json dict into the typed fields and `extra`."""
        missing = [k for k in ("version", "calibration", "threshold") if k not in meta]
        if missing:
            raise BundleError(f"{META_FILE} lacks {', '.join(missing)}")
        typed = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in meta.items() if k in typed},
                   extra={k: v for k, v in meta.items() if k not in typed})

    def to_dict(self) -> dict:
        """The bundle.json dict: `extra`, then every typed field that is set."""
        typed = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return {**self.extra, **{k: v for k, v in typed.items() if v is not None}}

    @classmethod
    def read(cls, directory: Path) -> "BundleMeta":
        """Reads and checks a bundle folder's bundle.json."""
        return cls.from_dict(read_meta(directory))

    def write(self, directory: Path) -> None:
        """Writes bundle.json into a bundle folder."""
        write_meta(Path(directory), self.to_dict())


def check_weights(directory: Path, meta: dict) -> None:
    """Refuses a weights file other than the one bundle.json records (replaced, or corrupted in a copy).

    Bundles written before the hash was recorded carry none and are not checked.
    """
    expected = meta.get("weights_sha256")
    path = Path(directory) / WEIGHTS_FILE
    if expected is None or not path.is_file():
        return
    actual = weights_sha256(path)
    if actual != expected:
        raise BundleError(f"{path} does not match {META_FILE}: its sha256 is {actual[:12]}…, the bundle records "
                          f"weights_sha256 {expected[:12]}…. The weights were replaced or damaged; copy the "
                          "whole bundle folder again (a calibration is only valid for the weights it was fitted on)")


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
    choice: precision.Choice
    ood: OodGuard | None = None  # None: a bundle fitted before the guard existed; nothing is refused by it
    calibrator: object = field(init=False)
    threads: ThreadFit | None = field(init=False)  # CPU only: each pass's threads fitted to the free cores

    def __post_init__(self):
        self.calibrator = calibrator_from_dict(self.meta["calibration"])
        self.threads = ThreadFit() if self.device.type == "cpu" else None

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

    @property
    def mode(self) -> str:
        """The precision the network runs in (core.ml.precision): fp32, bf16, tf32 or fp16."""
        return self.choice.mode

    @property
    def use_bf16(self) -> bool:
        return self.choice.mode == "bf16"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (logits [N], Grad-CAMs [N,h,w], pooled embeddings [N,C]) for a normalised batch, float32 on CPU."""
        if self.threads is not None:
            self.threads.fit()
        return precision.run_with_embedding(self.net, x, self.device, self.choice.mode)


def bf16_allowed(meta: dict) -> bool:
    """Tells whether the bundle's recorded accuracy check allows bf16 inference."""
    return bool(meta.get("bf16_check", {}).get("use_bf16", False))


def load_bundle(directory: str | Path, device: str | None = None, mode: str = "auto") -> Bundle:
    """Loads a bundle and picks its precision: `mode` forces one, "auto" measures (core.ml.precision.choose).

    Weights whose sha256 differs from the recorded weights_sha256 are refused (BundleError). bf16 is never used
    when the bundle's accuracy check forbids it, whatever the hardware.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    check_weights(directory, meta)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net = load_network(directory)
    choice = precision.choose(net, dev, bf16_allowed=bf16_allowed(meta), forced=mode,
                              size=int(meta.get("input_size", 224)))
    try:
        ood = load_guard(directory, meta["ood"]) if "ood" in meta else None
    except OodError as exc:
        raise BundleError(str(exc)) from exc
    return Bundle(directory=directory, meta=meta, net=net, device=dev, choice=choice, ood=ood)
