"""JSON API: the worklist data for scripts and tests, feedback, the feedback export and health.

Scripts authenticate with `Authorization: Bearer <token>`; the browser uses its session cookie (and, for
POST, the X-CSRF-Token header).
"""
from __future__ import annotations

import csv
import dataclasses
import io
from typing import Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from core import audit, auth, findings
from core import repository as repo
from core import worklist as wl
from core.cursor import BadCursor, decode, start_of
from core.feedback import feedback_csv
from core.models import Status, utcnow
from core.pseudonym import load_salt
from core.worklist_sections import SECTIONS
from web import health as health_checks
from web.access import ADMIN, DOCTOR_POST, NURSE, PUBLIC, Admin, Doctor, current_user
from web.deps import SessionDep, SettingsDep, StudyDep, client_host
from web.schemas import FeedbackIn, HealthOut, StudyOut

router = APIRouter()

SectionName = Literal[SECTIONS]


def page_limit(settings, limit: int | None) -> int:
    """Returns the page size asked for, the default when none; more than the maximum is refused (422)."""
    if limit is None:
        return settings.page_size
    if limit > settings.max_page_size:
        raise HTTPException(status_code=422, detail=f"limit {limit} is over the maximum page size "
                                                    f"{settings.max_page_size}; follow the Link: rel=next pages")
    return limit


def _next_link(request: Request, cursor: str | None) -> dict[str, str]:
    if cursor is None:
        return {}
    return {"Link": f'<{request.url.include_query_params(cursor=cursor)}>; rel="next"'}


def _list_page(session, settings, *, names: list[str], cursor: str | None, limit: int):
    """Fills one page from the sections in order, starting where the cursor says; returns the rows and the
    cursor of the next page (None after the last row of the last section)."""
    if cursor is not None and names != list(SECTIONS):
        cursor_section = names[0]  # one section: its own cursors only
    else:
        cursor_section = decode(cursor).section if cursor else names[0]
        names = names[names.index(cursor_section):] if cursor_section in names else names
    now, rows, nxt = utcnow(), [], None
    for name in names:
        page = wl.section(session, name, max_wait_minutes=settings.max_wait_minutes, now=now,
                          limit=limit - len(rows), cursor=cursor if name == cursor_section else None,
                          total=0)  # the API sends no totals: skip counting
        rows += [(name, entry) for entry in page.entries]
        nxt = page.next_cursor
        if len(rows) >= limit:
            following = names[names.index(name) + 1:]
            if nxt is None and following:
                nxt = start_of(following[0]).encode()  # this section is done; the next page starts the next one
            break
    return rows, nxt


@router.get("/api/studies", response_model=list[StudyOut], tags=["studies"], dependencies=NURSE,
            responses={200: {"headers": {"Link": {"description": 'the next page: <url>; rel="next"'}}}})
def list_studies(request: Request, response: Response, session: SessionDep, settings: SettingsDep,
                 section: SectionName | None = Query(default=None, description="one section only"),
                 limit: int | None = Query(default=None, ge=1, description="rows per page (default "
                                           "CHESTAID_PAGE_SIZE, at most CHESTAID_MAX_PAGE_SIZE)"),
                 cursor: str | None = Query(default=None, max_length=1000,
                                            description="where the page starts: from the previous Link rel=next"),
                 q: str | None = Query(default=None, min_length=1, max_length=128,
                                       description="search by exact accession number, patient ID, file name or "
                                                   "study id (newest first)")) -> list[StudyOut]:
    """Lists worklist rows in order, one page at a time: unread by priority, then in progress, refused,
    failed, duplicates, read. A DICOM study is one row (its highest-scoring image), with all its images.
    The `Link` header names the next page while there is one; rows arriving meanwhile never repeat or shift
    the rows already listed."""
    size = page_limit(settings, limit)
    try:
        if q is not None:
            found = wl.search(session, q=q, max_wait_minutes=settings.max_wait_minutes, limit=size, cursor=cursor)
            rows, nxt = [(wl.section_of(e.study), e) for e in found.entries], found.next_cursor
        else:
            names = [section] if section else list(SECTIONS)
            rows, nxt = _list_page(session, settings, names=names, cursor=cursor, limit=size)
    except BadCursor as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    response.headers.update(_next_link(request, nxt))
    images = repo.images_of(session, studies=[entry.study for _, entry in rows])
    return [StudyOut.from_entry(entry, name, images[entry.study.id]) for name, entry in rows]


@router.get("/api/studies/{study_id:int}", response_model=StudyOut, tags=["studies"], dependencies=NURSE)
def get_study(study: StudyDep, session: SessionDep, settings: SettingsDep) -> StudyOut:
    """Returns one study, as its worklist row shows it (its own values), with all images of its DICOM study."""
    entry = wl.row_for(session, study_id=study.id, max_wait_minutes=settings.max_wait_minutes)
    entry = dataclasses.replace(entry, study=study)  # this study's own values, whichever image leads its row
    return StudyOut.from_entry(entry, wl.section_of(study), repo.group_images(session, study_id=study.id))


@router.post("/api/studies/{study_id:int}/feedback", response_model=StudyOut, tags=["studies"],
             dependencies=DOCTOR_POST)
def post_feedback(request: Request, user: Doctor, study: StudyDep, body: FeedbackIn, session: SessionDep,
                  settings: SettingsDep) -> StudyOut:
    """Records the finding for a scored study (doctors); the reviewer is the caller. For a DICOM study the
    finding is recorded on each of its scored images. The response carries the derived outcome (TP/FP/TN/FN)."""
    if study.status != Status.SCORED:
        raise HTTPException(status_code=409, detail=f"study {study.id} is {study.status}, not scored; "
                                                    "feedback can only be recorded for scored studies")
    record_finding(session, request, user, study, finding=body.finding, comment=body.comment)
    session.commit()
    return get_study(study, session, settings)


def record_finding(session, request: Request, user, study, *, finding: str, comment: str | None) -> None:
    """Records a finding by the signed-in user on the study's worklist row (core.findings: each scored image
    of a DICOM study, audited per image)."""
    findings.record_finding(session, study_id=study.id, finding=finding, comment=comment, actor=user.name,
                            actor_role=user.role, client=client_host(request))


@router.get("/api/feedback.csv", tags=["export"], dependencies=ADMIN)
def export_feedback(request: Request, user: Admin, session: SessionDep, settings: SettingsDep) -> Response:
    """Downloads every recorded finding as CSV (admins; the input of `chestaid recalibrate`); no patient
    identifiers, only a salted pseudonymous patient_key."""
    text = feedback_csv(session, salt=load_salt(settings))
    rows = sum(1 for _ in csv.reader(io.StringIO(text))) - 1  # comments may span lines
    audit.record(session, actor=user.name, role=user.role, client=client_host(request),
                 action=audit.EXPORT_DOWNLOADED, rows=rows)
    session.commit()
    return Response(text, media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="feedback.csv"',
                             "Cache-Control": "no-store"})


@router.get("/openapi.json", include_in_schema=False, dependencies=NURSE)
def openapi_schema(request: Request) -> JSONResponse:
    """Returns the OpenAPI schema of the JSON API (signed-in users and tokens)."""
    return JSONResponse(request.app.openapi())


@router.get("/healthz", response_model=HealthOut, tags=["health"], dependencies=PUBLIC,
            responses={503: {"model": HealthOut, "description": "a part is down or no worker has loaded a model"}})
def healthz(request: Request, session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Ready only when the DB and broker answer and a live worker has loaded the model (public: for load
    balancers, status only; it names no error, the server log does). Signed-in admins also get each part,
    worker counts, model versions and each worker's reported device (precision, images/s)."""
    try:
        user = current_user(request, session)
    except Exception:  # no database (or a rejected session) means no details, never a failed health answer
        session.rollback()
        user = None
    admin = user is not None and auth.role_allows(user.role, "admin")
    result = HealthOut(**health_checks.health(session, settings, details=admin))
    return JSONResponse(result.model_dump(exclude_none=True), status_code=200 if result.status == "ok" else 503,
                        headers={"Cache-Control": "no-store"})
