"""Fits the out-of-distribution guard (core.ml.ood) on training-split embeddings and picks its thresholds.

Reads top to bottom: embeddings (cached) → Gaussians with shrinkage → orientation probe → energy weight →
thresholds on the calibration half of validation → tensors + JSON for the bundle. Only in-distribution
films (clean, and under a few shift-suite perturbations: training.ood_shift) and synthetic rotations/inversions
of chest films are used here; the non-chest families of the OOD
evaluation set (training/ood_eval.py) are never seen by the fit, so their figures measure generalisation.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from sklearn.covariance import LedoitWolf
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from core.ml import precision
from core.ml.ood import ORIENTATIONS, combined_score, energy, mahalanobis, orientation_probs
from training.ood_shift import GUARD_FIT_PERTURBATIONS, MAX_SHIFT_FALSE_REFUSAL, NOTES as SHIFT_NOTES

log = logging.getLogger(__name__)

MAX_FALSE_REFUSAL = 0.01  # the budget on real validation films, split between the two checks
PROBE_FILMS = 400  # training films whose rotations/inversions teach the orientation probe
VARIANT_FILMS = 150  # validation films per rotation/inversion family (weight choice and evaluation)
ENERGY_WEIGHTS = (0.0, 0.25, 0.5, 1.0)


def variant(arrays: np.ndarray, k: int) -> np.ndarray:
    """Returns uint8 films [N,H,W] in orientation k of core.ml.ood.ORIENTATIONS (0 = as given)."""
    if k == 4:
        return 255 - arrays
    return np.ascontiguousarray(np.rot90(arrays, -k, axes=(1, 2)))  # -k: clockwise quarter turns


@torch.inference_mode()
def embed(net, arrays: np.ndarray, mode: str, device: str = "cpu", bs: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Returns (logits [N], pooled norm5 embeddings [N,C]) of uint8 films, exactly as the service computes them."""
    from core.ml.preprocess import normalize
    logits, embs = [], []
    for i in range(0, len(arrays), bs):
        z, _, e = precision.run_with_embedding(net, normalize(arrays[i:i + bs]), torch.device(device), mode)
        logits.append(z.numpy())
        embs.append(e.numpy())
    return np.concatenate(logits), np.concatenate(embs)


def collect_embeddings(net, x_train: np.ndarray, x_cal: np.ndarray, x_rep: np.ndarray, mode: str,
                       cache: Path | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Embeds training, calibration and report films, plus rotated/inverted variants of some of them (cached)."""
    if cache is not None and cache.exists():
        return dict(np.load(cache))
    rng = np.random.default_rng(seed)
    probe_idx = rng.choice(len(x_train), min(PROBE_FILMS, len(x_train)), replace=False)
    cal_idx = rng.choice(len(x_cal), min(VARIANT_FILMS, len(x_cal)), replace=False)
    rep_idx = rng.choice(len(x_rep), min(VARIANT_FILMS, len(x_rep)), replace=False)
    out: dict[str, np.ndarray] = {"probe_idx": probe_idx, "cal_idx": cal_idx, "rep_idx": rep_idx}
    for name, arr in (("train", x_train), ("cal", x_cal), ("rep", x_rep)):
        out[f"{name}_logit"], out[f"{name}_emb"] = embed(net, arr, mode)
        log.info("embedded %d %s films", len(arr), name)
    for k in range(1, len(ORIENTATIONS)):
        for name, arr, idx in (("probe", x_train, probe_idx), ("calv", x_cal, cal_idx), ("repv", x_rep, rep_idx)):
            out[f"{name}{k}_logit"], out[f"{name}{k}_emb"] = embed(net, variant(arr[idx], k), mode)
        log.info("embedded variant %s", ORIENTATIONS[k])
    if cache is not None:
        np.savez(cache, **out)
    return out


def fit_gaussians(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Returns (class means [K,C], shared precision [C,C], Ledoit-Wolf shrinkage) from training embeddings."""
    classes = np.unique(labels)
    means = np.stack([emb[labels == k].mean(axis=0) for k in classes])
    centred = emb - means[np.searchsorted(classes, labels)]
    lw = LedoitWolf(assume_centered=True).fit(centred)  # shrinkage: 1024 dims from a few thousand films
    return means, lw.precision_, float(lw.shrinkage_)


def fit_probe(emb_by_k: list[np.ndarray], emb_mean: np.ndarray, emb_scale: np.ndarray,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fits the multinomial orientation probe on embeddings of films in each orientation k; returns (W, b)."""
    x = np.concatenate([(e - emb_mean) / emb_scale for e in emb_by_k])
    y = np.concatenate([np.full(len(e), k) for k, e in enumerate(emb_by_k)])
    clf = LogisticRegression(C=0.1, max_iter=3000, random_state=seed).fit(x, y)
    return clf.coef_.astype(np.float32), clf.intercept_.astype(np.float32)


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def guard_scores(tensors: dict, norm: dict, emb: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The combined OOD score of embeddings under fitted statistics (numpy in, numpy out)."""
    d = mahalanobis(_t(emb), tensors["class_means"], tensors["precision"])
    return combined_score(d, _t(logits), norm).numpy()


def upright_prob(tensors: dict, emb: np.ndarray) -> np.ndarray:
    """Returns (P(upright), argmax orientation) of the probe for embeddings."""
    p = orientation_probs(_t(emb), tensors["emb_mean"], tensors["emb_scale"], tensors["probe_weight"],
                          tensors["probe_bias"]).numpy()
    return p[:, 0], p.argmax(axis=1)


def joint_threshold(scores: np.ndarray, refused_otherwise: np.ndarray, budget: float = MAX_FALSE_REFUSAL) -> float:
    """The lowest OOD threshold at which real films refused by either check stay within the budget.

    Films the orientation check refuses already use up part of the budget; the OOD check gets the rest, so the
    stated false-refusal rate is spent in full on catching strange pictures.
    """
    allowed = int(np.floor(budget * len(scores))) - int(refused_otherwise.sum())
    free = np.sort(scores[~refused_otherwise])[::-1]  # films the OOD check alone would refuse, highest first
    if allowed < 0 or len(free) == 0:
        return float(free[0]) if len(free) else float("inf")
    return float(free[min(allowed, len(free) - 1)])


def fit_guard(e: dict[str, np.ndarray], train_labels: np.ndarray,
              shifted: dict[str, np.ndarray] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Fits the guard from collect_embeddings' output; returns (tensors, JSON meta without file/sha).

    `shifted` (training.ood_shift.collect_shift_embeddings) adds training films under the fitted shift-suite
    perturbations to the Gaussians and to the probe's upright class, and its calibration-half films under those
    perturbations to the threshold rule: real chest films acquired differently are in distribution. Thresholds
    are picked on the calibration half only; the report half is left to measure the rates.
    """
    fit_emb, fit_logit, fit_labels = e["train_emb"], e["train_logit"], np.asarray(train_labels)
    upright = e["train_emb"][e["probe_idx"]]
    if shifted is not None:
        fit_emb = np.concatenate([fit_emb, shifted["aug_emb"]])
        fit_logit = np.concatenate([fit_logit, shifted["aug_logit"]])
        fit_labels = np.concatenate([fit_labels, shifted["aug_label"]])
        upright = np.concatenate([upright, shifted["aug_emb"]])
    means, prec, shrinkage = fit_gaussians(fit_emb, fit_labels)
    emb_mean = e["train_emb"].mean(axis=0)
    emb_scale = e["train_emb"].std(axis=0) + 1e-3
    w, b = fit_probe([upright] + [e[f"probe{k}_emb"] for k in range(1, len(ORIENTATIONS))], emb_mean, emb_scale)
    tensors = {"class_means": _t(means), "precision": _t(prec), "emb_mean": _t(emb_mean),
               "emb_scale": _t(emb_scale), "probe_weight": _t(w), "probe_bias": _t(b)}
    d_train = mahalanobis(_t(fit_emb), tensors["class_means"], tensors["precision"]).numpy()
    en_train = energy(_t(fit_logit)).numpy()
    base = {"distance_mean": float(d_train.mean()), "distance_std": float(d_train.std()),
            "energy_mean": float(en_train.mean()), "energy_std": float(en_train.std() + 1e-6)}
    # The energy weight is chosen on seen families only (rotated/inverted calibration films), never on the
    # held-out synthetic families.
    seen_emb = np.concatenate([e[f"calv{k}_emb"] for k in range(1, len(ORIENTATIONS))])
    seen_logit = np.concatenate([e[f"calv{k}_logit"] for k in range(1, len(ORIENTATIONS))])
    y = np.r_[np.zeros(len(e["cal_emb"])), np.ones(len(seen_emb))]
    aurocs = {}
    for wgt in ENERGY_WEIGHTS:
        norm = {**base, "energy_weight": wgt}
        s = np.r_[guard_scores(tensors, norm, e["cal_emb"], e["cal_logit"]), guard_scores(tensors, norm, seen_emb, seen_logit)]
        aurocs[wgt] = float(roc_auc_score(y, s))
    weight = max(aurocs, key=lambda k: (round(aurocs[k], 4), -k))  # ties go to the simpler score
    norm = {**base, "energy_weight": weight}
    budget = MAX_FALSE_REFUSAL / 2
    p_up, top = upright_prob(tensors, e["cal_emb"])
    upright_min = float(min(0.5, np.quantile(p_up, budget)))
    threshold = joint_threshold(guard_scores(tensors, norm, e["cal_emb"], e["cal_logit"]),
                                (p_up < upright_min) & (top != 0))
    rule = (f"lowest score threshold keeping the calibration half's refusals (OOD or orientation) "
            f"<= {MAX_FALSE_REFUSAL:.0%}")
    if shifted is not None:
        s_emb = np.concatenate([shifted[f"cal:{n}:emb"] for n in GUARD_FIT_PERTURBATIONS])
        s_logit = np.concatenate([shifted[f"cal:{n}:logit"] for n in GUARD_FIT_PERTURBATIONS])
        sp_up, s_top = upright_prob(tensors, s_emb)
        # Both budgets must hold, so the higher (more accepting) of the two thresholds is kept.
        threshold = max(threshold, joint_threshold(guard_scores(tensors, norm, s_emb, s_logit),
                                                   (sp_up < upright_min) & (s_top != 0), MAX_SHIFT_FALSE_REFUSAL))
        rule += (f", and those of its films under the fitted shift-suite perturbations "
                 f"({', '.join(GUARD_FIT_PERTURBATIONS)};"
                 f" pooled) <= {MAX_SHIFT_FALSE_REFUSAL:.0%}")
    meta = {"score": "Mahalanobis distance of pooled features.norm5 to class means (shared Ledoit-Wolf covariance), "
                     "standardised, plus energy_weight x standardised energy",
            "embedding": "features.norm5, ReLU, global average pool (1024)", "fitted_on": "training split",
            "n_train": int(len(train_labels)), "shrinkage": shrinkage, "norm": norm,
            "shift_fit": None if shifted is None else {
                "perturbations": list(GUARD_FIT_PERTURBATIONS), "n_films": int(len(shifted["aug_label"])),
                "rule": "training films under these shift-suite perturbations join the class Gaussians and the "
                        "probe's upright class; every other perturbation is held out of the guard's fit"},
            **({"notes": SHIFT_NOTES} if shifted is not None else {}),
            "energy_weight_selection": {str(k): v for k, v in aurocs.items()},
            "threshold": threshold,
            "threshold_rule": rule,
            "orientation": {"labels": list(ORIENTATIONS), "upright_min": upright_min,
                            "rule": f"refuse when argmax is not upright and P(upright) < upright_min "
                                    f"(calibration-half quantile {budget}, at most 0.5)",
                            "probe_films": int(len(e["probe_idx"]))}}
    return tensors, meta
