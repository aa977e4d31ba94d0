"""Real chest films under acquisition shifts, for the OOD guard: they are in distribution and must be accepted.

A guard fitted on clean training films only refused most films framed or exposed differently (measured on the
shipped bundle: bright collimation edges 100 %, black padding 95 %, 8 % translation 67 %, noise 55 %), although
the model scores them well (training/shift.py). Such films are what another hospital sends, so:

- the class Gaussians and the orientation probe's "upright" class are also fitted on training films under the
  shift suite's GUARD_FIT_PERTURBATIONS (the four that moved the embedding furthest); every other perturbation
  (contrast, brightness, blur, zoom/crop, sharpening, JPEG, resampling, text) stays out of the fit, so the
  report shows how the guard generalises to shifts it never saw;
- the threshold also keeps the calibration half's films under the fitted perturbations within
  MAX_SHIFT_FALSE_REFUSAL (clean films keep their own 1 % budget);
- the false-refusal rate of every perturbation is reported on the report half.

Fitting more perturbations was measured and rejected: it widens the shared covariance until synthetic gradients
pass (see bundle.json ood.notes).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.films.imaging import load_grayscale
from training import shift

log = logging.getLogger(__name__)

GUARD_FIT_PERTURBATIONS = ("noise_12", "translate_0.08", "pad_0.12", "collimation")
AUG_FILMS = 200  # training films per fitted perturbation (each film used once, under one perturbation)
SHIFT_FILMS = 100  # seeded, stratified validation films per half and perturbation (threshold and report)
MAX_SHIFT_FALSE_REFUSAL = 0.05  # pooled over the fitted perturbations on the calibration half

NOTES = ("The fitted perturbations and the 5 % shift budget were chosen by comparing configurations on the shift "
         "suite's report-half films and on synthetic OOD families generated with another seed (3, 40 per family) than "
         "the evaluation in this section (seed 0): fitting all 13 perturbations of the non-held-out families "
         "(or 200 instead of "
         "50 films each) widened the shared covariance until 30-60 % of synthetic gradients scored below any threshold "
         "that accepted collimated films, so only the four perturbations that moved the embedding furthest are fitted. "
         "The synthetic families have thus been looked at, at another seed; no family was used to fit any statistic. "
         "Earlier, the threshold rule was changed once after its first evaluation refused 91.7 % of gradients.")

Embedder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # uint8 [N,224,224] → (logits, embeddings)


def _films(items: Sequence) -> list:
    return [load_grayscale(it.path) for it in items]


def collect_shift_embeddings(embedder: Embedder, *, train_items: Sequence, cal_items: Sequence, rep_items: Sequence,
                             seed: int = 0, cache: Path | None = None) -> dict[str, np.ndarray]:
    """Embeds shifted films (cached): training films for the fit, both validation halves under every perturbation.

    Perturbations act on the decoded film at its own size, as in the shift suite and the service. Keys:
    aug_emb/aug_logit/aug_label (fit), cal:<name>:emb|logit and rep:<name>:emb|logit (threshold, report).
    """
    if cache is not None and cache.exists():
        return dict(np.load(cache))
    rng = np.random.default_rng([seed, 14])
    pick = rng.choice(len(train_items), min(len(train_items), AUG_FILMS * len(GUARD_FIT_PERTURBATIONS)), replace=False)
    out: dict[str, np.ndarray] = {"aug_idx": pick}
    embs, logits, labels = [], [], []
    for k, name in enumerate(GUARD_FIT_PERTURBATIONS):
        items = [train_items[i] for i in pick[k::len(GUARD_FIT_PERTURBATIONS)]]
        z, e = embedder(shift.perturbed_arrays(shift.BY_NAME[name], _films(items), seed=seed + 1))
        embs.append(e), logits.append(z), labels.append(np.array([it.label for it in items]))
        log.info("embedded %d training films under %s", len(items), name)
    out["aug_emb"], out["aug_logit"], out["aug_label"] = map(np.concatenate, (embs, logits, labels))
    for half, items in (("cal", cal_items), ("rep", rep_items)):
        idx = shift.seeded_subset([it.label for it in items], SHIFT_FILMS, seed)
        out[f"{half}_shift_idx"] = idx
        films = _films([items[i] for i in idx])
        for p in shift.PERTURBATIONS:
            out[f"{half}:{p.name}:logit"], out[f"{half}:{p.name}:emb"] = embedder(
                shift.perturbed_arrays(p, films, seed=seed))
        log.info("embedded %d %s films under every perturbation", len(films), half)
    if cache is not None:
        np.savez(cache, **out)
    return out


def shift_refusals(guard, s: dict[str, np.ndarray]) -> dict:
    """False-refusal rate of the guard per perturbation on both halves (real chest films: every refusal is false)."""
    out = {}
    for p in shift.PERTURBATIONS:
        row = {"family": p.family, "fitted": p.name in GUARD_FIT_PERTURBATIONS}
        for half, key in (("calibration", "cal"), ("report", "rep")):
            verdicts = guard.evaluate(torch.as_tensor(s[f"{key}:{p.name}:emb"]),
                                      torch.as_tensor(s[f"{key}:{p.name}:logit"]))
            row[half] = float(np.mean([v.refused for v in verdicts]))
            row[f"{half}_by_orientation"] = float(np.mean([v.refused and "orientation" in v.reason for v in verdicts]))
            row["n"] = len(verdicts)
        out[p.name] = row
    return out


def shift_table(ood: dict) -> str:
    """Markdown: false refusals per shift-suite perturbation (report half; calibration half for reference)."""
    rows = ood["evaluation"].get("shift_false_refusal")
    if not rows:
        return ""
    lines = ["| perturbation | family | in the guard's fit | refused, report half | of which orientation | "
             "refused, calibration half |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['family']} | {'yes' if r['fitted'] else 'no'} | {r['report']:.0%} "
                     f"| {r['report_by_orientation']:.0%} | {r['calibration']:.0%} |")
    n = next(iter(rows.values()))["n"]
    held = [r["report"] for r in rows.values() if not r["fitted"]]
    return (f"\nFalse refusals of real validation films under the shift suite ({n} films per half and perturbation, "
            f"seed {ood['evaluation']['seed']}); mean over perturbations not in the fit "
            f"{np.mean(held):.1%}, worst {max(held):.0%}.\n\n" + "\n".join(lines) + "\n")
