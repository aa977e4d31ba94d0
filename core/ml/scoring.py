"""Batch-first scoring: grayscale films in, logits, calibrated risks, flags and Grad-CAMs out."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.special import expit

from core.ml.bundle import Bundle
from core.ml.preprocess import preprocess


@dataclass
class ScoreResult:
    logit: float
    probability: float  # uncalibrated sigmoid(logit)
    score: float  # calibrated risk of pneumonia
    threshold: float
    flagged: bool
    cam: np.ndarray  # normalised 0..1, the network's final feature grid (7×7 at 224 px)
    timings: dict
    ood_score: float | None = None  # core.ml.ood combined score; None when the bundle has no guard
    orientation: str | None = None  # the probe's verdict, e.g. "upright", "upside down", "inverted polarity"
    refusal: str | None = None  # why the guard refuses this film (None: accepted or guard bypassed)


def score_images(bundle: Bundle, images: Sequence[Image.Image], calibrator=None,
                 threshold: float | None = None, bypass_guard: Sequence[bool] | None = None) -> list[ScoreResult]:
    """Scores a batch of 8-bit grayscale films with one forward pass; calibration defaults to the bundle's.

    The bundle's OOD guard judges each film from the same pass; a refused film keeps its numbers but carries
    `refusal` and is never flagged. `bypass_guard[i]` (an admin's "score anyway") clears the refusal.
    """
    if not images:
        return []
    calibrator = calibrator or bundle.calibrator
    threshold = bundle.threshold if threshold is None else threshold
    t0 = time.perf_counter()
    x = preprocess(images, bundle.input_size)
    t1 = time.perf_counter()
    # The calling thread's CPU: all of the pass's with one torch thread (a CPU pool process), where the wall time
    # also counts the other work on its core.
    c1 = time.thread_time()
    logits, cams, embeddings = bundle.forward(x)
    c2 = time.thread_time()
    t2 = time.perf_counter()
    verdicts = bundle.ood.evaluate(embeddings, logits) if bundle.ood is not None else [None] * len(images)
    t3 = time.perf_counter()
    z = logits.numpy().astype(np.float64)
    scores = calibrator.predict(z)
    n = len(images)
    bypass = list(bypass_guard) if bypass_guard is not None else [False] * n
    per_image = {"preprocess_ms": (t1 - t0) * 1000 / n, "forward_cam_ms": (t2 - t1) * 1000 / n,
                 "forward_cpu_ms": (c2 - c1) * 1000 / n,
                 "ood_ms": (t3 - t2) * 1000 / n, "batch_size": n}
    fit = getattr(bundle, "threads", None)
    if fit is not None:  # the CPU threads this pass ran with (core.ml.threads)
        per_image["threads"] = fit.threads
    out = []
    for i in range(n):
        v = verdicts[i]
        refusal = v.reason if v is not None and not bypass[i] else None
        out.append(ScoreResult(logit=float(z[i]), probability=float(expit(z[i])), score=float(scores[i]),
                               threshold=float(threshold), flagged=bool(scores[i] >= threshold) and refusal is None,
                               cam=cams[i].numpy(), timings=dict(per_image),
                               ood_score=v.ood_score if v is not None else None,
                               orientation=v.orientation if v is not None else None, refusal=refusal))
    return out
