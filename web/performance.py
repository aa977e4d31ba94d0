"""The performance page: local metrics by week, calibration and drift with their alerts (doctors read it,
admins act on it), and recalibration from the page: preview, then one confirmed, audited activation."""
from __future__ import annotations

import csv
import datetime as dt
import io
import math
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core import calibrations, cohort, monitoring
from core.auth import role_allows
from core.ml.calibration import CALIBRATORS, calibrator_from_dict
from core.settings import DEFAULT_TARGET_SENSITIVITY
from training.recalibrate import RecalibrationRefused, check_cohort, cross_validated, fit_local
from web.access import ADMIN, ADMIN_POST, DOCTOR, Admin
from web.deps import SessionDep, SettingsDep, client_host
from web.sessions import session_of
from web.templating import templates

router = APIRouter(default_response_class=HTMLResponse)

PNG_HEADERS = {"Cache-Control": "no-store"}
DEFAULT_LAST = 300
CSV_COLUMNS = ["week_start", "scored", "reviewed", "coverage", "tp", "fp", "tn", "fn",
               "sensitivity", "sensitivity_low", "sensitivity_high", "specificity", "specificity_low",
               "specificity_high", "ppv", "ppv_low", "ppv_high", "npv", "npv_low", "npv_high"]


def _meta(settings) -> dict:
    meta = monitoring.read_bundle_meta(settings.model_dir)
    if meta is None:
        raise HTTPException(status_code=503, detail=f"no model bundle at {settings.model_dir}: nothing to monitor")
    return meta


def admin_alerts(request: Request, session, settings) -> list[monitoring.Alert]:
    """Returns the monitoring alerts for an admin's worklist banner (none for other roles or without a bundle)."""
    user = getattr(request.state, "user", None)
    meta = monitoring.read_bundle_meta(settings.model_dir) if user and role_allows(user.role, "admin") else None
    return monitoring.snapshot(session, meta=meta, settings=settings).alerts if meta else []


def _window(window: str, last: str, start: str, end: str) -> cohort.Window:
    """Reads the recalibration window from the form; raises ValueError with what to correct."""
    if window == "last":
        if not last.strip().isdigit() or not (1 <= int(last) <= cohort.MAX_CASES):
            raise ValueError(f"The number of cases must be a whole number from 1 to {cohort.MAX_CASES}.")
        return cohort.Window(last=int(last))
    if window == "range":
        try:
            first, final = dt.date.fromisoformat(start), dt.date.fromisoformat(end)
        except ValueError:
            raise ValueError("Give the date range as two dates, e.g. 2025-03-01 and 2025-03-31.") from None
        if first > final:
            raise ValueError("The first date of the range is after the last.")
        return cohort.Window(start=first, end=final)
    raise ValueError("Choose a window: the last N reviewed cases, or a date range.")


def _fit(session, meta: dict, win: cohort.Window):
    """Fits a local calibration on the window's reviewed cases, exactly as `chestaid recalibrate` does;
    returns (fit, cohort, warnings) or raises RecalibrationRefused with the reason."""
    cases = cohort.reviewed(session, window=win)
    notes = check_cohort(cases.labels.tolist(), set(cases.model_versions), meta["version"])
    kind, params, threshold, _ = monitoring.calibration_for(session, meta)
    target = float(meta.get("target_sensitivity", DEFAULT_TARGET_SENSITIVITY))
    fit = fit_local(cases.logits, cases.labels, current={"kind": kind, "params": params},
                    current_threshold=threshold, target_sensitivity=target)
    return fit, cases, notes


def _page(request: Request, session, settings, *, preview: dict | None = None, error: str | None = None,
          form: dict | None = None, status_code: int = 200):
    meta = _meta(settings)
    weeks, overall = monitoring.weekly(session)
    context = {"snap": monitoring.snapshot(session, meta=meta, settings=settings), "weeks": weeks,
               "overall": overall, "settings": settings, "preview": preview, "error": error,
               "notice": session_of(request).pop_notice(), "has_reference": bool(meta.get("reference_scores")),
               "form": form or {"window": "last", "last": str(DEFAULT_LAST), "start": "", "end": ""},
               "admin_page": "performance", "isnan": math.isnan}
    return templates.TemplateResponse(request, "admin_performance.html", context, status_code=status_code)


@router.get("/admin/performance", dependencies=DOCTOR)
def performance_page(request: Request, session: SessionDep, settings: SettingsDep):
    """Shows local performance by week, calibration on local feedback, drift and alerts (doctors read-only)."""
    return _page(request, session, settings)


def _cell(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.4f}"


@router.get("/admin/performance.csv", response_class=Response, dependencies=DOCTOR)
def performance_csv(session: SessionDep) -> Response:
    """Downloads the weekly table (and an "all" row) as CSV: counts, rates and Wilson 95 % bounds."""
    weeks, overall = monitoring.weekly(session)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for p in [*weeks, overall]:
        row = [p.start.isoformat() if p.start else "all", p.scored, p.reviewed, _cell(p.coverage.value),
               p.tp, p.fp, p.tn, p.fn]
        for rate in (p.sensitivity, p.specificity, p.ppv, p.npv):
            row += [_cell(rate.value), _cell(rate.low), _cell(rate.high)]
        writer.writerow(row)
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="chestaid-performance.csv"',
                             "Cache-Control": "no-store"})


@router.get("/admin/performance/reliability.png", response_class=Response, dependencies=DOCTOR,
            responses={200: {"content": {"image/png": {}}}})
def reliability_plot(session: SessionDep, settings: SettingsDep) -> Response:
    """Reliability diagram of the calibration in force on the monitoring window's reviewed cases."""
    from web.plots import reliability_png

    snap = monitoring.snapshot(session, meta=_meta(settings), settings=settings)
    png = reliability_png([(f"{snap.calibration_version} (ECE {snap.ece:.3f})", snap.bins)],
                          title=f"Calibration in force, last {snap.n_cases} reviewed cases")
    return Response(png, media_type="image/png", headers=PNG_HEADERS)


@router.get("/admin/performance/scores.png", response_class=Response, dependencies=DOCTOR,
            responses={200: {"content": {"image/png": {}}}})
def scores_plot(session: SessionDep, settings: SettingsDep) -> Response:
    """Recent network outputs against the bundle's validation reference distribution."""
    from web.plots import scores_png

    snap = monitoring.snapshot(session, meta=_meta(settings), settings=settings)
    if snap.drift is None:
        raise HTTPException(status_code=404, detail="no recent scores, or no reference distribution in the bundle")
    d = snap.drift
    png = scores_png(edges=d.edges, reference=d.reference, recent=d.recent,
                     title=f"Last {settings.monitor_drift_days} days: PSI {d.psi:.2f}, KS {d.ks:.2f}")
    return Response(png, media_type="image/png", headers=PNG_HEADERS)


def _preview(fit, cases, notes, win: cohort.Window, form: dict) -> dict:
    return {"fit": fit, "n": len(cases.labels), "n_pneumonia": int(cases.labels.sum()), "notes": notes,
            "window": win.describe(), "plot_query": form, "kinds": [k for k in CALIBRATORS if k != "none"]}


@router.post("/admin/performance/recalibrate/preview", dependencies=ADMIN_POST)
def recalibrate_preview(request: Request, session: SessionDep, settings: SettingsDep,
                        window: Annotated[str, Form(max_length=8)] = "last",
                        last: Annotated[str, Form(max_length=8)] = str(DEFAULT_LAST),
                        start: Annotated[str, Form(max_length=10)] = "", end: Annotated[str, Form(max_length=10)] = ""):
    """Fits a local calibration on the chosen window and shows the cross-validated before/after comparison."""
    form = {"window": window, "last": last, "start": start, "end": end}
    try:
        win = _window(window, last, start, end)
        fit, cases, notes = _fit(session, _meta(settings), win)
    except (ValueError, RecalibrationRefused) as exc:
        prefix = "Recalibration refused: " if isinstance(exc, RecalibrationRefused) else ""
        return _page(request, session, settings, error=f"{prefix}{exc}", form=form, status_code=422)
    return _page(request, session, settings, preview=_preview(fit, cases, notes, win, form), form=form)


@router.get("/admin/performance/recalibrate/reliability.png", response_class=Response, dependencies=ADMIN,
            responses={200: {"content": {"image/png": {}}}})
def recalibrate_plot(session: SessionDep, settings: SettingsDep, window: Annotated[str, Query(max_length=8)] = "last",
                     last: Annotated[str, Query(max_length=8)] = str(DEFAULT_LAST),
                     start: Annotated[str, Query(max_length=10)] = "",
                     end: Annotated[str, Query(max_length=10)] = "") -> Response:
    """Reliability before (calibration in force) and after (chosen calibrator, cross-validated) on the window."""
    from web.plots import reliability_png

    try:
        fit, cases, _ = _fit(session, _meta(settings), _window(window, last, start, end))
    except (ValueError, RecalibrationRefused) as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    z, y = cases.logits, cases.labels
    kind, params, _, version = monitoring.calibration_for(session, _meta(settings))
    before = calibrator_from_dict({"kind": kind, "params": params}).predict(z)
    after, _ = cross_validated(fit.chosen, z, y, fit.target, fit.n_splits, 0)
    png = reliability_png([(f"before: {version} (ECE {fit.before['ece']:.3f})",
                            monitoring.reliability_bins(before, y)),
                           (f"after: {fit.chosen}, cross-validated (ECE {fit.after['ece']:.3f})",
                            monitoring.reliability_bins(after, y))],
                          title=f"{len(y)} reviewed cases")
    return Response(png, media_type="image/png", headers=PNG_HEADERS)


@router.post("/admin/performance/recalibrate/activate", dependencies=ADMIN_POST)
def recalibrate_activate(request: Request, user: Admin, session: SessionDep, settings: SettingsDep,
                         expected: Annotated[str, Form(max_length=128)],
                         confirm: Annotated[str, Form(max_length=8)] = "",
                         window: Annotated[str, Form(max_length=8)] = "last",
                         last: Annotated[str, Form(max_length=8)] = str(DEFAULT_LAST),
                         start: Annotated[str, Form(max_length=10)] = "",
                         end: Annotated[str, Form(max_length=10)] = ""):
    """Refits on the same window, checks it is the calibration previewed, registers it and puts it in force
    (every scored study re-scored from its stored logit; both steps audited)."""
    form = {"window": window, "last": last, "start": start, "end": end}
    if confirm != "yes":
        return _page(request, session, settings, form=form, status_code=422,
                     error="Tick the confirmation box to put the new calibration in force.")
    meta = _meta(settings)
    try:
        win = _window(window, last, start, end)
        fit, cases, notes = _fit(session, meta, win)
    except (ValueError, RecalibrationRefused) as exc:
        return _page(request, session, settings, error=f"Recalibration refused: {exc}", form=form, status_code=422)
    if fit.version != expected:
        return _page(request, session, settings, form=form, status_code=409,
                     preview=_preview(fit, cases, notes, win, form),
                     error=f"The reviewed cases changed since the preview (it would now give {fit.version}, not "
                           f"{expected}); check the new preview below and confirm again.")
    who = {"actor": user.name, "actor_role": user.role, "client": client_host(request)}
    cal = calibrations.register(session, version=fit.version, model_version=meta["version"], kind=fit.spec["kind"],
                                params=fit.spec["params"], threshold=fit.threshold,
                                source=f"performance page: {win.describe()} ({len(cases.labels)} cases)",
                                n=len(cases.labels), ece_before=fit.before["ece"], ece_after_cv=fit.after["ece"],
                                **who)
    rescored = calibrations.activate(session, version=cal.version, **who)
    session.commit()
    session_of(request).set_notice(f"Calibration {cal.version} ({fit.chosen}, threshold {fit.threshold:.4f}) is in "
                                   f"force; {rescored} studies were re-scored. The previous one can be re-activated "
                                   "on the Calibration page.")
    return RedirectResponse("/admin/performance", status_code=303)
