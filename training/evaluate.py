"""`chestaid score` and `chestaid evaluate`: the worker's scoring path applied to files and labelled folders."""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.bundle import Bundle
from core.calibration import confusion_at, threshold_for_sensitivity
from core.imaging import ImageRejected, load_grayscale
from core.scoring import ScoreResult, score_images
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
    target = float(bundle.meta.get("target_sensitivity", 0.9))
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
