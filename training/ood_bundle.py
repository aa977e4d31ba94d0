"""Fits, evaluates and installs the OOD guard into a bundle (used by finalize; runnable on a shipped bundle).

The weights are never rewritten: only ood.safetensors, bundle.json's "ood" section and the report change.
    python -m training.ood_bundle --bundle models/default --data ../shared/data/chest_xray
"""
from __future__ import annotations

import argparse
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch

from core.ml import precision
from core.ml.bundle import bf16_allowed, load_network, read_meta, write_meta
from core.ml.ood import ORIENTATIONS, OodGuard, save_guard
from training.ood import collect_embeddings, embed, fit_guard
from training.ood_eval import evaluate_guard, replace_section, report_section
from training.ood_shift import collect_shift_embeddings, shift_refusals

log = logging.getLogger(__name__)


def install_guard(bundle_dir: Path, net, mode: str, *, x_train: np.ndarray, y_train: np.ndarray, x_cal: np.ndarray,
                  x_rep: np.ndarray, items: dict[str, list] | None = None, cache: Path | None = None,
                  shift_cache: Path | None = None, n_per_family: int = 60) -> dict:
    """Fits the guard on training films, evaluates it, writes ood.safetensors; returns bundle.json's "ood" dict.

    `items` (the split's "train", "calibration", "report" items, same order as the arrays) lets the guard learn
    and be measured on films under shift-suite perturbations (training.ood_shift), which act on the decoded film.
    """
    embedder = partial(embed, net, mode=mode)
    e = collect_embeddings(net, x_train, x_cal, x_rep, mode, cache=cache)
    shifted = None if items is None else collect_shift_embeddings(
        embedder, train_items=items["train"], cal_items=items["calibration"], rep_items=items["report"],
        cache=shift_cache)
    tensors, meta = fit_guard(e, y_train, shifted)
    guard = OodGuard(tensors, meta)
    # Rotated/inverted families for the figures come from the report half (the threshold used the calibration
    # half); the probe learnt these kinds from other, training films.
    rotated = {ORIENTATIONS[k]: (e[f"repv{k}_logit"], e[f"repv{k}_emb"]) for k in range(1, len(ORIENTATIONS))}
    meta["evaluation"] = evaluate_guard(
        guard, embedder, n_per_family=n_per_family, rotated=rotated,
        val_in={"calibration half (threshold chosen here)": (e["cal_logit"], e["cal_emb"]),
                "report half": (e["rep_logit"], e["rep_emb"])})
    if shifted is not None:
        meta["evaluation"]["shift_false_refusal"] = shift_refusals(guard, shifted)
    meta["embedding_precision"] = mode
    return save_guard(bundle_dir, tensors, meta)


def guard_mode(meta: dict) -> str:
    """The precision to embed in: the CPU service's (bf16 where the bundle allows it), so scores match it."""
    return "bf16" if bf16_allowed(meta) and precision.native_bf16() else "fp32"


def main(argv: list[str] | None = None) -> dict:
    """Adds the guard to an existing bundle from its split.csv (training split fits, validation thresholds)."""
    from training.data import read_split_file
    from training.train import cache_images

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("models/default"))
    ap.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    ap.add_argument("--cache", type=Path, default=Path("runs/ood"), help="Image and embedding caches.")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (leave cores to the service)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    meta = read_meta(args.bundle)
    splits = read_split_file(args.bundle / "split.csv", args.data)
    mode = guard_mode(meta)
    net = load_network(args.bundle)
    precision.prepare(net, torch.device("cpu"), mode)
    ood = install_guard(args.bundle, net, mode,
                        x_train=cache_images(splits["train"], args.cache / "cache_train.npy"),
                        y_train=np.array([it.label for it in splits["train"]]),
                        x_cal=cache_images(splits["calibration"], args.cache / "cache_cal.npy"),
                        x_rep=cache_images(splits["report"], args.cache / "cache_rep.npy"),
                        items=splits, cache=args.cache / "embeddings.npz",
                        shift_cache=args.cache / "shift_embeddings.npz")
    meta = read_meta(args.bundle)  # read again: others may have added sections while the guard was fitted
    meta["ood"] = ood
    write_meta(args.bundle, meta)
    replace_section(args.bundle / "report" / "README.md", report_section(ood))
    ev = ood["evaluation"]
    print(f"OOD guard installed in {args.bundle}: AUROC {ev['auroc_ood_score']:.4f}, lowest family refusal "
          f"{ev['min_family_refusal']:.1%}, false refusals {ev['false_refusal']}")
    return ood


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
