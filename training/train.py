"""Trains the DenseNet-121 pneumonia classifier; `chestaid train` runs this, then training.finalize.

Reads top to bottom: split → cache → model → epochs (with checkpoints and resume) → best weights.
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
from torchvision.transforms import v2
from tqdm import tqdm

from core.imaging import load_grayscale
from core.model import build_network
from core.preprocess import INPUT_SIZE, normalize, resize_gray
from training.data import make_splits, read_split_file, write_split_file


@dataclass
class TrainConfig:
    data: str
    out: str
    init: str = "none"
    schedule: str = "128:14,224:6"  # progressive resizing: resolution:epochs, ...
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 5  # early stopping, in epochs without a better validation ROC-AUC
    seed: int = 0
    limit: int = 0  # use only this many images per split (smoke runs); 0 = all
    threads: int = 0


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


AUGMENT = v2.Compose([v2.RandomRotation(5), v2.ColorJitter(brightness=0.1, contrast=0.1)])


def make_batch(arrays: np.ndarray, idx, res: int, augment: bool) -> torch.Tensor:
    """Builds a normalised channels_last batch at resolution res, augmenting when training."""
    x = torch.from_numpy(arrays[idx]).unsqueeze(1)  # uint8 [B,1,224,224]
    if augment:
        x = torch.stack([AUGMENT(img) for img in x])
    x = x.float().div_(255.0)
    if res != INPUT_SIZE:
        x = F.interpolate(x, size=(res, res), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision: bf16 autocast on CPU, fp16 AMP on CUDA."""
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype, enabled=enabled)


@torch.no_grad()
def predict_logits(net, arrays: np.ndarray, res: int = INPUT_SIZE, bf16: bool = True, bs: int = 64) -> np.ndarray:
    """Returns the logits of the network on uint8 images, in eval mode (mixed precision when bf16)."""
    net.eval()
    device = next(net.parameters()).device
    out = []
    for i in range(0, len(arrays), bs):
        x = make_batch(arrays, slice(i, i + bs), res, augment=False).to(device)
        with autocast(device, enabled=bf16):
            out.append(net(x).float().squeeze(1).cpu())
    return torch.cat(out).numpy()


def main(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

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

    # 2. Decode once; every epoch then reads uint8 arrays from memory.
    x_train = cache_images(splits["train"], out / "cache_train.npy")
    x_val = cache_images(val_items, out / "cache_val.npy")

    # 3. Model, loss weighted so both classes weigh the same, optimiser, plateau schedule.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = build_network(cfg.init).to(device, memory_format=torch.channels_last)
    pos_weight = float((y_train == 0).sum() / max((y_train == 1).sum(), 1))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight, device=device))
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")  # fp16 needs loss scaling
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1)
    state = {"epoch": 0, "best_auc": -1.0, "best_epoch": 0, "phase_start": 0}

    ckpt = out / "checkpoint.pt"
    if ckpt.exists():  # resume
        saved = torch.load(ckpt, map_location=device, weights_only=True)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"].cpu())
        print(f"resumed after epoch {state['epoch']}")

    # 4. Epochs, phase by phase; early stopping and "best" restart with each resolution.
    log_file = out / "train_log.jsonl"
    plan = [res for res, n in phases(cfg.schedule) for _ in range(n)]
    (out / "train_config.json").write_text(json.dumps({**asdict(cfg), "pos_weight": pos_weight}, indent=2))
    for epoch in range(state["epoch"], len(plan)):
        res = plan[epoch]
        if epoch > 0 and plan[epoch - 1] != res and state["phase_start"] != epoch:
            state.update(phase_start=epoch, best_auc=-1.0, best_epoch=epoch)
            for group in opt.param_groups:  # a new resolution restarts from a lower learning rate
                group["lr"] = cfg.lr / 3
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.3, patience=1)
        if epoch - state["best_epoch"] > cfg.patience and res == plan[-1]:
            print(f"early stop at epoch {epoch}: no better validation ROC-AUC for {cfg.patience} epochs")
            break
        elif epoch - state["best_epoch"] > cfg.patience:
            continue  # skip to the next phase
        t0 = time.time()
        net.train()
        order = np.random.permutation(len(x_train))
        n_batches = math.ceil(len(order) / cfg.batch_size)
        total = 0.0
        bar = tqdm(range(n_batches), desc=f"epoch {epoch + 1}/{len(plan)} @{res}px", leave=False)
        for b in bar:
            idx = np.sort(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
            x = make_batch(x_train, idx, res, augment=True).to(device, non_blocking=True)
            y = torch.from_numpy(y_train[idx]).float().to(device)
            with autocast(device):
                logits = net(x).squeeze(1)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss.item():.4f}")

        val_logits = predict_logits(net, x_val, res)
        auc = roc_auc_score(y_val, val_logits)
        ap = average_precision_score(y_val, val_logits)
        sched.step(auc)
        if auc > state["best_auc"]:
            state.update(best_auc=float(auc), best_epoch=epoch)
            torch.save(net.state_dict(), out / "best.pt")
        state["epoch"] = epoch + 1
        row = {"epoch": epoch + 1, "res": res, "loss": total / len(order), "val_roc_auc": auc, "val_pr_auc": ap,
               "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1), "best": state["best_epoch"] + 1}
        print(json.dumps(row), flush=True)
        with open(log_file, "a") as f:
            f.write(json.dumps(row) + "\n")
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "state": state, "rng": torch.get_rng_state()}, ckpt)
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
