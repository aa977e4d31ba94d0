"""Database tables. The schema itself comes only from Alembic migrations."""
from __future__ import annotations

import datetime as dt
import enum

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy import DateTime as _DateTime
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class DateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone; this puts it back)."""

    impl = _DateTime(timezone=True)
    cache_ok = True

    def __init__(self, timezone: bool = True):
        super().__init__()

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value.astimezone(dt.timezone.utc) if value is not None else None

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


class Status(enum.StrEnum):
    """Where a study stands. Members are their values, so studies.status stays a plain string column."""

    QUEUED = "queued"
    PROCESSING = "processing"
    SCORED = "scored"
    FAILED = "failed"
    DUPLICATE = "duplicate"
    REFUSED = "refused"  # kept in the archive and listed with the guard's reason, deliberately not scored
    TERMINAL = enum.nonmember((SCORED, FAILED, DUPLICATE, REFUSED))  # no further work will happen


class Study(Base):
    """One film that entered the inbox, from arrival to a recorded finding."""

    __tablename__ = "studies"
    # Pages of the non-grouped sections (in progress, refused, failed, duplicates) in arrival order, read as
    # one index range so a page costs the same however many studies there are.
    __table_args__ = (Index("ix_studies_status_received", "status", "received_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_name: Mapped[str] = mapped_column(String(512), index=True)  # searched by exact file name
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    stored_path: Mapped[str] = mapped_column(String(1024))  # relative to the data dir
    status: Mapped[str] = mapped_column(String(16), index=True, default=Status.QUEUED)
    error: Mapped[str | None] = mapped_column(Text)
    duplicate_of_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    enqueued_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    enqueue_count: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(36))
    # Claims taken without a stored result (a worker that died on this file); at the limit the study fails.
    claim_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    scored_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    # What the network said, and what was in force when it was scored (fixed for outcome accounting).
    logit: Mapped[float | None] = mapped_column(Float)
    model_version: Mapped[str | None] = mapped_column(String(128))
    scored_score: Mapped[float | None] = mapped_column(Float)
    scored_threshold: Mapped[float | None] = mapped_column(Float)
    scored_flagged: Mapped[bool | None] = mapped_column(Boolean)
    scored_calibration_version: Mapped[str | None] = mapped_column(String(128))
    # What the worklist shows now: derived from logit and the active calibration.
    score: Mapped[float | None] = mapped_column(Float, index=True)
    threshold: Mapped[float | None] = mapped_column(Float)
    flagged: Mapped[bool | None] = mapped_column(Boolean)
    calibration_version: Mapped[str | None] = mapped_column(String(128))
    timings: Mapped[dict | None] = mapped_column(JSON)
    worker: Mapped[str | None] = mapped_column(String(255))
    heatmap_path: Mapped[str | None] = mapped_column(String(1024))
    # The admin who had this film scored despite the OOD guard ("score anyway"); None = the guard applies.
    guard_override_by: Mapped[str | None] = mapped_column(String(255))
    # Clinician feedback.
    finding: Mapped[str | None] = mapped_column(String(16))
    outcome: Mapped[str | None] = mapped_column(String(2))
    finding_comment: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str | None] = mapped_column(String(255))
    feedback_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # DICOM identity, NULL for PNG/JPEG. Only the first copy of an instance holds its SOP Instance
    # UID (unique); images sharing a Study Instance UID form one worklist row (core.worklist).
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True, unique=True)
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    accession_number: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id: Mapped[str | None] = mapped_column(String(128), index=True)
    patient_name: Mapped[str | None] = mapped_column(String(320))  # DICOM PN form; shown on the study page only
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_age: Mapped[str | None] = mapped_column(String(16))  # DICOM AS form, e.g. "045Y"
    study_date: Mapped[str | None] = mapped_column(String(16))  # DICOM DA, YYYYMMDD
    study_time: Mapped[str | None] = mapped_column(String(32))  # DICOM TM, HHMMSS.ffffff
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))


class Calibration(Base):
    """A calibration (logit → risk) with its threshold; exactly one is active at a time."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(128), unique=True)
    model_version: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict] = mapped_column(JSON)
    threshold: Mapped[float] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    activated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    active: Mapped[bool] = mapped_column(Boolean, default=False, index=True)


class WorkerHeartbeat(Base):
    """A worker process that has loaded the model and is alive."""

    __tablename__ = "worker_heartbeats"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model_version: Mapped[str | None] = mapped_column(String(128))
    device: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WorklistRow(Base):
    """One row of the unread or read worklist, maintained on every write that changes it (core.worklist_rows).

    A row is a DICOM study (same patient and Study Instance UID) or a film of its own; its risk, flag and
    wait are aggregates over its images in that section, stored so that ordering and paging use an index
    instead of grouping the whole studies table per request. `neg_score` is the risk negated, so every
    ordering is ascending and one plain index serves it on both backends.
    """

    __tablename__ = "worklist_rows"
    __table_args__ = (
        UniqueConstraint("section", "group_key", name="uq_worklist_rows_section_key"),
        Index("ix_worklist_rows_flag_score", "section", "flagged", "neg_score", "received_at", "first_id"),
        Index("ix_worklist_rows_flag_wait", "section", "flagged", "received_at", "neg_score", "first_id"),
        Index("ix_worklist_rows_arrival", "section", "received_at"),
        Index("ix_worklist_rows_read", "section", "feedback_at", "first_id"),
        # The filtered listings' sorts (core.worklist_filter): by risk, and by arrival either way.
        Index("ix_worklist_rows_risk", "section", "neg_score", "first_id"),
        Index("ix_worklist_rows_arrival_id", "section", "received_at", "first_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    section: Mapped[str] = mapped_column(String(16))  # unread | read
    group_key: Mapped[str] = mapped_column(String(256))  # "<study uid>|<patient id>" or "#<study id>"
    lead_id: Mapped[int] = mapped_column(Integer)  # the image with the highest score (ties: lowest id)
    neg_score: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean)
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))  # earliest image in the section
    feedback_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))  # latest finding (read)
    first_id: Mapped[int] = mapped_column(Integer)
    images: Mapped[int] = mapped_column(Integer)


class WorklistCount(Base):
    """How many rows each grouped section has, kept with the rows so totals cost one primary-key read."""

    __tablename__ = "worklist_counts"

    section: Mapped[str] = mapped_column(String(16), primary_key=True)
    rows: Mapped[int] = mapped_column(Integer, default=0)


class WorklistVersion(Base):
    """One row whose number moves with every committed change to the studies or the worklist rows.

    Database triggers (migration 0008) bump it, so no write path can forget to; the polled worklist fragment
    answers "unchanged" from it without rebuilding the page (web.poll).
    """

    __tablename__ = "worklist_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


# --- accounts and audit ----------------------------------------------------------------------------


class User(Base):
    """A person who signs in: nurse, doctor or admin. Only an argon2 hash of the password is kept."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Web sessions issued before this instant are void after a password change.
    password_changed_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Bumped on logout: session cookies carry the generation they were issued in and die with it.
    session_generation: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ReadingClaim(Base):
    """A soft "being read by" mark: who has a study open, since when, last seen when (core.reading).

    It never blocks anyone; it expires when its page stops sending that it is still open."""

    __tablename__ = "reading_claims"
    __table_args__ = (UniqueConstraint("study_id", "user_id", name="uq_reading_claims_study_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(Integer, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    user_name: Mapped[str] = mapped_column(String(255))
    opened_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class ApiToken(Base):
    """A per-user API token for scripts; only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    label: Mapped[str] = mapped_column(String(255), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, so an admin can tell tokens apart
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class LoginAttempt(Base):
    """One sign-in attempt; the throttle counts recent failures per account and per client address."""

    __tablename__ = "login_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    client: Mapped[str] = mapped_column(String(255), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # success | failure | throttled


class AuditEvent(Base):
    """An append-only record of who did what, when and from where (the database refuses UPDATE/DELETE)."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(255), index=True)
    role: Mapped[str | None] = mapped_column(String(16))
    client: Mapped[str | None] = mapped_column(String(255))
    action: Mapped[str] = mapped_column(String(64), index=True)
    # No foreign key: the trail must outlive (and never block removal of) the study it mentions.
    study_id: Mapped[int | None] = mapped_column(Integer, index=True)
    detail: Mapped[dict] = mapped_column(JSON, default=dict)
