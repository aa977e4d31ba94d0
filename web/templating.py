"""Jinja2 environment and display filters shared by the pages."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from fastapi import Request
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from core import worklist_sections
from core.auth import role_allows
from core.films.dicom import DicomInfo
from web.links import film_url, heatmap_url
from web.sessions import SCOPE_KEY

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"

CAVEAT = ("The score is a calibrated risk score for triage, not a diagnosis; the heat-map shows where the "
          "network looked, it is not a lesion marking. Chest-Aid never replaces the radiologist.")

OUTCOME_TEXT = {
    "TP": "true positive: flagged, finding pneumonia",
    "FP": "false positive: flagged, finding normal",
    "TN": "true negative: not flagged, finding normal",
    "FN": "false negative: not flagged, finding pneumonia",
}


def waited(seconds: float | None) -> str:
    """Formats a waiting time for people: "45 s", "12 min", "3 h 05 min", "2 d 4 h"."""
    if seconds is None:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    minutes, hours = s // 60, s // 3600
    if hours == 0:
        return f"{minutes} min"
    if hours < 48:
        return f"{hours} h {minutes % 60:02d} min"
    return f"{hours // 24} d {hours % 24} h"


def ticking(seconds: float | None, now: dt.datetime) -> str:
    """A waiting time that goes on growing, as of `now`: a <time class="tick"> holding the instant it counts
    from, which the page's script advances every second (app.js); the text is `waited`'s until then."""
    if seconds is None:
        return "–"
    # To the second: `seconds` came from a subtraction, so the exact instant could differ by a microsecond
    # between two renders of the same row.
    since = (now - dt.timedelta(seconds=seconds - 0.5)).replace(microsecond=0)
    return Markup(f'<time class="tick" data-tick="waited" datetime="{since.isoformat()}">{waited(seconds)}</time>')


def open_for(reader) -> str:
    """How long a reader has had a study open ("under a minute", "4 min"), ticking like `ticking`."""
    text = "under a minute" if reader.minutes == 0 else f"{reader.minutes} min"
    return Markup(f'<time class="tick" data-tick="open" datetime="{reader.opened_at.isoformat()}">{text}</time>')


def when(value: dt.datetime | None) -> str:
    """Formats a timestamp in the server's local time zone (the hospital's), with its zone name, as a <time>
    element that the page's script shows in the reader's own zone (app.js, also with the zone named)."""
    if value is None:
        return "–"
    local = value.astimezone()
    text = local.strftime("%Y-%m-%d %H:%M:%S %Z").strip()
    return Markup(f'<time class="local-time" datetime="{local.isoformat()}">{text}</time>')


def clock(value: dt.datetime | None) -> str:
    """Formats a time of day in the server's local time zone."""
    return value.astimezone().strftime("%H:%M:%S") if value is not None else "–"


def score(value: float | None) -> str:
    """Formats a calibrated score with three decimals."""
    return "–" if value is None else f"{value:.3f}"


def compare_digits(a: float | None, b: float | None) -> int:
    """Returns how many decimals show two values so that their comparison reads true: three, or more while
    rounding would make two different values look equal (never "1.000 < 1.000")."""
    if a is None or b is None or a == b:
        return 3
    for digits in range(3, 10):
        if f"{a:.{digits}f}" != f"{b:.{digits}f}":
            return digits
    return 10


def person_name(value: str | None) -> str:
    """Formats a DICOM person name ("Family^Given^Middle^Prefix^Suffix") as "Family, Given Middle"."""
    if not value:
        return "–"
    parts = [p.strip() for p in value.split("=")[0].split("^")]
    family, rest = parts[0], " ".join(p for p in parts[1:4] if p)
    return f"{family}, {rest}" if family and rest else family or rest or "–"


def study_when(study) -> str:
    """Formats a study's DICOM StudyDate/StudyTime ("2024-01-02 10:15:30"), or the raw values if malformed."""
    info = DicomInfo(study_date=study.study_date, study_time=study.study_time)
    moment = info.study_datetime()
    if moment is None:
        return " ".join(v for v in (study.study_date, study.study_time) if v) or "–"
    return moment.strftime("%Y-%m-%d %H:%M:%S" if study.study_time else "%Y-%m-%d")


def auth_context(request: Request) -> dict:
    """Gives every page the signed-in user (or None) and the CSRF token its forms and htmx must send."""
    state = request.scope.get(SCOPE_KEY)
    return {"current_user": getattr(request.state, "user", None),
            "csrf_token": state.csrf_token() if state is not None else ""}


def make_templates() -> Jinja2Templates:
    """Returns the template renderer with Chest-Aid's filters and globals."""
    templates = Jinja2Templates(directory=str(TEMPLATES_DIR), context_processors=[auth_context])
    env = templates.env
    env.filters.update(waited=waited, ticking=ticking, open_for=open_for, when=when, clock=clock, score=score, person_name=person_name,
                       study_when=study_when, compare_digits=compare_digits)
    env.globals.update(caveat=CAVEAT, outcome_text=OUTCOME_TEXT, role_allows=role_allows,
                       worklist_sections=worklist_sections, film_url=film_url, heatmap_url=heatmap_url)
    return templates


templates = make_templates()
