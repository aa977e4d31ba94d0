"""The audit trail: who did what, when and from where. Append-only; the database refuses UPDATE and DELETE."""
from __future__ import annotations

import csv
import datetime as dt
import io
import json

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.csvsafe import safe_cell
from core.models import AuditEvent, utcnow

LOGIN_SUCCESS = "login_success"
LOGIN_FAILURE = "login_failure"
LOGIN_THROTTLED = "login_throttled"
LOGOUT = "logout"
FINDING_RECORDED = "finding_recorded"
FINDING_CHANGED = "finding_changed"
EXPORT_DOWNLOADED = "export_downloaded"
CALIBRATION_ACTIVATED = "calibration_activated"
CALIBRATION_REGISTERED = "calibration_registered"
THRESHOLD_CHANGED = "threshold_changed"
USER_CREATED = "user_created"
USER_DISABLED = "user_disabled"
USER_ENABLED = "user_enabled"
PASSWORD_CHANGED = "password_changed"
TOKEN_CREATED = "token_created"
TOKEN_REVOKED = "token_revoked"
AUDIT_EXPORTED = "audit_exported"
GUARD_OVERRIDDEN = "guard_overridden"  # an admin had a film the OOD guard refused scored anyway

ACTIONS = frozenset({
    LOGIN_SUCCESS, LOGIN_FAILURE, LOGIN_THROTTLED, LOGOUT, FINDING_RECORDED, FINDING_CHANGED, EXPORT_DOWNLOADED,
    CALIBRATION_ACTIVATED, CALIBRATION_REGISTERED, THRESHOLD_CHANGED, USER_CREATED, USER_DISABLED, USER_ENABLED,
    PASSWORD_CHANGED,
    TOKEN_CREATED, TOKEN_REVOKED, AUDIT_EXPORTED, GUARD_OVERRIDDEN,
})

# Secrets and patient identifiers never enter the trail; the study is referred to by study_id only.
FORBIDDEN_DETAIL_KEYS = frozenset({
    "password", "new_password", "old_password", "password_hash", "token", "token_hash", "secret",
    "source_name", "stored_path", "patient", "patient_id", "patient_name", "mrn", "accession",
    "accession_number", "birth_date", "comment", "finding_comment",
})

COLUMNS = ["id", "at", "actor", "role", "client", "action", "study_id", "detail"]
_FIELD_MAX = 255


class AuditError(ValueError):
    """Raised for an unknown action or a detail that must not be written to the trail."""


def record(session: Session, *, actor: str, action: str, client: str | None = None, role: str | None = None,
           study_id: int | None = None, at: dt.datetime | None = None, **detail) -> AuditEvent:
    """Appends one event; detail must be JSON-serialisable and free of secrets and patient identifiers."""
    if action not in ACTIONS:
        raise AuditError(f"unknown audit action {action!r}")
    bad = sorted(k for k in detail if k.lower() in FORBIDDEN_DETAIL_KEYS)
    if bad:
        raise AuditError(f"audit detail must not contain {', '.join(bad)}")
    try:
        json.dumps(detail)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit detail is not JSON-serialisable: {exc}") from exc
    event = AuditEvent(at=at or utcnow(), actor=actor[:_FIELD_MAX], role=role, action=action, study_id=study_id,
                       client=client[:_FIELD_MAX] if client else None, detail=detail)
    session.add(event)
    session.flush()
    return event


def record_finding(session: Session, *, actor: str, role: str | None, client: str | None, study_id: int,
                   old: str | None, new: str) -> AuditEvent:
    """Records a finding as recorded (none before) or changed (old and new value); comments stay out."""
    if old is None:
        return record(session, actor=actor, role=role, client=client, study_id=study_id,
                      action=FINDING_RECORDED, finding=new)
    return record(session, actor=actor, role=role, client=client, study_id=study_id,
                  action=FINDING_CHANGED, old=old, new=new)


def _filtered(query, *, action: str | None, actor: str | None):
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if actor is not None:
        query = query.where(AuditEvent.actor == actor)
    return query


def list_events(session: Session, *, limit: int, offset: int = 0, action: str | None = None,
                actor: str | None = None) -> list[AuditEvent]:
    """Returns events newest first, optionally only one action or one actor."""
    query = _filtered(select(AuditEvent), action=action, actor=actor)
    return list(session.scalars(query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)))


def count_events(session: Session, *, action: str | None = None, actor: str | None = None) -> int:
    """Returns how many events match the filters (for paging)."""
    query = _filtered(select(func.count(AuditEvent.id)), action=action, actor=actor)
    return int(session.scalar(query) or 0)


def export_csv(session: Session) -> str:
    """Returns the whole trail as CSV, oldest first; detail as compact JSON."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for e in session.scalars(select(AuditEvent).order_by(AuditEvent.id)):
        writer.writerow([e.id, e.at.isoformat(), safe_cell(e.actor), safe_cell(e.role), safe_cell(e.client), e.action,
                         "" if e.study_id is None else e.study_id,
                         safe_cell(json.dumps(e.detail or {}, sort_keys=True, separators=(",", ":")))])
    return buf.getvalue()
