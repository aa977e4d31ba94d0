"""Metrics and plots shared by training, evaluation and recalibration reports."""
from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from core.ml.calibration import brier, confusion_at, expected_calibration_error

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

ECE_DEFINITION = ("ECE: 15 equal-width bins of the predicted probability of pneumonia; "
                  "ECE = Σ_b (n_b/N)·|mean predicted probability in b − observed fraction positive in b|.")


def metrics(labels, raw_probs, calibrated, threshold: float) -> dict:
    """Returns ranking, calibration and operating-point metrics for one labelled set."""
    y = np.asarray(labels)
    return {
        "n": int(len(y)), "n_pneumonia": int(y.sum()), "n_normal": int((1 - y).sum()),
        "roc_auc": float(roc_auc_score(y, raw_probs)),
        "pr_auc": float(average_precision_score(y, raw_probs)),
        "ece_uncalibrated": expected_calibration_error(raw_probs, y), "brier_uncalibrated": brier(raw_probs, y),
        "ece_calibrated": expected_calibration_error(calibrated, y), "brier_calibrated": brier(calibrated, y),
        "threshold": float(threshold), **confusion_at(calibrated, y, threshold),
    }


def plot_curves(labels, raw_probs, calibrated, out_dir: Path, title: str) -> list[str]:
    """Writes roc.png, pr.png and reliability.png; returns their file names."""
    y = np.asarray(labels)
    out_dir.mkdir(parents=True, exist_ok=True)
    fpr, tpr, _ = roc_curve(y, raw_probs)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"AUC {roc_auc_score(y, raw_probs):.4f}")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="1 − specificity", ylabel="sensitivity", title=f"ROC — {title}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "roc.png", dpi=110)
    plt.close(fig)

    prec, rec, _ = precision_recall_curve(y, raw_probs)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(rec, prec, label=f"AP {average_precision_score(y, raw_probs):.4f}")
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"PR — {title}", ylim=(0, 1.02))
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out_dir / "pr.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    edges = np.linspace(0, 1, 16)
    for name, p in (("uncalibrated", raw_probs), ("calibrated", calibrated)):
        p = np.asarray(p)
        idx = np.minimum((p * 15).astype(int), 14)
        xs = [p[idx == b].mean() for b in range(15) if (idx == b).any()]
        ys = [y[idx == b].mean() for b in range(15) if (idx == b).any()]
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {expected_calibration_error(p, y):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed fraction pneumonia",
           title=f"Reliability — {title}", xticks=edges[::3])
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "reliability.png", dpi=110)
    plt.close(fig)
    return ["roc.png", "pr.png", "reliability.png"]


def metrics_table(rows: dict[str, dict]) -> str:
    """Renders {set name: metrics} as a Markdown table."""
    keys = ["n", "roc_auc", "pr_auc", "ece_uncalibrated", "ece_calibrated", "brier_uncalibrated", "brier_calibrated",
            "threshold", "sensitivity", "specificity", "ppv", "npv", "f1", "balanced_accuracy", "tp", "fp", "tn", "fn"]
    lines = ["| metric | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for k in keys:
        cells = []
        for m in rows.values():
            v = m.get(k, "")
            cells.append(f"{v:.4f}" if isinstance(v, float) else str(v))
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
