"""HTML pages: the worklist (with its polled fragment), the study page, films, heat-maps and the feedback form.

Nurses and doctors see everything here; only doctors (and admins) record findings.
"""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core import repository as repo
from core import worklist as wl
from core.models import Status, utcnow
from core.repository import FINDINGS
from web.access import DOCTOR_POST, NURSE, Doctor
from web.api import record_finding
from web.deps import SessionDep, SettingsDep, StudyDep
from web.files import NotServable, film_png, heatmap_rgba_png
from web.performance import admin_alerts
from web.templating import templates

router = APIRouter(default_response_class=HTMLResponse)

View = Literal["unread", "read"]
VIEW_SECTIONS = {"unread": ("unread", "in_progress", "refused", "failed", "duplicates"), "read": ("read",)}
# Unread and in-progress studies are the work itself and are never cut off; the archives are.
SECTION_LIMIT = {"unread": None, "in_progress": None, "refused": 200, "failed": 200, "duplicates": 200,
                 "read": 200}
IMAGE_HEADERS = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}


def worklist_context(session, settings, view: str) -> dict:
    """Collects the sections of a view and the status strip, all as of one instant."""
    now = utcnow()
    sections = [wl.section(session, name, max_wait_minutes=settings.max_wait_minutes, now=now,
                           limit=SECTION_LIMIT[name]) for name in VIEW_SECTIONS[view]]
    strip = wl.status_strip(session, worker_alive_seconds=settings.worker_alive_seconds,
                            max_wait_minutes=settings.max_wait_minutes, now=now)
    return {"view": view, "sections": sections, "strip": strip, "refresh_seconds": settings.refresh_seconds,
            "max_wait_minutes": settings.max_wait_minutes}


@router.get("/", dependencies=NURSE)
def worklist_page(request: Request, session: SessionDep, settings: SettingsDep, view: View = "unread"):
    """Shows the worklist (default) or the read studies."""
    context = worklist_context(session, settings, view)
    context["monitor_alerts"] = admin_alerts(request, session, settings)  # the admins' banner (issue 10)
    return templates.TemplateResponse(request, "worklist.html", context)


@router.get("/read", dependencies=NURSE)
def read_page(request: Request, session: SessionDep, settings: SettingsDep):
    """Shows the studies with a recorded finding."""
    return worklist_page(request, session, settings, view="read")


@router.get("/fragments/worklist", dependencies=NURSE)
def worklist_fragment(request: Request, session: SessionDep, settings: SettingsDep, view: View = "unread"):
    """Returns only the table bodies, counts and status strip, swapped in place by the polling page."""
    return templates.TemplateResponse(request, "_worklist_fragment.html", worklist_context(session, settings, view),
                                      headers={"Cache-Control": "no-store"})


def study_context(session, settings, study, **extra) -> dict:
    # The row this study is listed in (its DICOM study's, for a scored image), and every image of that study.
    entry = wl.row_for(session, study_id=study.id, max_wait_minutes=settings.max_wait_minutes)
    images = repo.group_images(session, study_id=study.id)
    strip = wl.status_strip(session, worker_alive_seconds=settings.worker_alive_seconds,
                            max_wait_minutes=settings.max_wait_minutes)
    return {"study": study, "entry": entry, "section": wl.section_of(study), "strip": strip, "images": images,
            "scored_images": [i for i in images if i.status == Status.SCORED],
            "study_risk": max((i.score for i in images if i.status == Status.SCORED), default=None),
            "refresh_seconds": settings.refresh_seconds, "max_wait_minutes": settings.max_wait_minutes,
            "findings": FINDINGS, "form": {"finding": None, "comment": ""}, "error": None,
            **extra}


@router.get("/studies/{study_id:int}", dependencies=NURSE)
def study_page(request: Request, study: StudyDep, session: SessionDep, settings: SettingsDep,
               saved: Annotated[bool, Query()] = False):
    """Shows one study: film, heat-map overlay, score, threshold, decision, what-if and feedback."""
    return templates.TemplateResponse(request, "study.html", study_context(session, settings, study, saved=saved))


@router.post("/studies/{study_id:int}/feedback", dependencies=DOCTOR_POST)
def study_feedback_form(request: Request, user: Doctor, study: StudyDep, session: SessionDep, settings: SettingsDep,
                        finding: Annotated[str | None, Form()] = None, comment: Annotated[str, Form()] = ""):
    """Records the signed-in doctor's finding from the study page's form, then redirects back to it
    (POST → redirect → GET)."""
    form = {"finding": finding, "comment": comment}
    error, status = None, 200
    if study.status != Status.SCORED:
        error, status = f"Feedback can only be recorded for scored studies; this study is {study.status}.", 409
    elif finding not in FINDINGS:
        error, status = "Choose the finding: pneumonia or normal.", 422
    elif len(comment) > 2000:
        error, status = "The comment is limited to 2000 characters.", 422
    if error:
        context = study_context(session, settings, study, form=form, error=error)
        return templates.TemplateResponse(request, "study.html", context, status_code=status)
    record_finding(session, request, user, study, finding=finding, comment=comment)
    session.commit()
    return RedirectResponse(f"/studies/{study.id}?saved=1#feedback", status_code=303)


def _png(render, settings, study) -> Response:
    try:
        return Response(render(settings, study), media_type="image/png", headers=IMAGE_HEADERS)
    except NotServable as exc:
        return Response(str(exc), status_code=exc.status_code, media_type="text/plain; charset=utf-8")


@router.get("/studies/{study_id:int}/image", response_class=Response, dependencies=NURSE,
            responses={200: {"content": {"image/png": {}}}})
def study_image(study: StudyDep, settings: SettingsDep) -> Response:
    """Serves the film of a study as PNG, decoded from the archive (JPEG, PNG, 16-bit and later DICOM)."""
    return _png(film_png, settings, study)


@router.get("/studies/{study_id:int}/heatmap.png", response_class=Response, dependencies=NURSE,
            responses={200: {"content": {"image/png": {}}}})
def study_heatmap(study: StudyDep, settings: SettingsDep) -> Response:
    """Serves the Grad-CAM map as a colourised RGBA PNG the size of the film."""
    return _png(heatmap_rgba_png, settings, study)
