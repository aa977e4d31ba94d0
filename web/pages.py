"""HTML pages: the worklist (with its polled fragment), the study page, films, heat-maps and the feedback form.

Nurses and doctors see everything here; only doctors (and admins) record findings.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from core import reading
from core import repository as repo
from core import worklist as wl
from core.cursor import BadCursor
from core.models import Status, utcnow
from core.repository import FINDINGS
from core.worklist_entries import Section
from core.worklist_filter import MODALITIES, SORTS, Filters, filtered
from core.worklist_sections import VIEW_SECTIONS
from web import poll
from web.access import DOCTOR_POST, NURSE, Doctor, Nurse
from web.api import record_finding
from web.deps import SessionDep, SettingsDep, StudyDep
from web.files import NotServable, film_png, heatmap_rgba_png
from web.performance import admin_alerts
from web.templating import templates

router = APIRouter(default_response_class=HTMLResponse)

View = Literal[tuple(VIEW_SECTIONS)]
IMAGE_HEADERS = {"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"}


@dataclass(frozen=True)
class Listing:
    """What the worklist page lists instead of the triage order: a search (`q`) or filters and a sort, with
    the query-string parameters that reproduce it (for the poll and the "Next page" links)."""

    q: str | None
    filters: Filters | None
    params: dict

    @property
    def active(self) -> bool:
        return self.q is not None or self.filters is not None


def _day(text: str, name: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text) if text else None
    except ValueError:
        raise HTTPException(status_code=422, detail=f"{name}: {text!r} is not a date (YYYY-MM-DD)") from None


def listing(view: View = "unread", q: Annotated[str, Query(max_length=128)] = "", flagged: bool = False,
            overdue: bool = False, received_from: Annotated[str, Query(alias="from", max_length=10)] = "",
            received_to: Annotated[str, Query(alias="to", max_length=10)] = "",
            modality: Annotated[str, Query(max_length=8)] = "", finding: Annotated[str, Query(max_length=16)] = "",
            sort: Annotated[str, Query(max_length=16)] = "triage") -> Listing:
    """Reads the worklist's search, filter and sort fields (an empty field means "any")."""
    if q.strip():
        return Listing(q.strip(), None, {"q": q.strip()})
    if finding not in ("", "none", "recorded") or sort not in ("triage", *SORTS):
        raise HTTPException(status_code=422, detail="finding must be none or recorded; sort one of "
                                                    f"triage, {', '.join(SORTS)}")
    params = {k: v for k, v in (("flagged", "1" if flagged else ""), ("overdue", "1" if overdue else ""),
                                 ("from", received_from), ("to", received_to), ("modality", modality),
                                 ("finding", finding), ("sort", "" if sort == "triage" else sort)) if v}
    if not params:
        return Listing(None, None, {})  # the triage order
    try:
        filters = Filters(read=finding == "recorded" or (view == "read" and finding != "none"), flagged=flagged,
                          overdue=overdue, received_from=_day(received_from, "from"),
                          received_to=_day(received_to, "to"), modality=modality or None,
                          sort="risk" if sort == "triage" else sort)
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return Listing(None, filters, params)


ListingDep = Annotated[Listing, Depends(listing)]


def _listed(session, settings, found: Listing, cursor: str | None, now) -> Section:
    if found.q is not None:
        return wl.search(session, q=found.q, max_wait_minutes=settings.max_wait_minutes, limit=settings.page_size,
                         cursor=cursor, now=now)
    return filtered(session, filters=found.filters, max_wait_minutes=settings.max_wait_minutes,
                    limit=settings.page_size, cursor=cursor, now=now)


def row_readers(session, settings, sections, *, viewer_id: int | None) -> dict[int, list]:
    """Who else has each listed row's study open (any of its images), by the row's lead image id."""
    entries = [e for sec in sections for e in sec.entries]
    marks = reading.readers(session, study_ids=[i.id for e in entries for i in (e.images or (e.study,))],
                            expire_seconds=settings.reading_claim_seconds, exclude_user_id=viewer_id)
    out = {}
    for e in entries:
        found = [r for i in (e.images or (e.study,)) for r in marks.get(i.id, [])]
        if found:
            out[e.study.id] = sorted({r.user_name: r for r in found}.values(), key=lambda r: r.opened_at)
    return out


def worklist_context(session, settings, view: str, *, paged: str | None = None, cursor: str | None = None,
                     found: Listing | None = None, viewer_id: int | None = None) -> dict:
    """Collects one page of each section of a view (the page `cursor` names for section `paged`, the first page
    of the others) and the status strip, all as of one instant, counting everything once; with a search or
    filters (`found`), one page of that listing instead of the sections."""
    found = found or Listing(None, None, {})
    if paged is not None and not found.active and paged not in VIEW_SECTIONS[view]:
        raise HTTPException(status_code=422, detail=f"section {paged!r} is not on the {view} view")
    now = utcnow()
    totals = wl.section_totals(session)
    try:
        if found.active:
            sections = [_listed(session, settings, found, cursor, now)]
        else:
            main = VIEW_SECTIONS[view][0]  # the list to read (or the read studies); the rest are side sections
            sections = [wl.section(session, name, max_wait_minutes=settings.max_wait_minutes, now=now,
                                   limit=settings.page_size if name == main else settings.side_page_size,
                                   cursor=cursor if name == paged else None, total=totals[name])
                        for name in VIEW_SECTIONS[view]]
    except BadCursor as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from None
    strip = wl.status_strip(session, worker_alive_seconds=settings.worker_alive_seconds,
                            max_wait_minutes=settings.max_wait_minutes, now=now, totals=totals)
    base = {"view": view, **found.params}
    query = urlencode({**base, **({"section": paged or sections[0].name, "cursor": cursor} if cursor else {})})
    return {"view": view, "sections": sections, "strip": strip, "refresh_seconds": settings.refresh_seconds,
            "readers": row_readers(session, settings, sections, viewer_id=viewer_id),
            "max_wait_minutes": settings.max_wait_minutes, "poll_query": query, "listing": found,
            "list_query": urlencode(base), "sorts": SORTS, "modalities": MODALITIES}


@router.get("/", dependencies=NURSE)
def worklist_page(request: Request, session: SessionDep, settings: SettingsDep, found: ListingDep,
                  view: View = "unread", section: str | None = None,
                  cursor: Annotated[str | None, Query(max_length=1000)] = None,
                  after: Annotated[int | None, Query(ge=1)] = None):
    """Shows the worklist (default) or the read studies, one page per section ("Next" pages on), or one page of
    a search or filtered and sorted listing. `after` names the study a finding was just recorded on when no
    unread study was left to go on to."""
    context = worklist_context(session, settings, view, paged=section, cursor=cursor, found=found,
                               viewer_id=_viewer_id(request))
    context["after"] = after
    context["monitor_alerts"] = admin_alerts(request, session, settings)  # the admins' banner
    return templates.TemplateResponse(request, "worklist.html", context)


@router.get("/read", dependencies=NURSE)
def read_page(request: Request, session: SessionDep, settings: SettingsDep, section: str | None = None,
              cursor: Annotated[str | None, Query(max_length=1000)] = None):
    """Shows the studies with a recorded finding."""
    return worklist_page(request, session, settings, Listing(None, None, {}), view="read", section=section,
                         cursor=cursor)


@router.get("/fragments/worklist", dependencies=NURSE)
def worklist_fragment(request: Request, session: SessionDep, settings: SettingsDep, found: ListingDep,
                      view: View = "unread", section: str | None = None,
                      cursor: Annotated[str | None, Query(max_length=1000)] = None):
    """Returns only the table bodies, counts and status strip of the page shown (triage sections, or the
    search or filtered listing), swapped in place by the polling page; answers 304 (no body) when nothing
    changed since the version (ETag) the poller has, from the worklist's state alone when it can (web.poll)."""
    key = poll.request_key(request, session, settings)
    known, asked = poll.VERSIONS.get(key), poll.asked_for(request)
    if known is not None and known in asked:
        return Response(status_code=304, headers={"ETag": known, "Cache-Control": "no-store"})
    context = worklist_context(session, settings, view, paged=section, cursor=cursor, found=found,
                               viewer_id=_viewer_id(request))
    response = templates.TemplateResponse(request, "_worklist_fragment.html", context,
                                          headers={"Cache-Control": "no-store"})
    etag = poll.version_tag(response.body)
    poll.VERSIONS.put(key, etag)
    if etag in asked:
        return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-store"})
    response.headers["ETag"] = etag
    return response


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
            "findings": FINDINGS, "form": {"finding": None, "comment": ""}, "error": None, "after": None,
            "others": [],
            **extra}


@router.get("/studies/{study_id:int}", dependencies=NURSE)
def study_page(request: Request, user: Nurse, study: StudyDep, session: SessionDep, settings: SettingsDep,
               saved: Annotated[bool, Query()] = False, after: Annotated[int | None, Query(ge=1)] = None):
    """Shows one study: film, heat-map overlay, score, threshold, decision, what-if and feedback, and who else
    has it open (opening it marks it open by this user, softly: it never blocks anyone). `after` names the
    study whose finding was just recorded before moving on to this one."""
    if request.headers.get("HX-Request") != "true":  # the in-progress page's own refresh is not an opening
        reading.mark_open(session, study_id=study.id, user_id=user.id, user_name=user.name,
                          expire_seconds=settings.reading_claim_seconds)
        session.commit()
    return templates.TemplateResponse(request, "study.html",
                                      study_context(session, settings, study, saved=saved, after=after,
                                                    others=_others(session, settings, study, user)))


def _viewer_id(request: Request) -> int | None:
    user = getattr(request.state, "user", None)
    return user.id if user is not None else None


def _others(session, settings, study, user) -> list:
    marks = reading.readers(session, study_ids=[study.id], expire_seconds=settings.reading_claim_seconds,
                            exclude_user_id=user.id)
    return marks.get(study.id, [])


@router.get("/studies/{study_id:int}/reading", dependencies=NURSE)
def study_reading(request: Request, user: Nurse, study: StudyDep, session: SessionDep, settings: SettingsDep):
    """Keeps this user's "open" mark on the study fresh (the open study page calls it every few seconds; a
    page that stops calling lets it expire) and returns who else has the study open."""
    reading.mark_open(session, study_id=study.id, user_id=user.id, user_name=user.name,
                      expire_seconds=settings.reading_claim_seconds)
    session.commit()
    return templates.TemplateResponse(request, "_readers.html",
                                      {"study": study, "others": _others(session, settings, study, user),
                                       "refresh_seconds": settings.refresh_seconds},
                                      headers={"Cache-Control": "no-store"})


def next_unread(session, settings) -> int | None:
    """Returns the study id to read next: the lead image of the first unread row in triage order."""
    first = wl.unread(session, max_wait_minutes=settings.max_wait_minutes, limit=1)
    return first[0].study.id if first else None


@router.post("/studies/{study_id:int}/feedback", dependencies=DOCTOR_POST)
def study_feedback_form(request: Request, user: Doctor, study: StudyDep, session: SessionDep, settings: SettingsDep,
                        finding: Annotated[str | None, Form()] = None, comment: Annotated[str, Form()] = "",
                        then: Annotated[Literal["stay", "next"], Form()] = "stay"):
    """Records the signed-in doctor's finding from the study page's form, then redirects back to it, or with
    `then=next` to the next unread study in triage order (the worklist when none is left)
    (POST → redirect → GET)."""
    form = {"finding": finding, "comment": comment}
    error, status = None, 200
    if study.status != Status.SCORED:
        error, status = f"Feedback can only be recorded for scored studies; this study is {study.status}.", 409
    elif finding not in FINDINGS:
        error, status = f"Choose the finding: {', '.join(FINDINGS)}.", 422
    elif len(comment) > 2000:
        error, status = "The comment is limited to 2000 characters.", 422
    if error:
        context = study_context(session, settings, study, form=form, error=error)
        return templates.TemplateResponse(request, "study.html", context, status_code=status)
    record_finding(session, request, user, study, finding=finding, comment=comment)
    session.commit()
    if then == "next":
        following = next_unread(session, settings)
        url = f"/studies/{following}?after={study.id}" if following is not None else f"/?after={study.id}"
        return RedirectResponse(url, status_code=303)
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
