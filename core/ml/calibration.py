"""Calibrators that map a raw logit to a probability of pneumonia, plus ECE, Brier and threshold picking."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, log_expit
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import brier_score_loss

N_BINS = 15


def expected_calibration_error(probs, labels, n_bins: int = N_BINS) -> float:
    """Returns ECE: Σ_b (n_b/N)·|mean predicted − fraction positive| over equal-width probability bins."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    # Bin b holds p in [b/n, (b+1)/n); p == 1 goes to the last bin.
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.sum() / len(probs) * abs(probs[mask].mean() - labels[mask].mean())
    return float(ece)


def brier(probs, labels) -> float:
    """Returns the Brier score (mean squared error of the probability)."""
    return float(brier_score_loss(np.asarray(labels), np.asarray(probs)))


def _nll(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(-(labels * log_expit(logits) + (1 - labels) * log_expit(-logits)).mean())


class Identity:
    """Uncalibrated: sigmoid of the logit."""

    kind = "none"

    def fit(self, logits, labels):
        return self

    def predict(self, logits):
        return expit(np.asarray(logits, dtype=np.float64))

    def params(self) -> dict:
        return {}


class TemperatureScaling:
    """p = sigmoid(z / T), T fitted by minimising the log-loss."""

    kind = "temperature"

    def fit(self, logits, labels):
        z, y = np.asarray(logits, float), np.asarray(labels, float)
        res = minimize_scalar(lambda log_t: _nll(z / np.exp(log_t), y), bounds=(-5, 5), method="bounded",
                              options={"xatol": 1e-8})
        self.temperature_ = float(np.exp(res.x))
        return self

    def predict(self, logits):
        return expit(np.asarray(logits, dtype=np.float64) / self.temperature_)

    def params(self) -> dict:
        return {"temperature": self.temperature_}


class PlattScaling:
    """p = sigmoid(a·z + b), fitted with Platt's smoothed targets (as scikit-learn's sigmoid calibration)."""

    kind = "platt"

    def fit(self, logits, labels):
        z, y = np.asarray(logits, float), np.asarray(labels, float)
        n_pos, n_neg = y.sum(), len(y) - y.sum()
        # Platt (1999): soft targets guard against overfitting on small calibration sets.
        t = np.where(y > 0, (n_pos + 1.0) / (n_pos + 2.0), 1.0 / (n_neg + 2.0))

        def loss(ab):
            s = ab[0] * z + ab[1]
            return -(t * log_expit(s) + (1 - t) * log_expit(-s)).sum()

        def grad(ab):
            d = expit(ab[0] * z + ab[1]) - t
            return np.array([(d * z).sum(), d.sum()])

        res = minimize(loss, x0=np.array([1.0, 0.0]), jac=grad, method="L-BFGS-B")
        self.a_, self.b_ = float(res.x[0]), float(res.x[1])
        return self

    def predict(self, logits):
        return expit(self.a_ * np.asarray(logits, dtype=np.float64) + self.b_)

    def params(self) -> dict:
        return {"a": self.a_, "b": self.b_}


class IsotonicCalibration:
    """Monotone step-linear map from logit to probability (scikit-learn isotonic, clipped at the ends)."""

    kind = "isotonic"

    def fit(self, logits, labels):
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
        iso.fit(np.asarray(logits, float), np.asarray(labels, float))
        self.x_thresholds_ = [float(v) for v in iso.X_thresholds_]
        self.y_thresholds_ = [float(v) for v in iso.y_thresholds_]
        return self

    def predict(self, logits):
        # np.interp clips outside the fitted range, matching out_of_bounds="clip".
        return np.interp(np.asarray(logits, dtype=np.float64), self.x_thresholds_, self.y_thresholds_)

    def params(self) -> dict:
        return {"x": self.x_thresholds_, "y": self.y_thresholds_}


CALIBRATORS = {c.kind: c for c in (Identity, TemperatureScaling, PlattScaling, IsotonicCalibration)}


def calibrator_from_dict(spec: dict):
    """Rebuilds a fitted calibrator from its {"kind", "params"} description."""
    kind, p = spec["kind"], spec.get("params", {})
    cal = CALIBRATORS[kind]()
    if kind == "temperature":
        cal.temperature_ = float(p["temperature"])
    elif kind == "platt":
        cal.a_, cal.b_ = float(p["a"]), float(p["b"])
    elif kind == "isotonic":
        cal.x_thresholds_, cal.y_thresholds_ = list(p["x"]), list(p["y"])
    return cal


def calibrator_to_dict(cal) -> dict:
    """Describes a fitted calibrator as JSON-safe data."""
    return {"kind": cal.kind, "params": cal.params()}


def threshold_for_sensitivity(scores, labels, target: float) -> float:
    """Returns the highest threshold t such that flagging score ≥ t reaches the target sensitivity."""
    scores, labels = np.asarray(scores, float), np.asarray(labels).astype(bool)
    pos = np.sort(scores[labels])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive cases to set a sensitivity threshold")
    k = int(np.ceil(target * len(pos)))  # positives that must be at or above the threshold
    return float(pos[max(k, 1) - 1])


def confusion_at(scores, labels, threshold: float) -> dict:
    """Counts TP/FP/TN/FN and derived rates for flagging score ≥ threshold."""
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    flag = s >= threshold
    tp, fp = int((flag & y).sum()), int((flag & ~y).sum())
    fn, tn = int((~flag & y).sum()), int((~flag & ~y).sum())

    def div(a, b):
        return float(a / b) if b else float("nan")

    sens, spec = div(tp, tp + fn), div(tn, tn + fp)
    ppv, npv = div(tp, tp + fp), div(tn, tn + fn)
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn, "sensitivity": sens, "specificity": spec,
            "ppv": ppv, "npv": npv, "f1": div(2 * tp, 2 * tp + fp + fn),
            "balanced_accuracy": (sens + spec) / 2}


def fit_and_select(fit_logits, fit_labels, eval_logits, eval_labels) -> tuple[object, dict]:
    """Fits every calibrator on one set, scores ECE/Brier on the other, returns the lowest-ECE one and the table."""
    table = {}
    fitted = {}
    for kind, cls in CALIBRATORS.items():
        cal = cls().fit(fit_logits, fit_labels)
        p = cal.predict(eval_logits)
        fitted[kind] = cal
        table[kind] = {"ece": expected_calibration_error(p, eval_labels), "brier": brier(p, eval_labels)}
    best = min((k for k in table if k != "none"), key=lambda k: table[k]["ece"])
    return fitted[best], table
