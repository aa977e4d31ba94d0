"""The materialised worklist: one `WorklistRow` per unread or read row, kept in step with the studies.

Grouping and sorting 100,000 studies on every request does not scale, so each row's aggregates
(risk = highest score, flagged = any image flagged, earliest arrival, latest finding, lead image) are stored
and indexed. Every write that can move a study into, out of or within the unread/read sections calls
`refresh` in the same transaction (scoring, findings); a calibration activation, which re-scores everything,
calls `rebuild`. Migration 0005 backfills existing databases the same way.

A row is one DICOM study of one patient (same Study Instance UID *and* PatientID: a UID shared by two
patients is a sender error and must never merge them) or a film of its own (`#<id>`).
"""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import bindparam, delete, insert, or_, select, text, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from core.models import Status, Study, WorklistCount, WorklistRow
from core.worklist_sections import GROUPED_SECTIONS, READ, UNREAD

_MEMBER_COLUMNS = (Study.id, Study.study_instance_uid, Study.patient_id, Study.score, Study.flagged,
                   Study.received_at, Study.feedback_at, Study.finding)
# Every stored forward pass refreshes its rows: the statements are built once (building them per call was about a
# third of a pass's database CPU in a pool process, cProfile on a 2-core Zen 3).
_KEYS_OF = select(Study.id, Study.study_instance_uid, Study.patient_id).where(
    Study.id.in_(bindparam("b_ids", expanding=True)))
_MEMBERS = select(*_MEMBER_COLUMNS).where(
    or_(Study.id.in_(bindparam("b_ids", expanding=True)),
        Study.study_instance_uid.in_(bindparam("b_uids", expanding=True))),
    Study.status == Status.SCORED)
_EXISTING = select(WorklistRow).where(WorklistRow.group_key.in_(bindparam("b_keys", expanding=True)))
_INSERT = insert(WorklistRow.__table__)
_COUNTS = WorklistCount.__table__
_BUMP = (update(_COUNTS).where(_COUNTS.c.section == bindparam("b_section"))
         .values(rows=_COUNTS.c.rows + bindparam("b_delta")))


def key_of(study) -> str:
    """Returns the worklist row key of a study (or of a row with a study's columns)."""
    if study.study_instance_uid:
        return f"{study.study_instance_uid}|{study.patient_id or ''}"
    return f"#{study.id}"


def _aggregate(section: str, key: str, members: list) -> dict:
    lead = min(members, key=lambda m: (-(m.score or 0.0), m.id))
    # A read row is ordered by its latest finding; a finding without a time (never written so) by arrival.
    received = min(m.received_at for m in members)
    feedback = [m.feedback_at for m in members if m.feedback_at is not None] or [received]
    return {"section": section, "group_key": key, "lead_id": lead.id, "neg_score": -(lead.score or 0.0),
            "flagged": any(bool(m.flagged) for m in members),
            "received_at": received,
            "feedback_at": max(feedback) if section == READ else None,
            "first_id": min(m.id for m in members), "images": len(members)}


def _rows_of(members: Iterable) -> dict[tuple[str, str], dict]:
    """Aggregates scored studies into rows, keyed by (section, group key)."""
    grouped: dict[tuple[str, str], list] = {}
    for m in members:
        grouped.setdefault((UNREAD if m.finding is None else READ, key_of(m)), []).append(m)
    return {k: _aggregate(k[0], k[1], v) for k, v in grouped.items()}


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def _bump(session: Session, deltas: dict[str, int]) -> None:
    for section, delta in deltas.items():
        if delta:
            session.execute(_BUMP, {"b_section": section, "b_delta": delta})
            # A table-level UPDATE leaves a count object loaded in this session as it was: move it too.
            if (loaded := session.identity_map.get(identity_key(WorklistCount, section))) is not None:
                set_committed_value(loaded, "rows", loaded.rows + delta)


def _members_by_key(session: Session, keys: list[str]) -> dict[str, list]:
    """Reads the scored studies of every key in one query; returns {key: members}: for `#<id>` that study, for
    `<uid>|<patient>` the studies of that Study Instance UID and PatientID (a UID shared by two patients is two
    rows)."""
    ids = [int(k[1:]) for k in keys if k.startswith("#")]
    uids = sorted({k.partition("|")[0] for k in keys if not k.startswith("#")})
    found = session.execute(_MEMBERS, {"b_ids": ids, "b_uids": uids}).all()
    out: dict[str, list] = {k: [] for k in keys}
    for m in found:
        for key in (f"#{m.id}", f"{m.study_instance_uid}|{m.patient_id or ''}" if m.study_instance_uid is not None
                    else None):
            if key in out:
                out[key].append(m)
    return out


def refresh_keys(session: Session, *, keys: Iterable[str]) -> None:
    """Recomputes the unread/read rows of the given row keys from their scored studies.

    Two reads cover all the keys (their members, their rows): a forward pass stores a batch of films at once, and two
    reads per key cost a pool process about 1.5 ms of CPU per film, more than decoding it (py-spy, 2-core Zen 4)."""
    keys = sorted(set(keys))  # a fixed lock order, so two transactions never wait on each other in a cycle
    if not keys:
        return
    session.flush()  # ORM changes (a finding just set) must be visible to the queries below
    if _is_postgres(session):
        # ROW EXCLUSIVE waits for a running rebuild; the per-key lock serialises two workers scoring images of
        # one study, and the member query below then runs on a fresh snapshot that sees the other's result.
        session.execute(text("LOCK TABLE worklist_rows IN ROW EXCLUSIVE MODE"))
        for key in keys:
            session.execute(text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 9))"), {"k": key})
    deltas = {name: 0 for name in GROUPED_SECTIONS}
    members_of = _members_by_key(session, keys)
    existing_of: dict[str, dict] = {k: {} for k in keys}
    for row in session.scalars(_EXISTING, {"b_keys": keys}):
        existing_of[row.group_key][row.section] = row
    new_rows = []
    for key in keys:
        wanted, existing = _rows_of(members_of[key]), existing_of[key]
        for section in GROUPED_SECTIONS:
            values, row = wanted.get((section, key)), existing.get(section)
            if values is None and row is not None:
                session.delete(row)
                deltas[section] -= 1
            elif values is not None and row is None:
                new_rows.append(values)
                deltas[section] += 1
            elif values is not None:
                for name, value in values.items():
                    setattr(row, name, value)
    session.flush()  # the ORM's deletions and changes, then the new rows
    if new_rows:  # one executemany, not a unit-of-work insert per row
        session.execute(_INSERT, new_rows)
    _bump(session, deltas)


def refresh(session: Session, *, study_ids: Iterable[int]) -> None:
    """Recomputes the worklist rows the given studies belong to (call after changing their status, score,
    flag or finding, in the same transaction)."""
    ids = list(set(study_ids))
    if not ids:
        return
    session.flush()
    rows = session.execute(_KEYS_OF, {"b_ids": ids}).all()
    refresh_keys(session, keys=[key_of(r) for r in rows])


def rebuild(session: Session) -> int:
    """Rebuilds every worklist row and count from the studies (after a re-score of all studies); returns the
    number of rows."""
    session.flush()
    if _is_postgres(session):
        session.execute(text("LOCK TABLE worklist_rows IN SHARE ROW EXCLUSIVE MODE"))
    session.execute(delete(WorklistRow))
    rows = list(_rows_of(session.execute(select(*_MEMBER_COLUMNS).where(Study.status == Status.SCORED))).values())
    if rows:
        session.execute(_INSERT, rows)
    for section in GROUPED_SECTIONS:
        count = sum(1 for r in rows if r["section"] == section)
        if session.get(WorklistCount, section) is None:
            session.add(WorklistCount(section=section, rows=count))
        else:
            session.execute(update(WorklistCount).where(WorklistCount.section == section).values(rows=count))
    session.flush()
    return len(rows)


def counts(session: Session) -> dict[str, int]:
    """Returns the number of rows in each grouped section (a primary-key read, not a count over the table)."""
    found = dict(session.execute(select(WorklistCount.section, WorklistCount.rows)).all())
    return {name: found.get(name, 0) for name in GROUPED_SECTIONS}
