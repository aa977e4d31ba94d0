"""Server-side PNG plots for the performance page (matplotlib, Agg): served by routes as <img>, so the strict
Content-Security-Policy (no inline styles or data: URLs) holds and no chart library or CDN is needed."""
from __future__ import annotations

import io
import threading

import matplotlib
import numpy as np

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402  (backend first)

_LOCK = threading.Lock()  # matplotlib's font cache and text layout are not thread-safe


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def reliability_png(series: list[tuple[str, list[tuple[float, float, int]]]], *, title: str) -> bytes:
    """Plots reliability diagrams: observed fraction of pneumonia against mean predicted risk per bin, one
    line per (label, bins) series; marker area follows the bin's case count."""
    with _LOCK:
        fig = Figure(figsize=(4.6, 4.2))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="#777777", linestyle="--", linewidth=1, label="perfect calibration")
        for (label, bins), colour in zip(series, ("#0b4f8a", "#a3111b", "#185c2d")):
            if bins:
                pred, obs, count = (np.array(v, float) for v in zip(*bins))
                ax.plot(pred, obs, color=colour, marker="o", linewidth=1.5, label=label, markersize=4)
                ax.scatter(pred, obs, s=8 + 60 * count / max(count.max(), 1), color=colour, alpha=0.35)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="predicted risk (calibrated score)",
               ylabel="observed fraction with pneumonia", title=title)
        ax.legend(loc="upper left", fontsize=8)
        ax.grid(alpha=0.3)
        return _png(fig)


def scores_png(*, edges: list[float], reference: list[int], recent: list[int], title: str) -> bytes:
    """Plots the recent network-output distribution over the reference one (shares per bin)."""
    with _LOCK:
        edges_a = np.asarray(edges, float)
        ref, cur = np.asarray(reference, float), np.asarray(recent, float)
        used = np.nonzero((ref + cur) > 0)[0]
        lo, hi = (used.min(), used.max() + 1) if len(used) else (0, len(ref))
        fig = Figure(figsize=(6.4, 3.4))
        ax = fig.add_subplot()
        for counts, label, colour in ((ref, f"validation reference (n={int(ref.sum())})", "#777777"),
                                      (cur, f"recent studies (n={int(cur.sum())})", "#0b4f8a")):
            share = counts / max(counts.sum(), 1)
            ax.stairs(share[lo:hi], edges_a[lo:hi + 1], label=label, color=colour, linewidth=1.8)
        ax.set(xlabel="network output (logit; higher = more likely pneumonia)", ylabel="share of studies",
               title=title)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        return _png(fig)
