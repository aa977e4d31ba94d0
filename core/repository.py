"""Repository functions over studies and worker heartbeats (keyword-only, no commits); calibrations are in
core.calibrations."""
from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value
from sqlalchemy.orm.util import identity_key

from core import worklist_rows
from core.models import Status, Study, WorkerHeartbeat, utcnow

# The calibration labels: only these findings are outcomes (TP/FP/TN/FN), recalibration input and monitoring
# cases. The other findings are recorded (the study is read) but say nothing about pneumonia, so they are
# excluded from recalibration and counted apart (core.feedback).
LABELS = ("pneumonia", "normal")
OTHER_FINDINGS = ("other abnormality", "indeterminate", "poor quality")
FINDINGS = LABELS + OTHER_FINDINGS
# DICOM identity columns of Study; the same names as core.films.dicom.DicomInfo's fields.
IDENTITY_FIELDS = ("sop_instance_uid", "sop_class_uid", "study_instance_uid", "series_instance_uid",
                   "accession_number", "patient_id", "patient_name", "patient_sex", "patient_age", "study_date",
                   "study_time", "modality", "body_part_examined", "view_position")


def _fit_identity(identity: dict | None) -> dict[str, str | None]:
    """Keeps the identity columns, clipping non-conforming over-long values to the column (UIDs are checked
    at ingest, so only display fields are ever clipped)."""
    out = {}
    for name in IDENTITY_FIELDS:
        value = (identity or {}).get(name)
        out[name] = None if value is None else str(value)[:Study.__table__.c[name].type.length]
    return out


def find_by_sop(session: Session, *, sop_instance_uid: str) -> Study | None:
    """Returns the study that holds a DICOM SOP Instance UID: the copy of that instance now in force (the first
    received, or the resend that superseded a failed or refused one)."""
    return session.scalars(select(Study).where(Study.sop_instance_uid == sop_instance_uid)).first()


# A resend of an instance in one of these states is evaluated again rather than recorded as a duplicate.
_SUPERSEDABLE = (Status.FAILED, Status.REFUSED)
_STUDIES = Study.__table__
# The original a byte-identical file duplicates (its id and name), built once: every ingested film looks it up.
_ORIGINAL_BY_SHA = (select(_STUDIES.c.id, _STUDIES.c.source_name)
                    .where(_STUDIES.c.sha256 == bindparam("b_sha"), _STUDIES.c.duplicate_of_id.is_(None))
                    .order_by(_STUDIES.c.id).limit(1))


def create_study(session: Session, *, source_name: str, sha256: str, size_bytes: int, stored_path: str,
                 received_at: dt.datetime | None = None, identity: dict | None = None,
                 failure: str | None = None) -> Study:
    """Adds a study. `identity` holds the DICOM header fields (IDENTITY_FIELDS) of a DICOM file.

    Deduplication rule:
    - `failure` given (an empty file, an entry that was not read): recorded as failed with that reason and
      never a duplicate; nothing about its content says it is the same film as another.
    - A DICOM instance whose SOP Instance UID is held by a study:
      - byte-identical (same sha256) to it: a duplicate of that study, whatever its status (an identical
        copy of a failed or refused file would end the same way);
      - different bytes, and that study failed or was refused: the resend (intact, or with a fixed header) is
        a new, queued study; it takes over the SOP Instance UID and the old study's error notes
        "superseded by study N", in this same transaction;
      - different bytes otherwise (a re-encoded resend of a queued or scored instance): a duplicate.
    - Any other file byte-identical to an earlier original (including failed ones): a duplicate of it.

    Only the study in force holds the SOP Instance UID: the unique index on it turns two ingesters racing on
    one instance into an IntegrityError for the second, which then retries and finds the first.
    """
    fields = _fit_identity(identity)
    sop = fields.pop("sop_instance_uid")
    study = Study(source_name=source_name, sha256=sha256, size_bytes=size_bytes, stored_path=stored_path,
                  received_at=received_at or utcnow(), status=Status.QUEUED, **fields)
    if failure is not None:
        study.status, study.error = Status.FAILED, failure
        session.add(study)
        session.flush()
        return study
    # The SOP Instance UID first: a resend may be re-encoded (another transfer syntax), so its bytes differ.
    holder = find_by_sop(session, sop_instance_uid=sop) if sop else None
    first = superseded = None
    if holder is not None and holder.sha256 != sha256 and holder.status not in _SUPERSEDABLE:
        first = holder
        study.error = f"the same DICOM instance (SOP Instance UID {sop}) as study {holder.id}, received again"
    else:
        first = holder if holder is not None and holder.sha256 == sha256 else session.execute(
            _ORIGINAL_BY_SHA, {"b_sha": sha256}).first()
        if first is not None:
            study.error = f"byte-identical duplicate of study {first.id} ({first.source_name})"
        elif holder is not None:  # new bytes for a failed or refused instance: evaluated again
            superseded = holder
            superseded.sop_instance_uid = None
            session.flush()  # the UID is released before the resend's row takes it (unique index)
    if first is not None:
        study.status = Status.DUPLICATE
        study.duplicate_of_id = first.id
    else:
        study.sop_instance_uid = sop
    session.add(study)
    session.flush()
    if superseded is not None:
        superseded.error = f"{superseded.error or superseded.status}; superseded by study {study.id}"
    return study


def get_study(session: Session, *, study_id: int) -> Study | None:
    """Returns a study by id."""
    return session.get(Study, study_id)


def mark_enqueued(session: Session, *, study_ids: list[int]) -> None:
    """Records that a scoring task was sent for the studies (one message may name several)."""
    session.execute(update(Study).where(Study.id.in_(study_ids))
                    .values(enqueued_at=utcnow(), enqueue_count=Study.enqueue_count + 1))


def claim_study(session: Session, *, study_id: int, worker: str, max_claims: int | None = None) -> str | None:
    """Takes a non-terminal study for processing and returns a claim token (None if already finished, or if it
    already holds `max_claims` claims without a result: see `exhausted_claims`).

    A later claim supersedes an earlier one (a redelivered task after a worker died), and only the
    holder of the latest token can store results, so a study is never scored twice. Each claim adds one to
    claim_count; a claim that ends without a result and is not released means its worker died holding it.
    """
    token = str(uuid.uuid4())
    cond = [Study.id == study_id, Study.status.in_([Status.QUEUED, Status.PROCESSING])]
    if max_claims is not None:
        cond.append(Study.claim_count < max_claims)
    result = session.execute(update(Study).where(*cond).values(
        status=Status.PROCESSING, claim_token=token, started_at=utcnow(), worker=worker,
        claim_count=Study.claim_count + 1))
    return token if result.rowcount == 1 else None


# A burst claims companions on every pass: its statements are built once. Building them per call (an ORM update per
# study, with its own cache key and session sync) cost a pool process about 2.4 ms of CPU per film on a 2-core
# server, as much as the rest of the pass's database work.
_CANDIDATES = (select(_STUDIES.c.id)
               .where(_STUDIES.c.status == Status.QUEUED, _STUDIES.c.claim_count == 0,
                      _STUDIES.c.id.not_in(bindparam("b_exclude", expanding=True)))
               .order_by(_STUDIES.c.id).limit(bindparam("b_limit")).with_for_update(skip_locked=True))
_TAKE = (update(_STUDIES)
         .where(_STUDIES.c.id == bindparam("b_id"), _STUDIES.c.status == Status.QUEUED, _STUDIES.c.claim_count == 0)
         .values(status=Status.PROCESSING, claim_token=bindparam("b_token"), started_at=bindparam("b_now"),
                 worker=bindparam("b_worker"), claim_count=1))
_FRESH_QUEUED = select(func.count()).select_from(_STUDIES).where(_STUDIES.c.status == Status.QUEUED,
                                                                  _STUDIES.c.claim_count == 0)
_CLAIM_DETAILS = select(_STUDIES.c.id, _STUDIES.c.stored_path, _STUDIES.c.source_name,
                        _STUDIES.c.guard_override_by).where(_STUDIES.c.id.in_(bindparam("b_ids", expanding=True)))


def claim_companions(session: Session, *, worker: str, limit: int, exclude: list[int]) -> list[tuple[int, str]]:
    """Claims up to `limit` more queued studies, oldest first, to score in the same forward pass as a
    delivered one (a burst fills a batch instead of waiting for one task per study); returns (id, token) pairs.

    Only fresh studies are taken (never claimed before: a film that may have killed a worker is scored on its
    own). Each is taken by an UPDATE conditional on status 'queued' and no earlier claim, so two workers never win
    the same study; on Postgres the candidates are read FOR UPDATE SKIP LOCKED so concurrent workers pick disjoint
    ones. Their own messages arrive later and find them finished (or held by a live worker) and skip.
    """
    if limit <= 0:
        return []
    candidates = session.scalars(_CANDIDATES, {"b_exclude": list(exclude), "b_limit": limit}).all()
    taken, now = [], utcnow()
    for sid in candidates:
        values = {"status": Status.PROCESSING, "claim_token": str(uuid.uuid4()), "started_at": now,
                  "worker": worker, "claim_count": 1}
        if session.execute(_TAKE, {"b_id": sid, "b_token": values["claim_token"], "b_now": now,
                                   "b_worker": worker}).rowcount == 1:
            taken.append((sid, values["claim_token"]))
            _sync_loaded(session, sid, values)
    return taken


def _sync_loaded(session: Session, study_id: int, values: dict) -> None:
    """Gives a study object loaded in this session the values a table-level UPDATE just stored (as an ORM update
    does), so the caller reads them, even once its session is closed."""
    if (loaded := session.identity_map.get(identity_key(Study, study_id))) is not None:
        for name, value in values.items():
            set_committed_value(loaded, name, value)


def fresh_queued_count(session: Session) -> int:
    """How many queued studies were never claimed: what a burst still holds for companion claims."""
    return session.scalar(_FRESH_QUEUED) or 0


def claim_details(session: Session, *, study_ids: list[int]) -> dict[int, tuple[str, str, str | None]]:
    """Returns {study id: (stored_path, source_name, guard_override_by)}: what scoring a claimed study needs of its
    row, in one query (not whole objects)."""
    if not study_ids:
        return {}
    return {sid: (path, name, override) for sid, path, name, override
            in session.execute(_CLAIM_DETAILS, {"b_ids": list(study_ids)})}


def release_claims(session: Session, *, worker: str) -> int:
    """Gives back every claim `worker` (one pool process, which runs one task at a time) holds without a result,
    after an orderly failure (an exception, not a death): the studies are queued again and the claim is not
    counted, so a retried task is not taken for a poison file. Returns how many were released."""
    return session.execute(update(Study).where(
        Study.status == Status.PROCESSING, Study.worker == worker, Study.claim_count > 0).values(
        status=Status.QUEUED, claim_token=None, claim_count=Study.claim_count - 1)).rowcount


def unfinished_claim_counts(session: Session, *, study_ids: list[int]) -> dict[int, int]:
    """Returns {study id: claim_count} for the given studies that are still queued or processing."""
    return dict(session.execute(select(Study.id, Study.claim_count).where(
        Study.id.in_(study_ids), Study.status.in_([Status.QUEUED, Status.PROCESSING]))).all())


def exhausted_claims(session: Session, *, study_id: int, max_claims: int) -> Study | None:
    """Returns the study if it is still unfinished after `max_claims` claims (a poison file), else None."""
    study = session.get(Study, study_id)
    if study is None or study.status not in (Status.QUEUED, Status.PROCESSING) or study.claim_count < max_claims:
        return None
    return study


def save_score(session: Session, **result) -> bool:
    """Stores one result (save_scores' keys as keywords) if the claim is still held; returns False if another
    claim took over."""
    return bool(save_scores(session, [result]))


# Stores one result if its claim still holds: built once, so a pass stores its films with one compiled statement
# (an ORM update per film, with its own cache key and session sync, cost a pool process about a millisecond of
# CPU per film on a 2-core server). The SET clause is the columns of the parameters given (_stored_values).
_STORE = (update(_STUDIES)
          .where(_STUDIES.c.id == bindparam("b_id"), _STUDIES.c.claim_token == bindparam("b_token"),
                 _STUDIES.c.status == Status.PROCESSING))


def _stored_values(r: dict, now: dt.datetime) -> dict:
    """The columns a stored result sets (the scoring-time fields keep what was in force, the live ones follow
    recalibrations later)."""
    flagged = bool(r["score"] >= r["threshold"])
    return dict(status=Status.SCORED, error=None, scored_at=now, logit=r["logit"], model_version=r["model_version"],
                scored_score=r["score"], scored_threshold=r["threshold"], scored_flagged=flagged,
                scored_calibration_version=r["calibration_version"], score=r["score"], threshold=r["threshold"],
                flagged=flagged, calibration_version=r["calibration_version"], width=r["width"], height=r["height"],
                heatmap_path=r["heatmap_path"], timings=r["timings"])


def save_scores(session: Session, results: list[dict]) -> list[int]:
    """Stores a forward pass's results in the caller's transaction, each only if its claim is still held; returns
    the ids stored. Each result holds study_id, token, logit, model_version, score, threshold,
    calibration_version, width, height, heatmap_path and timings. One worklist refresh covers them all."""
    stored = []
    now = utcnow()
    for r in results:
        values = _stored_values(r, now)
        if session.execute(_STORE, {"b_id": r["study_id"], "b_token": r["token"], **values}).rowcount == 1:
            stored.append(r["study_id"])
            _sync_loaded(session, r["study_id"], values)
    if stored:
        worklist_rows.refresh(session, study_ids=stored)  # they are unread now: onto the worklist
    return stored


def mark_failed(session: Session, *, study_id: int, reason: str, token: str | None = None,
                stored_path: str | None = None) -> bool:
    """Ends a study as failed with a human-readable reason (and, when moved, its quarantine path)."""
    cond = [Study.id == study_id, Study.status.in_([Status.QUEUED, Status.PROCESSING])]
    if token is not None:
        cond.append(Study.claim_token == token)
    values = {"status": Status.FAILED, "error": reason, "scored_at": None}
    if stored_path is not None:
        values["stored_path"] = stored_path
    return session.execute(update(Study).where(*cond).values(**values)).rowcount == 1


def mark_refused(session: Session, *, study_id: int, reason: str, token: str | None = None) -> bool:
    """Ends a study as refused by the guard: listed with the reason, kept in the archive, never scored."""
    cond = [Study.id == study_id, Study.status.in_([Status.QUEUED, Status.PROCESSING])]
    if token is not None:
        cond.append(Study.claim_token == token)
    values = {"status": Status.REFUSED, "error": reason, "scored_at": None}
    return session.execute(update(Study).where(*cond).values(**values)).rowcount == 1


def record_feedback(session: Session, *, study_id: int, finding: str, comment: str | None,
                    reviewer: str) -> Study:
    """Records the clinician's finding and, for a pneumonia/normal label, derives TP/FP/TN/FN against the flag
    in force at scoring (the other findings have no outcome)."""
    if finding not in FINDINGS:
        raise ValueError(f"finding must be one of {FINDINGS}")
    study = session.get(Study, study_id)
    if study is None:
        raise LookupError(f"study {study_id} not found")
    study.finding = finding
    study.finding_comment = (comment or "").strip() or None
    study.reviewer = reviewer
    study.feedback_at = utcnow()
    if study.scored_flagged is None or finding not in LABELS:
        study.outcome = None
    else:
        positive = finding == "pneumonia"
        study.outcome = ("T" if study.scored_flagged == positive else "F") + ("P" if study.scored_flagged else "N")
    worklist_rows.refresh(session, study_ids=[study.id])  # from the unread rows to the read ones
    return study


def images_of(session: Session, *, studies: list[Study]) -> dict[int, list[Study]]:
    """Returns, in one query, the images of each study's DICOM study (same patient and Study Instance UID, no
    duplicates, oldest first) by study id; a PNG/JPEG film or a duplicate is its only image.

    The patient is part of the key because senders reuse UIDs: two patients under one UID stay apart.
    """
    uids = {s.study_instance_uid for s in studies if s.study_instance_uid and s.status != Status.DUPLICATE}
    by_key: dict[str, list[Study]] = {}
    if uids:  # bounded by the caller's page of studies, so the IN list stays small
        for image in session.scalars(select(Study).where(Study.study_instance_uid.in_(uids),
                                                         Study.status != Status.DUPLICATE).order_by(Study.id)):
            by_key.setdefault(worklist_rows.key_of(image), []).append(image)
    out = {}
    for s in studies:
        group = by_key.get(worklist_rows.key_of(s)) if s.status != Status.DUPLICATE else None
        out[s.id] = group or [s]
    return out


def group_images(session: Session, *, study_id: int) -> list[Study]:
    """Returns the images of a study's DICOM study (same patient and Study Instance UID, no duplicates), else
    the study alone."""
    study = session.get(Study, study_id)
    return images_of(session, studies=[study])[study_id] if study is not None else []


def record_study_feedback(session: Session, *, study_id: int, finding: str, comment: str | None,
                          reviewer: str) -> list[Study]:
    """Records the finding for a worklist row: on every scored image of a DICOM study (of the same patient),
    else on the study itself.

    A reader reads the study, not one image, so each scored image gets the same finding and keeps its own
    logit; the feedback export (the recalibration input) thus has one row per scored image.
    """
    images = group_images(session, study_id=study_id)
    if not images:
        raise LookupError(f"study {study_id} not found")
    targets = [s for s in images if s.status == Status.SCORED] or [s for s in images if s.id == study_id]
    return [record_feedback(session, study_id=s.id, finding=finding, comment=comment, reviewer=reviewer)
            for s in targets]


# --- workers --------------------------------------------------------------------------------------


def heartbeat(session: Session, *, name: str, model_version: str | None, device: str | None) -> None:
    """Records that a worker is alive with a loaded model."""
    hb = session.get(WorkerHeartbeat, name)
    if hb is None:
        session.add(WorkerHeartbeat(name=name, model_version=model_version, device=device))
    else:
        hb.model_version, hb.device, hb.last_seen = model_version, device, utcnow()
    session.flush()


def live_workers(session: Session, *, within_seconds: int) -> list[WorkerHeartbeat]:
    """Returns workers seen recently."""
    cutoff = utcnow() - dt.timedelta(seconds=within_seconds)
    return list(session.scalars(select(WorkerHeartbeat).where(WorkerHeartbeat.last_seen >= cutoff)))
