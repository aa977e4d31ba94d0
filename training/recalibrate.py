"""Local recalibration: fit a new calibrator and threshold on a hospital's feedback, keep the weights."""
from __future__ import annotations

import datetime as dt
import json
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold

from core.calibrations import version_name
from core.feedback import read_feedback_csv
from core.ml.calibration import (CALIBRATORS, brier, calibrator_from_dict, calibrator_to_dict, confusion_at,
                                 expected_calibration_error, threshold_for_sensitivity)
from core.settings import DEFAULT_TARGET_SENSITIVITY
from training.report import ECE_DEFINITION, plot_curves

if TYPE_CHECKING:  # core.ml.bundle imports torch, which the web process (web.performance) never loads
    from core.ml.bundle import BundleMeta

MIN_CASES = 30
RECOMMENDED_CASES = 100


class RecalibrationRefused(ValueError):
    """Raised when the feedback cannot support a recalibration."""


def check_cohort(labels: list[int], versions: set[str], model_version: str) -> list[str]:
    """Refuses unusable cohorts and returns warnings for small ones."""
    n, n_pos = len(labels), int(sum(labels))
    if versions - {model_version}:
        raise RecalibrationRefused(f"feedback contains logits from model(s) {sorted(versions - {model_version})}, "
                                   f"but the bundle is {model_version}; logits of another model cannot be reused")
    if n < MIN_CASES:
        raise RecalibrationRefused(f"only {n} reviewed cases; at least {MIN_CASES} are needed (100–300 recommended)")
    if n_pos == 0 or n_pos == n:
        raise RecalibrationRefused(f"all {n} reviewed cases have the same finding; both pneumonia and normal "
                                   "cases are needed")
    if n < RECOMMENDED_CASES:
        return [f"only {n} reviewed cases: the new calibration will be noisy ({RECOMMENDED_CASES}–300 recommended)"]
    return []


def cross_validated(kind: str, z: np.ndarray, y: np.ndarray, target: float, n_splits: int, seed: int):
    """Returns out-of-fold calibrated scores and flags (threshold re-picked inside each fold)."""
    probs, flags = np.zeros(len(y)), np.zeros(len(y), dtype=bool)
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    for train, test in cv.split(z, y):
        cal = CALIBRATORS[kind]().fit(z[train], y[train])
        t = threshold_for_sensitivity(cal.predict(z[train]), y[train], target)
        probs[test] = cal.predict(z[test])
        flags[test] = probs[test] >= t
    return probs, flags


def summary(probs, flags, y) -> dict:
    """Returns ECE, Brier, sensitivity and specificity for scores and flags."""
    c = confusion_at(flags.astype(float), y, 0.5)
    return {"ece": expected_calibration_error(probs, y), "brier": brier(probs, y),
            "sensitivity": c["sensitivity"], "specificity": c["specificity"]}


@dataclass
class LocalFit:
    """A local calibration fitted on reviewed cases, with its cross-validated before/after comparison."""

    calibrator: object
    spec: dict
    threshold: float
    version: str
    before: dict  # the current calibration on the cohort
    candidates: dict  # each calibrator kind, cross-validated
    chosen: str
    n_splits: int
    target: float

    @property
    def after(self) -> dict:
        return self.candidates[self.chosen]


def fit_local(z, y, *, current: dict, current_threshold: float, target_sensitivity: float,
              seed: int = 0) -> LocalFit:
    """Compares calibrators by cross-validated ECE on (logit, finding) pairs, refits the best on all of them and
    picks its threshold for the target sensitivity. `current` is the calibration spec in force (the "before").
    The cohort must have passed check_cohort. Used by `chestaid recalibrate` and the performance page alike."""
    z, y = np.asarray(z, float), np.asarray(y, int)
    n_splits = int(min(5, y.sum(), len(y) - y.sum()))
    before_probs = calibrator_from_dict(current).predict(z)
    before = summary(before_probs, before_probs >= current_threshold, y)
    candidates = {kind: summary(*cross_validated(kind, z, y, target_sensitivity, n_splits, seed), y)
                  for kind in ("temperature", "platt", "isotonic")}
    best = min(candidates, key=lambda k: candidates[k]["ece"])
    final = CALIBRATORS[best]().fit(z, y)
    threshold = threshold_for_sensitivity(final.predict(z), y, target_sensitivity)
    spec = calibrator_to_dict(final)
    return LocalFit(final, spec, threshold, version_name(spec=spec, threshold=threshold), before, candidates, best,
                    n_splits, float(target_sensitivity))


def recalibrate(feedback_csv: Path, bundle_dir: Path, out_dir: Path, *, target_sensitivity: float | None = None,
                seed: int = 0) -> BundleMeta:
    """Writes a new bundle in out_dir sharing the weights, with a locally fitted calibrator and threshold."""
    from core.ml.bundle import WEIGHTS_FILE, BundleMeta  # torch stays out of the web process

    meta = BundleMeta.read(bundle_dir)
    excluded: dict[str, int] = {}  # findings that are not labels: recorded, reported, never fitted on
    logits, labels, versions = read_feedback_csv(feedback_csv, excluded=excluded)
    notes = check_cohort(labels, versions, meta.version)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    z, y = np.asarray(logits, float), np.asarray(labels, int)
    target = float(target_sensitivity or meta.target_sensitivity or DEFAULT_TARGET_SENSITIVITY)
    fit = fit_local(z, y, current=meta.calibration, current_threshold=meta.threshold,
                    target_sensitivity=target, seed=seed)
    final, threshold, spec, n_splits = fit.calibrator, fit.threshold, fit.spec, fit.n_splits
    before, candidates, best = fit.before, fit.candidates, fit.chosen

    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / WEIGHTS_FILE).resolve() != (bundle_dir / WEIGHTS_FILE).resolve():
        shutil.copyfile(bundle_dir / WEIGHTS_FILE, out_dir / WEIGHTS_FILE)
    report = {"feedback_file": str(feedback_csv), "n": int(len(y)), "n_pneumonia": int(y.sum()),
              "excluded_findings": dict(sorted(excluded.items())),
              "cv_folds": n_splits, "target_sensitivity": target, "before": before,
              "after_cross_validated": candidates[best], "candidates_cross_validated": candidates,
              "chosen": best, "warnings": notes}
    created = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    new_meta = replace(meta, threshold=threshold, target_sensitivity=target,
                       calibration={**spec, "version": fit.version, "fitted_on": f"local feedback ({len(y)} cases)",
                                    "parent_version": meta.calibration["version"]},
                       extra={**meta.extra, "recalibration": {**report, "created_at": created}})
    new_meta.write(out_dir)
    plots = plot_curves(y, expit(z), final.predict(z), out_dir / "report", "local feedback cohort")
    rows = "\n".join(f"| {name} | {v['ece']:.4f} | {v['brier']:.4f} | {v['sensitivity']:.4f} | {v['specificity']:.4f} |"
                     for name, v in [("before (current calibration)", before)]
                     + [(f"after: {k} (cross-validated)", v) for k, v in candidates.items()])
    (out_dir / "report").mkdir(exist_ok=True)
    (out_dir / "report" / "README.md").write_text(f"""# Local recalibration — {new_meta.calibration['version']}

Feedback: {feedback_csv} — {len(y)} reviewed cases ({int(y.sum())} pneumonia). Model {meta.version} (weights unchanged).
Calibrators compared by {n_splits}-fold cross-validated ECE; in each fold the threshold was re-picked on the
training folds for sensitivity ≥ {target}. Chosen: **{best}**, refitted on all cases; threshold {threshold:.4f}.
{''.join(chr(10) + '> ' + n for n in notes)}

| calibration | ECE | Brier | sensitivity | specificity |
|---|---|---|---|---|
{rows}

{ECE_DEFINITION}

{chr(10).join(f'![{p}]({p})' for p in plots)}
""")
    (out_dir / "recalibration.json").write_text(json.dumps(report, indent=2) + "\n")
    return new_meta
