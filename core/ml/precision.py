"""Precision and backend chosen by measurement on this machine, never by assumption.

A 2-core server with native bf16 (AVX512-BF16/AMX) runs DenseNet-121 several times faster in bf16 than in
fp32; one with only AVX2 emulates bf16 and runs it about 5× *slower*. On a GPU, fp16 weights beat per-call
autocast, and TF32 is free accuracy-wise for convolutions. So the service lists the modes this device and
bundle allow, times a short forward+CAM probe of each, and keeps the fastest; a setting can force one.

Modes:
- ``fp32``  CPU or CUDA in float32 (on CUDA with TF32 matmul/convolutions allowed: ``tf32``);
- ``bf16``  CPU bfloat16 autocast — only when the bundle's accuracy check allows it;
- ``fp16``  CUDA with the network's weights in half precision and channels_last (no autocast casting).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from core.ml.gradcam import forward_with_cam_embedding

log = logging.getLogger(__name__)

CPU_MODES = ("fp32", "bf16")
CUDA_MODES = ("fp32", "tf32", "fp16")
# On a GPU the mode is timed at a batch a burst runs at, since the order of the modes turns with the batch: on an H100,
# tf32 led fp16 at 32 (2,522 against 1,753 img/s) and fp16 led at 128 and 256 (4,427 against 3,620; 4,828 against
# 3,595); a single film takes about 11 ms in any of them.
PROBE_BATCH = {"cpu": 2, "cuda": 128}
# Batch sizes tried for bursts: a CPU saturates at a few images, a GPU wants hundreds.
BATCH_CANDIDATES = {"cpu": (4, 8, 16), "cuda": (32, 64, 128, 256)}
# A mode other than fp32 must beat it by this much in the probe: a near tie is measurement noise.
MODE_MARGIN = 0.10
_PROBE_CACHE: dict[tuple, "Choice"] = {}
_BATCH_CACHE: dict[tuple, int] = {}


class PrecisionError(ValueError):
    """Raised when a forced mode is not available on this device or not allowed by the bundle."""


@dataclass(frozen=True)
class Choice:
    """The mode a bundle runs in, why, and what the probe measured (images/s of forward+CAM per mode)."""

    mode: str
    device: str
    reason: str
    images_per_s: dict[str, float]

    @property
    def label(self) -> str:
        """Short text for logs, heartbeats and the status strip, e.g. ``cpu bf16 41 img/s``."""
        ips = self.images_per_s.get(self.mode)
        return f"{self.device} {self.mode}" + (f" {ips:.0f} img/s" if ips else "")


def native_bf16() -> bool:
    """Tells whether oneDNN reports native bf16 support on this CPU (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16", "avx_vnni")  # those that decide speed


def describe_cpu(cpuinfo: str | None = None) -> str:
    """Names this CPU for a reported figure: model name, family and model (a vendor's name can be as bare as
    "AMD EPYC"), the flags that decide precision speed, torch's capability and oneDNN's native bf16.

    `cpuinfo` is /proc/cpuinfo's text (read when not given); the first processor's fields are used.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    info = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    name = info.get("model name", "unknown CPU")
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    flags = set(info.get("flags", "").split())
    return (f"{name}, flags {' '.join(f for f in CPU_FLAGS if f in flags) or 'none of ' + '/'.join(CPU_FLAGS)}, "
            f"torch capability {torch.backends.cpu.get_cpu_capability()}, oneDNN native bf16 {native_bf16()}")


def allowed_modes(device: torch.device, *, bf16_allowed: bool) -> tuple[str, ...]:
    """Lists the modes this device may run; bf16 only where the bundle's accuracy check allows it."""
    if device.type == "cuda":
        return CUDA_MODES
    return CPU_MODES if bf16_allowed else ("fp32",)


def prepare(net: nn.Module, device: torch.device, mode: str) -> nn.Module:
    """Puts the network in the layout and dtype the mode runs with (fp16 weights for ``fp16``)."""
    net = net.to(device).to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        tf32 = mode == "tf32"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
    return net.half() if mode == "fp16" else net.float()


@torch.inference_mode()
def run(net: nn.Module, x: torch.Tensor, device: torch.device, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs forward+CAM in a mode; returns float32 (logits [N], CAMs [N,h,w]) on the CPU."""
    logits, cams, _ = run_with_embedding(net, x, device, mode)
    return logits, cams


def padded_batch(n: int) -> int:
    """The batch size a GPU pass of `n` films runs at: the next power of two."""
    return 1 << max(0, n - 1).bit_length()


def pads_passes(device: torch.device) -> bool:
    """Whether passes on `device` are padded to padded_batch. With cudnn.benchmark, cuDNN times every
    convolution's algorithms the first time it sees a shape: on an H100 a pass of a batch size not seen before
    took 2.6 s (the first idle film, at batch 1) to 3.6 s (a burst's first pass), against 14 ms. A burst's passes
    take whatever the queue holds (1…256 films), so each new size paid that; padded, there are nine shapes, timed
    at start (warm_up). A CPU has no such cost, and padding would only add work there."""
    return device.type == "cuda"


def warm_up(net: nn.Module, device: torch.device, mode: str, batch: int, *, size: int = 224) -> list[int]:
    """Runs one pass at every padded batch size up to `batch`'s, so that no film waits for cuDNN's algorithm
    search (pads_passes); returns the sizes run (none on a CPU)."""
    if not pads_passes(device):
        return []
    sizes = [1 << i for i in range(padded_batch(batch).bit_length())]
    for b in sizes:
        run(net, torch.zeros(b, 3, size, size), device, mode)
    return sizes


@torch.inference_mode()
def run_with_embedding(net: nn.Module, x: torch.Tensor, device: torch.device,
                       mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs forward+CAM in a mode; returns float32 (logits [N], CAMs [N,h,w], pooled embedding [N,C]) on the CPU.
    On a GPU the batch is padded with blank images to padded_batch (pads_passes) and the padding dropped."""
    n = x.shape[0]
    padded = padded_batch(n) if pads_passes(device) else n
    if padded > n:
        x = torch.cat([x, x.new_zeros((padded - n, *x.shape[1:]))])
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if mode == "fp16":
        logits, cams, emb = forward_with_cam_embedding(net, x.half())
    elif mode == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, cams, emb = forward_with_cam_embedding(net, x)
    else:
        logits, cams, emb = forward_with_cam_embedding(net, x)
    return logits[:n].float().cpu(), cams[:n].float().cpu(), emb[:n].float().cpu()


def _timed_pass(net: nn.Module, device: torch.device, mode: str, x: torch.Tensor) -> float:
    """Seconds for one forward+CAM pass of `x` in `mode` (the network already prepared for it)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run(net, x, device, mode)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _probe(net: nn.Module, device: torch.device, arms: list[tuple[str, int]], size: int,
           rounds: int) -> dict[tuple[str, int], float]:
    """Images/s of forward+CAM for each (mode, batch) arm: every arm is warmed up once (oneDNN/cuDNN set-up),
    then timed once per round with the arms interleaved, and its fastest round is kept.

    Interleaving matters on a shared server: a burst of load from another process slows one round of every
    arm alike instead of the whole window of one arm (timed one after another, a busy neighbour once made
    fp32 look 14× slower than it is and the probe picked emulated bf16, 5× slower in truth).
    """
    inputs = {b: torch.randn(b, 3, size, size) for _, b in arms}
    for mode, b in arms:
        prepare(net, device, mode)
        run(net, inputs[b], device, mode)
    best = {arm: float("inf") for arm in arms}
    for _ in range(rounds):
        for mode, b in arms:
            prepare(net, device, mode)
            best[(mode, b)] = min(best[(mode, b)], _timed_pass(net, device, mode, inputs[b]))
    return {(mode, b): b / best[(mode, b)] for mode, b in arms}


def _pick(ips: dict[str, float], baseline: str = "fp32", margin: float = MODE_MARGIN) -> str:
    """The fastest mode, but the plain fp32 baseline unless another beats it by `margin` (a near tie is noise,
    and fp32 is the reference the bundle was validated in)."""
    best = max(ips, key=ips.get)
    return best if ips[best] >= (1 + margin) * ips.get(baseline, 0.0) else baseline


def choose(net: nn.Module, device: torch.device, *, bf16_allowed: bool, forced: str = "auto",
           size: int = 224, rounds: int = 3) -> Choice:
    """Picks the mode: the forced one if given (and allowed), else the fastest by a timed probe.

    The probe's result depends on the hardware and the architecture, not on the weights, so it is kept for
    the life of the process: a worker that reloads a bundle does not probe again.
    """
    modes = allowed_modes(device, bf16_allowed=bf16_allowed)
    if forced != "auto":
        if forced not in modes:
            why = ("the bundle's bf16 accuracy check does not allow it" if forced == "bf16" and device.type == "cpu"
                   else f"{device.type} runs {', '.join(modes)}")
            raise PrecisionError(f"precision {forced!r} cannot be used: {why}")
        prepare(net, device, forced)
        return Choice(forced, device.type, "forced by CHESTAID_PRECISION", {})
    if len(modes) == 1:
        prepare(net, device, modes[0])
        return Choice(modes[0], device.type, "the only mode allowed", {})
    key = (device.type, size, modes)
    if key not in _PROBE_CACHE:
        measured = _probe(net, device, [(m, PROBE_BATCH[device.type]) for m in modes], size, rounds)
        ips = {m: v for (m, _), v in measured.items()}
        best = _pick(ips)
        detail = ", ".join(f"{m} {v:.1f}" for m, v in ips.items())
        extra = f"; oneDNN native bf16: {native_bf16()}" if device.type == "cpu" else ""
        _PROBE_CACHE[key] = Choice(best, device.type, f"fastest in a timed probe ({detail} img/s{extra})", ips)
        log.info("precision: %s on %s (%s)", best, device.type, _PROBE_CACHE[key].reason)
    choice = _PROBE_CACHE[key]
    prepare(net, device, choice.mode)
    return choice


def batch_figures(net: nn.Module, device: torch.device, mode: str, *, size: int = 224,
                  rounds: int = 3) -> dict[int, float]:
    """Images/s of forward+CAM in `mode` at each burst batch candidate of this device (a timed probe; every arm is
    in `mode`, so the network is left prepared for it)."""
    measured = _probe(net, device, [(mode, b) for b in BATCH_CANDIDATES[device.type]], size, rounds)
    return {b: v for (_, b), v in measured.items()}


def pick_batch(ips: dict[int, float], within: float = 0.02) -> int:
    """The smallest batch within `within` of the best images/s (a larger batch that is no faster only adds
    latency; a lone film is one pass whatever the size)."""
    top = max(ips.values())
    return min(b for b, v in ips.items() if v >= (1 - within) * top)


def best_batch(net: nn.Module, device: torch.device, mode: str, *, size: int = 224, rounds: int = 3,
               within: float = 0.02) -> int:
    """Returns the batch size for bursts from this process's own probe (pick_batch). The margin is small because
    a burst's films/s is the point: on a 2-core AVX2 server batch 4 ran 5% below batch 8, and on a 2-core AMX one,
    in the pool's layout, 20% below (58.7 against 73.4 img/s). A worker's pool processes agree on one batch from
    all their probes instead (worker.pool_batch): probed side by side, a noisy round could tip one process to 16
    and the other to 4, and the burst then ended with one core idle while the other ran its last large passes.
    Kept for the life of the process, like the mode."""
    key = (device.type, size, mode)
    if key not in _BATCH_CACHE:
        ips = batch_figures(net, device, mode, size=size, rounds=rounds)
        _BATCH_CACHE[key] = pick_batch(ips, within)
        log.info("burst batch size %d on %s %s (%s img/s)", _BATCH_CACHE[key], device.type, mode,
                 ", ".join(f"{b}: {v:.1f}" for b, v in ips.items()))
    prepare(net, device, mode)
    return _BATCH_CACHE[key]
