"""Would post-training static int8 hold the bundle's accuracy, and how fast is it? Prints figures; ships nothing.

    python bench/int8.py [--bundle models/default] [--calibration 256] [--float denseblock4 norm5 ...]

Issue 13's int8 rule: enabled only when validation ROC-AUC drops by at most 0.002 and the calibrated score of no
validation film moves by more than 0.02. This quantizes the bundle's `features` with torch.ao's FX graph mode
(the x86 engine's default qconfig: histogram-observed per-tensor activations, per-channel weights), calibrated on
--calibration training films of the bundle's split; modules named by --float stay in float. The head, the
Grad-CAM and the OOD embedding run in fp32 on the dequantized features, as the service would. It prints the CPU,
forward+CAM images/s of fp32, bf16 (where oneDNN has it natively) and int8 at batch 8 on one thread, and on the
validation films (the split's calibration and report halves): ROC-AUC, the largest calibrated-score change, flag
and OOD-verdict agreement, for int8 and for bf16 (what ships) against fp32.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import get_default_qconfig_mapping  # noqa: E402
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx  # noqa: E402

from core.ml import precision  # noqa: E402
from core.ml.bundle import load_bundle  # noqa: E402
from core.ml.gradcam import forward_with_cam_embedding  # noqa: E402
from training.data import read_split_file  # noqa: E402
from training.train import cache_images, make_batch  # noqa: E402


class Int8Features(nn.Module):
    """The bundle's network with its features quantized; `forward_with_cam_embedding` runs it unchanged."""

    def __init__(self, features: nn.Module, classifier: nn.Module):
        super().__init__()
        self.features, self.classifier = features, classifier


def quantize(net: nn.Module, films: np.ndarray, keep_float: list[str]) -> Int8Features:
    torch.backends.quantized.engine = "x86"
    qconfig = get_default_qconfig_mapping("x86")
    for name in keep_float:
        qconfig.set_module_name(name, None)
    feats = copy.deepcopy(net.features).float().to(memory_format=torch.contiguous_format)
    prepared = prepare_fx(feats, qconfig, example_inputs=(make_batch(films, slice(0, 2), 224),))
    with torch.inference_mode():
        for i in range(0, len(films), 32):
            prepared(make_batch(films, slice(i, i + 32), 224).contiguous())
    return Int8Features(convert_fx(prepared), net.classifier)


@torch.inference_mode()
def outputs(net: nn.Module, films: np.ndarray, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and pooled embeddings of every film (int8 takes a contiguous float batch, the others channels_last)."""
    zs, es = [], []
    for i in range(0, len(films), 32):
        x = make_batch(films, slice(i, i + 32), 224)
        x = x.contiguous() if mode == "int8" else x.contiguous(memory_format=torch.channels_last)
        if mode == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                z, _, e = forward_with_cam_embedding(net, x)
        else:
            z, _, e = forward_with_cam_embedding(net, x)
        zs.append(z.float())
        es.append(e.float())
    return torch.cat(zs), torch.cat(es)


def images_per_s(net: nn.Module, x: torch.Tensor, mode: str, repeats: int = 7) -> float:
    x = x.contiguous() if mode == "int8" else x.contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
        for i in range(repeats + 2):
            t = time.perf_counter()
            forward_with_cam_embedding(net, x)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return len(x) / float(np.median(times))


def main() -> None:
    warnings.filterwarnings("ignore")  # torch.ao's FX quantization warns that it is moving to torchao
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "chest_xray")
    ap.add_argument("--calibration", type=int, default=256, help="training films the observers see")
    ap.add_argument("--float", nargs="*", default=[], help="features' modules left in float, e.g. denseblock4")
    ap.add_argument("--cache", type=Path, default=Path("/tmp"), help="where the decoded films are cached")
    args = ap.parse_args()
    print("cpu:", precision.describe_cpu())
    bundle = load_bundle(args.bundle, mode="fp32")
    splits = read_split_file(args.bundle / "split.csv", args.data)
    pick = np.random.default_rng(0).choice(len(splits["train"]), args.calibration, replace=False)
    train = cache_images([splits["train"][i] for i in pick], args.cache / f"int8_train_{args.calibration}.npy")
    val_items = splits["calibration"] + splits["report"]
    val = cache_images(val_items, args.cache / "int8_val.npy")
    y = np.array([it.label for it in val_items])
    q = quantize(bundle.net, train, args.float)

    torch.set_num_threads(1)
    x = make_batch(val, slice(0, 8), 224)
    modes = {"fp32": bundle.net, "int8": q} | ({"bf16": bundle.net} if precision.native_bf16() else {})
    print("forward+CAM, 1 thread, batch 8, images/s:",
          ", ".join(f"{m} {images_per_s(net, x, m):.1f}" for m, net in modes.items()))

    torch.set_num_threads(os.cpu_count() or 1)
    z32, e32 = outputs(bundle.net, val, "fp32")
    s32 = bundle.calibrator.predict(z32.double().numpy())
    v32 = bundle.ood.evaluate(e32, z32) if bundle.ood is not None else None
    print(f"validation: {len(y)} films; fp32 ROC-AUC {roc_auc_score(y, z32):.5f}")
    for mode in [m for m in modes if m != "fp32"]:
        z, e = outputs(modes[mode], val, mode)
        s = bundle.calibrator.predict(z.double().numpy())
        delta = np.abs(s - s32)
        line = (f"{mode}: ROC-AUC {roc_auc_score(y, z):.5f} (drop {roc_auc_score(y, z32) - roc_auc_score(y, z):.5f}), "
                f"calibrated score |change| max {delta.max():.4f}, p99 {np.quantile(delta, 0.99):.4f}, "
                f"flag agreement {np.mean((s >= bundle.threshold) == (s32 >= bundle.threshold)):.4f}")
        if v32 is not None:
            refused = [v.reason is not None for v in bundle.ood.evaluate(e, z)]
            line += f", OOD verdicts differ on {sum(a != (b.reason is not None) for a, b in zip(refused, v32))}"
        print(line)


if __name__ == "__main__":
    main()
