"""`chestaid score` and `chestaid evaluate`: the worker's scoring path applied to files and labelled folders."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.films.errors import ImageRejected
from core.films.imaging import load_grayscale
from core.ml.bundle import Bundle
from core.ml.calibration import confusion_at, threshold_for_sensitivity
from core.ml.scoring import ScoreResult, score_images
from core.settings import DEFAULT_TARGET_SENSITIVITY
from training.data import list_split
from training.report import ECE_DEFINITION, metrics, metrics_table, plot_curves

SCORABLE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp", ""}


@dataclass
class FileScore:
    path: Path
    result: ScoreResult | None
    error: str | None


def expand_paths(paths: list[Path]) -> list[Path]:
    """Expands folders into their files (sorted, recursively), skipping dotfiles."""
    out = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")
                              and f.suffix.lower() in SCORABLE_SUFFIXES))
        else:
            out.append(p)
    return out


def score_files(bundle: Bundle, paths: list[Path], *, batch_size: int = 16,
                max_pixels: int = 50_000_000) -> Iterator[FileScore]:
    """Scores files in batches; a file that cannot be read yields its reason instead of a score."""
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images, ok, failed = [], [], {}
        for p in chunk:
            try:
                images.append(load_grayscale(p, max_pixels=max_pixels))
                ok.append(p)
            except (ImageRejected, OSError) as exc:
                failed[p] = str(exc)
        results = dict(zip(ok, score_images(bundle, images)))
        for p in chunk:
            yield FileScore(p, results.get(p), failed.get(p))


def evaluate(bundle: Bundle, data_root: Path, split: str, out_dir: Path, *, batch_size: int = 16) -> dict:
    """Scores a labelled Kaggle-layout split and writes evaluation.json, evaluation.md and plots."""
    items = list_split(data_root, split)
    scored = list(score_files(bundle, [it.path for it in items], batch_size=batch_size))
    errors = {str(s.path): s.error for s in scored if s.result is None}
    keep = [(it, s.result) for it, s in zip(items, scored) if s.result is not None]
    y = np.array([it.label for it, _ in keep])
    raw = np.array([r.probability for _, r in keep])
    cal = np.array([r.score for _, r in keep])
    m = metrics(y, raw, cal, bundle.threshold)
    target = float(bundle.meta.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    t_data = threshold_for_sensitivity(cal, y, target)
    result = {
        "model_version": bundle.version, "calibration_version": bundle.calibration_version,
        "data": str(data_root), "split": split, "n_unreadable": len(errors), "unreadable": errors,
        "metrics_at_bundle_threshold": m,
        "threshold_for_target_sensitivity_on_this_data": {
            "note": "chosen on this evaluation data itself; for information only, not an operating point",
            "target_sensitivity": target, "threshold": t_data, **confusion_at(cal, y, t_data)},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    plots = plot_curves(y, raw, cal, out_dir, f"{split} ({len(y)} films)")
    info = result["threshold_for_target_sensitivity_on_this_data"]
    (out_dir / "evaluation.md").write_text(f"""# Evaluation — {bundle.version} on `{split}`

Model {bundle.version}, calibration {bundle.calibration_version}; data {data_root} split `{split}`:
{m['n']} films ({m['n_pneumonia']} pneumonia, {m['n_normal']} normal), {len(errors)} unreadable.

## At the bundle's operating threshold ({bundle.threshold:.4f})

{metrics_table({split: m})}

ROC-AUC and PR-AUC use the raw model output. {ECE_DEFINITION}

## For information only: threshold that would reach sensitivity {target} on this data

Chosen on this evaluation data itself, so it is optimistic and not an operating point:
threshold {info['threshold']:.4f} → sensitivity {info['sensitivity']:.4f}, specificity {info['specificity']:.4f}.

{chr(10).join(f'![{p}]({p})' for p in plots)}
""")
    return result


def evaluate_shift(bundle: Bundle, data_root: Path, out_dir: Path, *, limit: int = 0, seed: int = 0,
                   batch_size: int = 32, progress=None) -> dict:
    """Runs the shift suite (training.shift) on the bundle's validation films; writes shift.json and shift.md.

    The films are the calibration and report halves of the bundle's own split.csv, never a test split;
    `limit` keeps a fixed, seeded, class-stratified subset of them (quick runs).
    """
    from core.ml.preprocess import normalize
    from training.data import read_split_file
    from training.shift import markdown_table, run_suite, seeded_subset

    split_file = bundle.directory / "split.csv"
    if not split_file.is_file():
        raise ValueError(f"{bundle.directory} has no split.csv: the shift suite runs on the bundle's validation films")
    splits = read_split_file(split_file, data_root)
    items = splits.get("calibration", []) + splits.get("report", [])
    if not items:
        raise ValueError(f"{split_file} lists no validation (calibration/report) films")
    items = [items[i] for i in seeded_subset([it.label for it in items], limit, seed)]
    films, labels, errors = [], [], {}
    for it in items:
        try:
            films.append(load_grayscale(it.path))
            labels.append(it.label)
        except (ImageRejected, OSError) as exc:
            errors[str(it.path)] = str(exc)

    refused: list[float] = []  # share of films the bundle's OOD guard refuses, one entry per predict call

    def predict(arrays: np.ndarray) -> np.ndarray:
        logits, n_refused = [], 0
        for i in range(0, len(arrays), batch_size):
            z, _, emb = bundle.forward(normalize(arrays[i:i + batch_size]))
            logits.append(z.numpy())
            if bundle.ood is not None:
                n_refused += sum(v.reason is not None for v in bundle.ood.evaluate(emb, z))
        refused.append(n_refused / len(arrays))
        return np.concatenate(logits).astype(np.float64)

    summary = run_suite(predict, films, labels, seed=seed, progress=progress)
    if bundle.ood is not None:  # run_suite scores clean films first, then PERTURBATIONS in order
        summary["clean_refused_by_ood_guard"] = refused[0]
        for name, share in zip(summary["per_perturbation"], refused[1:]):
            summary["per_perturbation"][name]["refused_by_ood_guard"] = share
    y = np.asarray(labels)
    result = {"model_version": bundle.version, "precision": bundle.mode, "data": str(data_root),
              "films": "bundle split.csv: validation calibration + report halves" + (f", seeded subset of {limit}"
                                                                                     if limit else ""),
              "n": int(len(y)), "n_pneumonia": int(y.sum()), "n_normal": int((1 - y).sum()), "seed": seed,
              "n_unreadable": len(errors), "unreadable": errors, **summary}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shift.json").write_text(json.dumps(result, indent=2) + "\n")
    described = "\n".join(f"- `{k}` ({r['family']}): {r['description']}"
                          for k, r in summary["per_perturbation"].items())
    (out_dir / "shift.md").write_text(f"""# Shift suite — {bundle.version}

{result['n']} validation films ({result['n_pneumonia']} pneumonia, {result['n_normal']} normal) from the bundle's
split.csv, each perturbed as the service would receive it (8-bit grayscale film before preprocessing), seed {seed},
scored in {bundle.mode}; {len(errors)} unreadable. ROC-AUC on the raw model output. Families held out of
training augmentation: {', '.join(summary['held_out_families'])}.

{markdown_table(summary)}
{_refusal_note(summary)}
## Perturbations

{described}
""")
    return result


def _refusal_note(summary: dict) -> str:
    """A table of how many perturbed films the bundle's OOD guard would refuse (empty without a guard)."""
    if "clean_refused_by_ood_guard" not in summary:
        return ""
    rows = "\n".join(f"| {k} | {r['refused_by_ood_guard']:.1%} |" for k, r in summary["per_perturbation"].items())
    return f"""
The service would refuse some perturbed films as out of distribution (its OOD guard) instead of scoring them;
the ROC-AUCs above score every film regardless. Share refused:

| perturbation | refused by the OOD guard |
|---|---|
| clean | {summary['clean_refused_by_ood_guard']:.1%} |
{rows}
"""


def record_shift_in_bundle(bundle_dir: Path, result: dict) -> None:
    """Adds the suite's figures to bundle.json under `shift_suite` (weights and everything else untouched)."""
    from core.ml.bundle import read_meta, write_meta

    meta = read_meta(bundle_dir)
    if meta["version"] != result["model_version"]:
        raise ValueError(f"shift figures of {result['model_version']} cannot go into bundle {meta['version']}")
    meta["shift_suite"] = {k: result[k] for k in ("n", "n_pneumonia", "n_normal", "seed", "precision", "films",
                                                  "clean_roc_auc", "mean_roc_auc", "worst", "mean_held_out",
                                                  "mean_in_training_augmentation", "held_out_families")}
    meta["shift_suite"]["per_perturbation"] = {k: round(v["roc_auc"], 6) for k, v in result["per_perturbation"].items()}
    if "clean_refused_by_ood_guard" in result:
        meta["shift_suite"]["refused_by_ood_guard"] = {
            "clean": round(result["clean_refused_by_ood_guard"], 6),
            **{k: round(v["refused_by_ood_guard"], 6) for k, v in result["per_perturbation"].items()}}
    meta["shift_suite"]["report"] = "report/shift.md"
    write_meta(bundle_dir, meta)
