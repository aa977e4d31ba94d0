"""Turns trained weights into a shipped bundle: bf16 check, calibration, threshold, metrics and report."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from core.calibrations import version_name
from core.ml import precision
from core.ml.bundle import BF16_MAX_AUC_DROP, BundleMeta, load_network, save_weights
from core.ml.calibration import calibrator_to_dict, fit_and_select, threshold_for_sensitivity
from core.ml.network import ARCHITECTURE, build_network
from core.ml.preprocess import IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE
from core.monitoring import score_histogram
from core.settings import DEFAULT_TARGET_SENSITIVITY
from training.data import read_split_file
from training.ood_bundle import guard_mode, install_guard
from training.ood_eval import replace_section, report_section
from training.report import ECE_DEFINITION, metrics, metrics_table, plot_curves
from training.train import cache_images, predict_logits


def code_version() -> str:
    """Returns the git commit of the code, or "unknown" outside a checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def best_epoch(log: list[dict]) -> int:
    """The epoch whose weights became best.pt: the training's own selection rule, recorded as "best" in its log.

    training.train keeps the epoch with the best shift-suite mean (clean ROC-AUC breaks ties) and writes that
    epoch into every log row, so the last row names the kept weights; re-deriving it here from val_roc_auc
    would name another epoch than the one shipped. Logs from before that key fall back to the clean ROC-AUC
    at the final resolution, the rule those runs used.
    """
    if "best" in log[-1]:
        return int(log[-1]["best"])
    return int(max(log, key=lambda r: r["val_roc_auc"] if r["res"] == log[-1]["res"] else -1)["epoch"])


def epoch_table(log: list[dict]) -> str:
    """The report's epoch table; shift-suite columns (mean, worst, held-out mean) when the log carries them."""
    shifted = any("shift_mean_roc_auc" in r for r in log)
    head = "| epoch | px | train loss | val ROC-AUC | val PR-AUC |"
    head += " shift mean | shift worst | shift held-out mean |" if shifted else ""
    head += " lr | seconds | best so far |"
    rows = [head, "|" + "---|" * (head.count("|") - 1)]

    def fmt(v) -> str:
        return "—" if v is None else f"{v:.4f}"
    for r in log:
        row = f"| {r['epoch']} | {r['res']} | {r['loss']:.4f} | {r['val_roc_auc']:.4f} | {r['val_pr_auc']:.4f} |"
        if shifted:
            worst = r.get("shift_worst") or {}
            worst_txt = f"{worst['roc_auc']:.4f} ({worst['perturbation']})" if worst else "—"
            row += f" {fmt(r.get('shift_mean_roc_auc'))} | {worst_txt} | {fmt(r.get('shift_held_out_mean'))} |"
        row += f" {r['lr']:.2e} | {r['seconds']:.0f} | {r.get('best', '—')} |"
        rows.append(row)
    return "\n".join(rows)


def finalize(run_dir: Path, data_root: Path, bundle_dir: Path,
             target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY, ood_per_family: int = 60) -> BundleMeta:
    """Writes bundle_dir from run_dir/best.pt and the run's split; returns the bundle metadata."""
    run_dir, bundle_dir = Path(run_dir), Path(bundle_dir)
    splits = read_split_file(run_dir / "split.csv", data_root)
    net = build_network("none")
    net.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True))
    sha = save_weights(net, bundle_dir)
    net = load_network(bundle_dir).to(memory_format=torch.channels_last)  # score exactly what ships (fp16-stored)

    x_val = cache_images(splits["calibration"] + splits["report"], run_dir / "cache_val.npy")
    n_cal = len(splits["calibration"])
    y_cal = np.array([it.label for it in splits["calibration"]])
    y_rep = np.array([it.label for it in splits["report"]])
    y_val = np.concatenate([y_cal, y_rep])

    # bf16 on CPU is used only if it costs < 0.002 validation ROC-AUC.
    z32 = predict_logits(net, x_val, bf16=False)
    z16 = predict_logits(net, x_val, bf16=True)
    auc32, auc16 = roc_auc_score(y_val, z32), roc_auc_score(y_val, z16)
    use_bf16 = bool(auc32 - auc16 < BF16_MAX_AUC_DROP)
    z = z16 if use_bf16 else z32
    z_cal, z_rep = z[:n_cal], z[n_cal:]

    calibrator, cal_table = fit_and_select(z_cal, y_cal, z_rep, y_rep)
    threshold = threshold_for_sensitivity(calibrator.predict(z_cal), y_cal, target_sensitivity)
    spec = calibrator_to_dict(calibrator)
    report_metrics = metrics(y_rep, expit(z_rep), calibrator.predict(z_rep), threshold)
    cal_metrics = metrics(y_cal, expit(z_cal), calibrator.predict(z_cal), threshold)

    train_cfg = json.loads((run_dir / "train_config.json").read_text())
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    created = dt.datetime.now(dt.timezone.utc)
    meta = BundleMeta(
        version=f"{ARCHITECTURE}-{created:%Y%m%d}-{sha[:8]}", architecture=ARCHITECTURE, input_size=INPUT_SIZE,
        channels=3, normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, weights_sha256=sha,
        calibration={**spec, "version": version_name(spec=spec, threshold=threshold),
                     "fitted_on": "validation calibration half", "n": int(len(y_cal)), "selection": cal_table},
        threshold=threshold, target_sensitivity=target_sensitivity,
        bf16_check={"val_roc_auc_fp32": float(auc32), "val_roc_auc_bf16": float(auc16),
                    "drop": float(auc32 - auc16), "max_drop": BF16_MAX_AUC_DROP, "use_bf16": use_bf16},
        extra={
            "preprocessing": "8-bit grayscale -> 224x224 bilinear (aspect ignored) -> 3 channels -> ImageNet mean/std",
            "weights_dtype": "float16",
            "training": {**train_cfg, "epochs_run": len(log), "best_epoch": best_epoch(log),
                         "seconds": round(sum(r["seconds"] for r in log), 1), "torch": torch.__version__},
            "split": {"file": "split.csv",
                      "sha256": hashlib.sha256((run_dir / "split.csv").read_bytes()).hexdigest(),
                      "counts": {k: len(v) for k, v in splits.items()}},
            "metrics": {"report_half": report_metrics, "calibration_half": cal_metrics},
            # What the service's scores should look like: core.monitoring measures local drift against it.
            "reference_scores": {**score_histogram(z_rep), "computed_on": "validation report half",
                                 "precision": "bf16" if use_bf16 else "fp32"},
            "code_version": code_version(), "created_at": created.isoformat(timespec="seconds"),
        })
    # The out-of-distribution guard (core.ml.ood): fitted on the training films, thresholds on the calibration half,
    # figures on the report half and a synthesised OOD set; embedded in the precision the CPU service runs.
    mode = guard_mode(meta.to_dict())
    precision.prepare(net, torch.device("cpu"), mode)
    meta = replace(meta, ood=install_guard(
        bundle_dir, net, mode, x_train=cache_images(splits["train"], run_dir / "cache_train.npy"),
        y_train=np.array([it.label for it in splits["train"]]), x_cal=x_val[:n_cal], x_rep=x_val[n_cal:],
        items=splits, n_per_family=ood_per_family))
    meta.write(bundle_dir)
    (bundle_dir / "split.csv").write_bytes((run_dir / "split.csv").read_bytes())
    (bundle_dir / "train_log.jsonl").write_bytes((run_dir / "train_log.jsonl").read_bytes())
    plots = plot_curves(y_rep, expit(z_rep), calibrator.predict(z_rep), bundle_dir / "report", "validation report half")
    write_training_report(bundle_dir, meta.to_dict(), cal_table, log, plots)
    replace_section(bundle_dir / "report" / "README.md", report_section(meta.ood))
    return meta


def write_training_report(bundle_dir: Path, meta: dict, cal_table: dict, log: list[dict], plots: list[str]) -> None:
    """Writes report/README.md: metrics table, calibration selection, bf16 check, epochs, plots."""
    m = meta["metrics"]
    cal_rows = "\n".join(f"| {k} | {v['ece']:.4f} | {v['brier']:.4f} |" for k, v in cal_table.items())
    b = meta["bf16_check"]
    text = f"""# Training report — {meta['version']}

Data: Kaggle "Chest X-Ray Images (Pneumonia)" train split, divided by patient into train /
validation-calibration / validation-report ({meta['split']['counts']}). No test data was used.

## Metrics (threshold {meta['threshold']:.4f}, chosen on the calibration half for sensitivity ≥ {meta['target_sensitivity']})

{metrics_table({'report half': m['report_half'], 'calibration half': m['calibration_half']})}

ROC-AUC and PR-AUC use the raw model output; ECE and Brier are shown before and after calibration.
{ECE_DEFINITION}

## Calibration selection (fitted on the calibration half, scored on the report half)

| calibrator | ECE | Brier |
|---|---|---|
{cal_rows}

Kept: **{meta['calibration']['kind']}** ({meta['calibration']['version']}), parameters in bundle.json.

## bf16 check

Validation ROC-AUC fp32 {b['val_roc_auc_fp32']:.5f}, bf16 {b['val_roc_auc_bf16']:.5f} (drop {b['drop']:.5f},
allowed < {b['max_drop']}): the service {'uses' if b['use_bf16'] else 'does not use'} bf16 autocast on CPU.

## Epochs

Kept weights: epoch {meta['training']['best_epoch']} (the training's selection rule, as its log records it).

{epoch_table(log)}

Total training time {meta['training']['seconds']:.0f} s (torch {meta['training']['torch']}).

{chr(10).join(f'![{p}]({p})' for p in plots)}
"""
    (bundle_dir / "report" / "README.md").write_text(text)
