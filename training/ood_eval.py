"""Measures the OOD guard: AUROC, refusal rate per OOD family, false refusals on real validation films.

Families: the synthetic ones of training/ood_families.py (never seen by the fit) and real validation films
rotated 90/180/270° or inverted (their kind was seen by the orientation probe, on other films).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from core.ml.ood import ORIENTATIONS, OodGuard
from core.ml.preprocess import resize_gray
from training.ood import variant
from training.ood_families import FAMILIES, synthesise
from training.ood_shift import shift_table

SECTION = "## Out-of-distribution guard"
ROTATION_FAMILIES = {k: name for k, name in enumerate(ORIENTATIONS) if k}

Embedder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 [N,H,W] → (logits, embeddings)


def judge(guard: OodGuard, logits: np.ndarray, emb: np.ndarray) -> tuple[np.ndarray, list[str | None]]:
    """Returns (OOD scores, refusal reasons) of the guard for embedded films."""
    verdicts = guard.evaluate(torch.as_tensor(emb), torch.as_tensor(logits))
    return np.array([v.ood_score for v in verdicts]), [v.reason for v in verdicts]


def family_arrays(n_per_family: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The synthetic families as service-resized uint8 arrays [N,224,224]."""
    return {name: np.stack([resize_gray(im) for im in imgs]) for name, imgs in synthesise(n_per_family, seed).items()}


def evaluate_guard(guard: OodGuard, embedder: Embedder, *, val_in: dict[str, tuple[np.ndarray, np.ndarray]],
                   rotated: dict[str, tuple[np.ndarray, np.ndarray]], n_per_family: int = 60,
                   seed: int = 0) -> dict:
    """Returns the figures: per-family refusal rates, AUROC (validation vs OOD) and false-refusal rates.

    `val_in` maps a name ("calibration half", "report half") to (logits, embeddings) of upright validation
    films; `rotated` maps a rotation/inversion family to (logits, embeddings) of transformed validation films.
    """
    fams: dict[str, tuple[np.ndarray, np.ndarray]] = dict(rotated)
    for name, arr in family_arrays(n_per_family, seed).items():
        fams[name] = embedder(arr)
    per_family, ood_scores = {}, []
    for name, (z, e) in fams.items():
        s, reasons = judge(guard, z, e)
        refused = np.array([r is not None for r in reasons])
        by_ood = np.array([r is not None and "out of distribution" in r for r in reasons])
        per_family[name] = {"n": int(len(s)), "refused": float(refused.mean()), "refused_as_ood": float(by_ood.mean()),
                            "median_score": float(np.median(s)),
                            "seen_in_fit": name in ROTATION_FAMILIES.values()}
        ood_scores.append(s)
    in_scores, false_refusal = [], {}
    for name, (z, e) in val_in.items():
        s, reasons = judge(guard, z, e)
        in_scores.append(s)
        false_refusal[name] = {"n": int(len(s)), "refused": float(np.mean([r is not None for r in reasons]))}
    s_in, s_out = np.concatenate(in_scores), np.concatenate(ood_scores)
    y = np.r_[np.zeros(len(s_in)), np.ones(len(s_out))]
    auroc = float(roc_auc_score(y, np.r_[s_in, s_out]))
    per_family_auroc = {name: float(roc_auc_score(np.r_[np.zeros(len(s_in)), np.ones(len(s))], np.r_[s_in, s]))
                        for name, s in zip(fams, ood_scores)}
    return {"auroc_ood_score": auroc, "auroc_per_family": per_family_auroc, "families": per_family,
            "false_refusal": false_refusal, "threshold": guard.threshold,
            "n_per_synthetic_family": n_per_family, "seed": seed,
            "min_family_refusal": float(min(f["refused"] for f in per_family.values()))}


def rotated_families(embedder: Embedder, films: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Embeds real films in every wrong orientation/polarity: {family name: (logits, embeddings)}."""
    return {name: embedder(variant(films, k)) for k, name in ROTATION_FAMILIES.items()}


def report_section(ood: dict) -> str:
    """Markdown for the training report: how the guard was fitted and what it achieves."""
    ev = ood["evaluation"]
    rows = "\n".join(f"| {name} | {f['n']} | {f['refused']:.1%} | {f['refused_as_ood']:.1%} | {f['median_score']:.2f} "
                     f"| {ev['auroc_per_family'][name]:.4f} | {'yes (kind)' if f['seen_in_fit'] else 'no'} |"
                     for name, f in ev["families"].items())
    fr = "\n".join(f"| {name} | {f['n']} | {f['refused']:.2%} |" for name, f in ev["false_refusal"].items())
    return f"""{SECTION}

Films the model was not built for are refused as "not a frontal chest film (out of distribution, score X)".
Score: {ood['score']}; fitted on {ood['n_train']} training films (shrinkage {ood['shrinkage']:.3f}, energy weight
{ood['norm']['energy_weight']}). Threshold {ood['threshold']:.3f} ({ood['threshold_rule']}). Orientation/polarity: a
linear probe on the same embedding, trained on rotations/inversions of {ood['orientation']['probe_films']} training
films{_shift_fit(ood)}; {ood['orientation']['rule']} (upright_min {ood['orientation']['upright_min']:.4f}). Such films
are refused with the reason, not corrected silently. The synthetic families below were never seen by any fit.

AUROC of the OOD score, validation films vs all OOD families: **{ev['auroc_ood_score']:.4f}**.

| family | n | refused | refused as OOD | median score | AUROC | seen in fit |
|---|---|---|---|---|---|---|
{rows}

| real validation films | n | refused (false refusals) |
|---|---|---|
{fr}
""" + shift_table(ood) + (f"\nNote: {ood['notes']}\n" if ood.get("notes") else "")


def _shift_fit(ood: dict) -> str:
    """The report's words for the shift-augmented fit (training.ood_shift), empty for a clean-only guard."""
    fit = ood.get("shift_fit")
    if not fit:
        return ""
    return (f"; the Gaussians and the probe's upright class also hold {fit['n_films']} training films under "
            f"{', '.join(fit['perturbations'])} (shift suite), the other perturbations are held out of the fit")


def replace_section(readme: Path, section: str) -> None:
    """Puts the OOD section into a report README, replacing an earlier one (everything after its heading)."""
    text = readme.read_text() if readme.exists() else ""
    head = text.split(SECTION)[0].rstrip() + "\n\n" if SECTION in text else text.rstrip() + "\n\n"
    readme.write_text(head + section)


def bundle_embedder(bundle, bs: int = 32) -> Embedder:
    """Embeds uint8 films through a loaded bundle's own forward pass (its device and precision)."""
    from core.ml.preprocess import normalize

    def run(arrays: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embs = [], []
        for i in range(0, len(arrays), bs):
            z, _, e = bundle.forward(normalize(arrays[i:i + bs]))
            logits.append(z.numpy())
            embs.append(e.numpy())
        return np.concatenate(logits), np.concatenate(embs)
    return run


def evaluate_ood(bundle, data_root: Path, out_dir: Path, *, n_per_family: int = 60, seed: int = 0) -> dict:
    """`chestaid evaluate --ood`: the bundle's guard on its validation films and the synthesised OOD set."""
    from core.films.imaging import load_grayscale
    from training.data import read_split_file

    if bundle.ood is None:
        raise ValueError(f"bundle {bundle.version} has no OOD guard (fit one with python -m training.ood_bundle)")
    splits = read_split_file(bundle.directory / "split.csv", data_root)
    embedder = bundle_embedder(bundle)
    films = {name: np.stack([resize_gray(load_grayscale(it.path)) for it in splits[key]])
             for name, key in (("calibration half", "calibration"), ("report half", "report"))}
    result = evaluate_guard(bundle.ood, embedder, n_per_family=n_per_family, seed=seed,
                            val_in={name: embedder(arr) for name, arr in films.items()},
                            rotated=rotated_families(embedder, films["report half"]))
    result = {"model_version": bundle.version, "data": str(data_root), **result}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "ood_evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "ood_evaluation.md").write_text(
        f"# OOD evaluation — {bundle.version}\n\n" + report_section({**bundle.ood.meta, "evaluation": result}))
    return result
