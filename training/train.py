"""Trains the DenseNet-121 pneumonia classifier; `chestaid train` runs this, then training.finalize.

Reads top to bottom: split → cache → model → epochs (with checkpoints and resume) → best weights.
Each epoch is scored on clean validation and on the shift suite (training.shift); the weights kept and the
early stop follow training.selection (shift-suite mean first, clean ROC-AUC as tie-break).
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from core.films.imaging import load_grayscale
from core.ml import precision
from core.ml.network import build_network
from core.ml.preprocess import INPUT_SIZE, normalize, resize_gray
from training import augment, shift
from training.data import make_splits, read_split_file, write_split_file
from training.selection import EpochScore, best_of, is_better, should_stop


@dataclass
class TrainConfig:
    data: str
    out: str
    init: str = "none"
    schedule: str = "128:14,224:6"  # progressive resizing: resolution:epochs, ...
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5  # early stopping, in epochs without a better shift-suite score (training.selection)
    seed: int = 0
    limit: int = 0  # use only this many images per split (smoke runs); 0 = all
    threads: int = 0
    augment: str = "robust"  # training.augment: "robust", "basic", "none" or a comma list of pieces
    label_smoothing: float = 0.05  # 0 = off
    ema: float = 0.998  # EMA decay of the weights evaluated and shipped; 0 = off (the raw weights)
    shift_films: int = 200  # seeded, stratified validation subset the per-epoch shift suite runs on; 0 = all
    precision: str = "auto"  # auto (by hardware, see training_precision) | fp32 | bf16 | fp16 (CUDA)


def phases(schedule: str) -> list[tuple[int, int]]:
    """Parses "128:14,224:6" into [(128, 14), (224, 6)]."""
    return [tuple(int(v) for v in part.split(":")) for part in schedule.split(",")]


def cache_images(items, cache_file: Path) -> np.ndarray:
    """Returns all items as uint8 [N,224,224] via the service's own load+resize, cached on disk."""
    if cache_file.exists():
        arr = np.load(cache_file)
        if len(arr) == len(items):
            return arr
    arr = np.stack([resize_gray(load_grayscale(it.path)) for it in tqdm(items, desc=f"cache {cache_file.stem}")])
    np.save(cache_file, arr)
    return arr


def make_batch(arrays: np.ndarray, idx, res: int, augment=None) -> torch.Tensor:
    """Builds a normalised channels_last batch at resolution res; `augment` (training.augment.build) per film.

    Without augmentation at 224 px this is exactly core.ml.preprocess's normalisation of the cached service resize.
    """
    x = torch.from_numpy(arrays[idx]).unsqueeze(1).float().div_(255.0)  # [B,1,224,224] in 0..1
    if augment is not None:
        x = torch.stack([augment(img) for img in x])
    if res != INPUT_SIZE:
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x)


def training_precision(device: torch.device, forced: str = "auto") -> tuple[str, str]:
    """Picks the training precision by hardware, as core.ml.precision does for inference; returns (mode, reason).

    A CPU without native bf16 emulates it about 5x slower than fp32, so it trains in fp32; a CPU with native
    bf16 (oneDNN AVX512-BF16/AMX) trains under bf16 autocast; CUDA uses bf16 autocast where the GPU supports
    it and fp16 AMP with loss scaling otherwise.
    """
    allowed = ("fp32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    if forced != "auto":
        if forced not in allowed:
            raise ValueError(f"training precision {forced!r} is not available on {device.type} "
                             f"(choose {', '.join(allowed)})")
        return forced, "forced by --precision"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "CUDA with bf16 support: bf16 autocast"
        return "fp16", "CUDA without bf16: fp16 AMP with loss scaling"
    if precision.native_bf16():
        return "bf16", "CPU with native bf16 (oneDNN reports AVX512-BF16/AMX): bf16 autocast"
    return "fp32", "CPU without native bf16: emulated bf16 is about 5x slower than fp32, so fp32"


def autocast(device: torch.device, mode: str):
    """Autocast for a precision mode: bf16 or fp16 autocast, none for fp32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@torch.no_grad()
def predict_logits(net, arrays: np.ndarray, res: int = INPUT_SIZE, bf16: bool = True, bs: int = 64,
                   mode: str | None = None) -> np.ndarray:
    """Returns the logits of the network on uint8 images, in eval mode.

    `mode` names the precision; without it, bf16 picks mixed precision (bf16 on CPU, fp16 on CUDA) or fp32.
    """
    net.eval()
    device = next(net.parameters()).device
    if mode is None:
        mode = ("fp16" if device.type == "cuda" else "bf16") if bf16 else "fp32"
    out = []
    for i in range(0, len(arrays), bs):
        x = make_batch(arrays, slice(i, i + bs), res).to(device)
        with autocast(device, mode):
            out.append(net(x).float().squeeze(1).cpu())
    return torch.cat(out).numpy()


def ema_model(net: torch.nn.Module, decay: float) -> AveragedModel:
    """An exponential moving average of weights and BN buffers, with warm-up: decay min(decay, (1+n)/(10+n)).

    The warm-up keeps the first averages from being dominated by the random initial weights.
    """
    def update(averaged, current, n):
        d = min(decay, (1.0 + float(n)) / (10.0 + float(n)))
        pairs = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if pairs:
            torch._foreach_lerp_([a for a, _ in pairs], [c for _, c in pairs], 1.0 - d)
        for a, c in zip(averaged, current):
            if not a.is_floating_point():  # BN's num_batches_tracked
                a.copy_(c)
    return AveragedModel(net, multi_avg_fn=update, use_buffers=True)


def shift_cache(items, cache_file: Path, seed: int) -> np.ndarray:
    """Returns uint8 [P,N,224,224]: the shift suite's perturbations of these films, computed once and cached."""
    if cache_file.exists():
        arr = np.load(cache_file)
        if arr.shape[:2] == (len(shift.PERTURBATIONS), len(items)):
            return arr
    arr = shift.suite_arrays([load_grayscale(it.path) for it in items], seed=seed)
    np.save(cache_file, arr)
    return arr


def main(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    aug = augment.build(augment.parse(cfg.augment), INPUT_SIZE)  # a bad --augment fails before any work

    # 1. Patient-grouped split, written beside the model so it can be reproduced.
    root = Path(cfg.data)
    split_file = out / "split.csv"
    if split_file.exists():
        splits = read_split_file(split_file, root)
    else:
        splits = make_splits(root, seed=cfg.seed)
        if cfg.limit:
            splits = {k: _limit(v, cfg.limit, cfg.seed) for k, v in splits.items()}
        write_split_file(splits, root, split_file)
    val_items = splits["calibration"] + splits["report"]
    y_train = np.array([it.label for it in splits["train"]])
    y_val = np.array([it.label for it in val_items])

    # 2. Decode once; every epoch then reads uint8 arrays from memory. The shift suite runs each epoch on a
    # fixed, seeded, class-stratified subset of validation (cfg.shift_films), perturbed once from the films.
    x_train = cache_images(splits["train"], out / "cache_train.npy")
    x_val = cache_images(val_items, out / "cache_val.npy")
    shift_idx = shift.seeded_subset(y_val, cfg.shift_films, cfg.seed)
    y_shift = y_val[shift_idx]
    x_shift = shift_cache([val_items[i] for i in shift_idx], out / f"cache_shift_{len(shift_idx)}_s{cfg.seed}.npy",
                          cfg.seed)

    # 3. Model (and its weight average), loss weighted so both classes weigh the same, optimiser, schedule.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mode, why = training_precision(device, cfg.precision)
    print(f"training precision: {device.type} {mode} ({why})", flush=True)
    net = build_network(cfg.init).to(device, memory_format=torch.channels_last)
    ema = ema_model(net, cfg.ema) if cfg.ema else None
    scored = ema.module if ema is not None else net  # the one network evaluated, kept and shipped
    pos_weight = float((y_train == 0).sum() / max((y_train == 1).sum(), 1))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    scaler = torch.amp.GradScaler(device.type, enabled=mode == "fp16")  # fp16 needs loss scaling
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1)
    state = {"epoch": 0, "phase_start": 0, "history": []}

    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # resume
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(saved["model"])
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = {**saved["state"], "history": saved["state"].get("history", [])}
        torch.set_rng_state(saved["rng"].cpu())
        print(f"resumed after epoch {state['epoch']}")

    # 4. Epochs, phase by phase; selection and early stopping restart with each resolution.
    log_file = out / "train_log.jsonl"
    plan = [res for res, n in phases(cfg.schedule) for _ in range(n)]
    (out / "train_config.json").write_text(json.dumps({
        **asdict(cfg), "pos_weight": pos_weight, "device": device.type, "precision_mode": mode,
        "precision_reason": why, "shift_films_n": int(len(shift_idx)),
        "selection": "shift-suite mean ROC-AUC, clean validation ROC-AUC as tie-break (training.selection)",
        "held_out_shift_families": list(shift.HELD_OUT_FAMILIES)}, indent=2))
    for epoch in range(state["epoch"], len(plan)):
        res = plan[epoch]
        if epoch > 0 and plan[epoch - 1] != res and state["phase_start"] != epoch:
            state.update(phase_start=epoch, history=[])
            for group in opt.param_groups:  # a new resolution restarts from a lower learning rate
                group["lr"] = cfg.lr / 3
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1)
        history = [EpochScore(**h) for h in state["history"]]
        if should_stop(history, patience=cfg.patience):
            if res == plan[-1]:
                print(f"early stop at epoch {epoch}: no better shift-suite score for {cfg.patience} epochs")
                break
            continue  # skip to the next phase
        t0 = time.time()
        net.train()
        order = np.random.permutation(len(x_train))
        n_batches = math.ceil(len(order) / cfg.batch_size)
        total = 0.0
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{len(plan)} @{res}px", leave=False)
        for b in bar:
            idx = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            x = make_batch(x_train, idx, res, aug).to(device, non_blocking=True)
            y = augment.smooth_labels(torch.from_numpy(y_train[idx]).float(), cfg.label_smoothing).to(device)
            with autocast(device, mode):
                logits = net(x).squeeze(1)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(net)
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")

        val_logits = predict_logits(scored, x_val, res, mode=mode)
        auc = float(roc_auc_score(y_val, val_logits))
        ap = average_precision_score(y_val, val_logits)
        suite = shift.summarize_arrays(lambda a: predict_logits(scored, a, res, mode=mode), x_shift, y_shift, auc)
        score = EpochScore(epoch + 1, suite["mean_roc_auc"], auc)
        if is_better(score, best_of(history) if history else None):
            torch.save(scored.state_dict(), out / "best.pt")
        history.append(score)
        sched.step(score.shift_mean)
        state.update(epoch=epoch + 1, history=[asdict(h) for h in history])
        row = {"epoch": epoch + 1, "res": res, "loss": total / len(order), "val_roc_auc": auc, "val_pr_auc": ap,
               "shift_mean_roc_auc": suite["mean_roc_auc"], "shift_worst": suite["worst"],
               "shift_held_out_mean": suite["mean_held_out"], "precision": mode,
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1), "best": best_of(history).epoch}
        print(json.dumps(row), flush=True)
        with open(log_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        torch.save({"model": net.state_dict(), "ema": ema.state_dict() if ema is not None else None,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "state": state,
                    "rng": torch.get_rng_state()}, ckpt)
    return out / "best.pt"


def _limit(items, n, seed):
    """Keeps n items, both classes represented (smoke runs)."""
    rng = random.Random(seed)
    pos = [i for i in items if i.label == 1]
    neg = [i for i in items if i.label == 0]
    rng.shuffle(pos)
    rng.shuffle(neg)
    half = max(n // 2, 1)
    return neg[:half] + pos[: n - half]
