"""Local performance monitoring from recorded findings: weekly sensitivity/specificity/PPV/NPV with Wilson
intervals, calibration (ECE) of the calibration in force on local feedback, score drift against the bundle's
reference distribution (PSI, KS), feedback coverage, and the alerts that tell an admin when to act.

Counting unit: a scored image with a recorded finding (a DICOM study's finding is stored on each scored image,
as in feedback.csv). Weeks are ISO weeks (Monday to Sunday, UTC) of when the study was received.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from scipy.stats import ks_2samp
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import calibrations
from core.ml.calibration import N_BINS, calibrator_from_dict, expected_calibration_error
from core.models import Study, utcnow
from core.repository import LABELS

log = logging.getLogger("chestaid.monitoring")

Z95 = 1.959963984540054  # two-sided 95 % normal quantile
# The reference histogram: raw network output (logit), 0.5 wide bins over [-20, 20]; values outside go to the
# end bins. The logit does not depend on the calibration, so drift is measured on the model's own output.
REFERENCE_EDGES = [round(-20.0 + 0.5 * i, 1) for i in range(81)]
PSI_BINS = 10  # PSI over reference deciles (merged fine bins), the usual 10-bin PSI
PSI_EPSILON = 1e-4  # share used for a bin that is empty on one side, so ln(a/e) stays finite


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Returns the Wilson score interval for k successes in n trials ((nan, nan) when n is 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rate:
    """A proportion k/n with its Wilson 95 % interval."""

    k: int
    n: int

    @property
    def value(self) -> float:
        return self.k / self.n if self.n else math.nan

    @property
    def low(self) -> float:
        return wilson(self.k, self.n)[0]

    @property
    def high(self) -> float:
        return wilson(self.k, self.n)[1]


@dataclass
class Period:
    """Counts and rates of one week (or of all weeks: start None)."""

    start: dt.date | None
    scored: int = 0
    tp: int = 0
    fp: int = 0
    tn: int = 0
    fn: int = 0

    @property
    def reviewed(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def coverage(self) -> Rate:
        return Rate(self.reviewed, self.scored)

    @property
    def sensitivity(self) -> Rate:
        return Rate(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> Rate:
        return Rate(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> Rate:
        return Rate(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> Rate:
        return Rate(self.tn, self.tn + self.fn)


def week_of(moment: dt.datetime) -> dt.date:
    """Returns the Monday (UTC) of a moment's ISO week."""
    day = moment.astimezone(dt.timezone.utc).date()
    return day - dt.timedelta(days=day.weekday())


def weekly(session: Session) -> tuple[list[Period], Period]:
    """Returns one Period per week with scored studies (newest first) and the overall Period. Outcomes are the
    recorded TP/FP/TN/FN: the finding against the flag in force when each study was scored."""
    rows = session.execute(select(Study.received_at, Study.outcome).where(Study.logit.is_not(None),
                                                                          Study.scored_flagged.is_not(None)))
    weeks: dict[dt.date, Period] = {}
    total = Period(None)
    for received_at, outcome in rows:
        week = weeks.setdefault(week_of(received_at), Period(week_of(received_at)))
        for period in (week, total):
            period.scored += 1
            if outcome in ("TP", "FP", "TN", "FN"):
                setattr(period, outcome.lower(), getattr(period, outcome.lower()) + 1)
    return sorted(weeks.values(), key=lambda p: p.start, reverse=True), total


# --- reference distribution and drift ------------------------------------------------------------


def score_histogram(logits) -> dict:
    """Returns the histogram of network outputs stored as `reference_scores` in bundle.json."""
    z = np.clip(np.asarray(logits, dtype=np.float64), REFERENCE_EDGES[0], REFERENCE_EDGES[-1])
    counts, _ = np.histogram(z, bins=REFERENCE_EDGES)
    return {"scale": "logit", "edges": list(REFERENCE_EDGES), "counts": [int(c) for c in counts], "n": int(len(z))}


def bin_counts(logits, edges) -> np.ndarray:
    """Counts values in the reference bins (values outside the edges go to the end bins)."""
    z = np.clip(np.asarray(logits, dtype=np.float64), edges[0], edges[-1])
    return np.histogram(z, bins=edges)[0]


def _decile_groups(ref_counts: np.ndarray, k: int = PSI_BINS) -> list[slice]:
    """Merges adjacent fine bins into at most k groups of about equal reference mass."""
    cum = np.cumsum(ref_counts) / max(ref_counts.sum(), 1)
    cuts = sorted({int(np.searchsorted(cum, q / k, side="left")) + 1 for q in range(1, k)} - {0})
    bounds = [0] + [c for c in cuts if c < len(ref_counts)] + [len(ref_counts)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = PSI_EPSILON) -> float:
    """Population stability index Σ (a − e)·ln(a / e) over bin shares; an empty bin's share counts as eps."""
    e = np.maximum(np.asarray(expected, float) / max(np.sum(expected), 1), eps)
    a = np.maximum(np.asarray(actual, float) / max(np.sum(actual), 1), eps)
    return float(np.sum((a - e) * np.log(a / e)))


@dataclass
class Drift:
    """Recent network outputs against the bundle's reference histogram."""

    n: int
    psi: float
    ks: float
    edges: list[float]
    reference: list[int]
    recent: list[int]


def drift(reference: dict, logits) -> Drift:
    """Compares recent logits with a reference histogram: PSI over reference deciles, and the two-sample KS
    statistic (scipy) between the two binned distributions (each value at its bin's centre)."""
    edges = np.asarray(reference["edges"], float)
    ref = np.asarray(reference["counts"], int)
    cur = bin_counts(logits, edges)
    groups = _decile_groups(ref)
    value = psi([ref[g].sum() for g in groups], [cur[g].sum() for g in groups])
    centres = (edges[:-1] + edges[1:]) / 2
    ks = float(ks_2samp(np.repeat(centres, ref), np.repeat(centres, cur)).statistic) if cur.sum() else math.nan
    return Drift(int(cur.sum()), value, ks, edges.tolist(), ref.tolist(), cur.tolist())


# --- calibration on local feedback and alerts ----------------------------------------------------


def read_bundle_meta(model_dir: Path) -> dict | None:
    """Reads bundle.json without loading the network (web processes have no model); None if absent."""
    path = Path(model_dir) / "bundle.json"
    return json.loads(path.read_text()) if path.is_file() else None


def calibration_for(session: Session, meta: dict) -> tuple[str, dict, float, str]:
    """Returns (kind, params, threshold, version) of the calibration in force for the bundle's model."""
    cal = calibrations.in_force(session, bundle=SimpleNamespace(version=meta["version"]))
    if cal is not None:
        return cal.kind, cal.params, cal.threshold, cal.version
    spec = meta["calibration"]
    return spec["kind"], spec.get("params", {}), float(meta["threshold"]), spec["version"]


def reviewed_cases(session: Session, *, model_version: str, last: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (logits, labels) of the last `last` reviewed cases scored by this model, by feedback time."""
    rows = session.execute(select(Study.logit, Study.finding).where(
        Study.finding.in_(LABELS), Study.logit.is_not(None), Study.model_version == model_version)
        .order_by(Study.feedback_at.desc(), Study.id.desc()).limit(last)).all()
    return np.array([r[0] for r in rows], float), np.array([int(r[1] == "pneumonia") for r in rows], int)


def reliability_bins(probs, labels, n_bins: int = N_BINS) -> list[tuple[float, float, int]]:
    """Returns (mean predicted, observed fraction, count) per non-empty equal-width bin (as ECE bins them)."""
    probs, labels = np.asarray(probs, float), np.asarray(labels, float)
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    return [(float(probs[bins == b].mean()), float(labels[bins == b].mean()), int((bins == b).sum()))
            for b in range(n_bins) if (bins == b).any()]


@dataclass
class Alert:
    """Something an admin should act on: what was found and what to do."""

    kind: str
    message: str
    action: str


@dataclass
class Snapshot:
    """Everything the performance page and the alerts need, as of one moment."""

    model_version: str
    target_sensitivity: float
    calibration_version: str
    threshold: float
    n_cases: int  # reviewed cases in the monitoring window
    ece: float
    sensitivity: Rate  # at the threshold in force, on the monitoring window
    bins: list[tuple[float, float, int]]
    drift: Drift | None
    alerts: list[Alert] = field(default_factory=list)


_logged: set[str] = set()  # alerts already logged by this process (one log line per distinct alert)


def snapshot(session: Session, *, meta: dict, settings, now: dt.datetime | None = None) -> Snapshot:
    """Measures the calibration in force on the last `monitor_window_cases` reviewed cases and the drift of
    the last `monitor_drift_days` days of scores, and raises the alerts (logged once each)."""
    now = now or utcnow()
    kind, params, threshold, version = calibration_for(session, meta)
    z, y = reviewed_cases(session, model_version=meta["version"], last=settings.monitor_window_cases)
    probs = calibrator_from_dict({"kind": kind, "params": params}).predict(z) if len(z) else np.array([])
    flags = probs >= threshold
    sens = Rate(int((flags & (y == 1)).sum()), int((y == 1).sum()))
    ece = expected_calibration_error(probs, y) if len(z) else math.nan
    recent = session.scalars(select(Study.logit).where(
        Study.logit.is_not(None), Study.model_version == meta["version"],
        Study.scored_at >= now - dt.timedelta(days=settings.monitor_drift_days))).all()
    reference = meta.get("reference_scores")
    shift = drift(reference, recent) if reference and recent else None
    target = float(meta.get("target_sensitivity", settings.target_sensitivity))
    snap = Snapshot(meta["version"], target, version, threshold, len(z), ece, sens, reliability_bins(probs, y),
                    shift)
    enough = len(z) >= settings.monitor_min_cases
    if enough and ece > settings.monitor_max_ece:
        snap.alerts.append(Alert("ece", f"Local calibration error (ECE) is {ece:.3f} on the last {len(z)} reviewed "
                                 f"cases, above {settings.monitor_max_ece:g}: risk scores no longer match how often "
                                 "pneumonia is found here.",
                                 "Recalibrate on the recent reviewed cases (Performance page, Recalibrate)."))
    if enough and sens.n and sens.low < target:
        snap.alerts.append(Alert("sensitivity", f"Sensitivity at the threshold in force is {sens.value:.3f} "
                                 f"(95 % CI {sens.low:.3f}–{sens.high:.3f}, {sens.k}/{sens.n}) on the last {len(z)} "
                                 f"reviewed cases; its lower bound is below the target {target:g}.",
                                 "Recalibrate (it picks a new threshold for the target sensitivity) or lower the "
                                 "threshold, and review the missed cases (FN) on the Read list."))
    if shift is not None and shift.n >= settings.monitor_min_cases and shift.psi > settings.monitor_max_psi:
        snap.alerts.append(Alert("drift", f"The scores of the last {shift.n} studies have drifted from the "
                                 f"validation reference (PSI {shift.psi:.2f} > {settings.monitor_max_psi:g}, "
                                 f"KS {shift.ks:.2f}).",
                                 "Check what changed (X-ray unit, protocol, patient mix, inbox source); keep "
                                 "recording findings and recalibrate once enough cases are reviewed."))
    for alert in snap.alerts:
        if alert.message not in _logged:
            _logged.add(alert.message)
            log.warning("monitoring alert (%s): %s %s", alert.kind, alert.message, alert.action)
    return snap
