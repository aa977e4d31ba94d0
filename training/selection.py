"""Checkpoint selection and early stopping on the shift suite, tie-broken by clean validation.

Clean validation is 0.998–0.999 for a model that generalises and for one that memorised the training hospital
alike, so it cannot tell them apart: it only decides between epochs whose shift-suite mean ROC-AUC is the same
within `tie`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Shift means closer than this count as equal; on a ~200-film subset such differences are sampling noise.
SHIFT_TIE = 0.0005


@dataclass(frozen=True)
class EpochScore:
    """What selection looks at for one epoch (1-based epoch number)."""

    epoch: int
    shift_mean: float
    clean_auc: float


def is_better(candidate: EpochScore, best: EpochScore | None, *, tie: float = SHIFT_TIE) -> bool:
    """True when candidate beats best: higher shift mean, or the same within tie and higher clean ROC-AUC."""
    if best is None:
        return True
    if candidate.shift_mean > best.shift_mean + tie:
        return True
    if candidate.shift_mean < best.shift_mean - tie:
        return False
    return candidate.clean_auc > best.clean_auc


def best_of(history: Sequence[EpochScore], *, tie: float = SHIFT_TIE) -> EpochScore:
    """Returns the selected epoch of a history, scanning in order as training does."""
    if not history:
        raise ValueError("no epochs to select from")
    best = None
    for score in history:
        if is_better(score, best, tie=tie):
            best = score
    return best


def should_stop(history: Sequence[EpochScore], *, patience: int, tie: float = SHIFT_TIE) -> bool:
    """True once `patience` epochs have passed since the selected one without a better shift score."""
    if not history:
        return False
    return history[-1].epoch - best_of(history, tie=tie).epoch >= patience
