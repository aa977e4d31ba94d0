"""Batch-first scoring: grayscale films in, logits, calibrated risks, flags and Grad-CAMs out."""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.special import expit

from core.bundle import Bundle
from core.preprocess import preprocess


@dataclass
class ScoreResult:
    logit: float
    probability: float  # uncalibrated sigmoid(logit)
    score: float  # calibrated risk of pneumonia
    threshold: float
    flagged: bool
    cam: np.ndarray  # normalised 0..1, the network's final feature grid (7×7 at 224 px)
    timings: dict


def score_images(bundle: Bundle, images: Sequence[Image.Image], calibrator=None,
                 threshold: float | None = None) -> list[ScoreResult]:
    """Scores a batch of 8-bit grayscale films with one forward pass; calibration defaults to the bundle's."""
    if not images:
        return []
    calibrator = calibrator or bundle.calibrator
    threshold = bundle.threshold if threshold is None else threshold
    t0 = time.perf_counter()
    x = preprocess(images, bundle.input_size)
    t1 = time.perf_counter()
    logits, cams = bundle.forward(x)
    t2 = time.perf_counter()
    z = logits.numpy().astype(np.float64)
    scores = calibrator.predict(z)
    n = len(images)
    per_image = {"preprocess_ms": (t1 - t0) * 1000 / n, "forward_cam_ms": (t2 - t1) * 1000 / n, "batch_size": n}
    return [ScoreResult(logit=float(z[i]), probability=float(expit(z[i])), score=float(scores[i]),
                        threshold=float(threshold), flagged=bool(scores[i] >= threshold), cam=cams[i].numpy(),
                        timings=dict(per_image)) for i in range(n)]
