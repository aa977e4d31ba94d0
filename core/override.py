"""An admin's "score anyway": one study the OOD guard refused is queued again with the guard bypassed."""
from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.orm import Session

from core import audit
from core.ml.ood import REFUSAL_PREFIX
from core.models import Status, Study


class OverrideError(ValueError):
    """Raised when a study cannot be scored anyway (unknown, not refused, or refused by the DICOM header)."""


def is_guard_refusal(study: Study) -> bool:
    """Tells whether a study was refused by the pixel-level OOD guard (the only refusal an admin may lift).

    Header refusals (CT, lateral, non-chest DICOM) stay: the header says what the film is, and the loader
    refuses such a file again whatever the flag says.
    """
    return study.status == Status.REFUSED and bool(study.error) and study.error.startswith(REFUSAL_PREFIX)


def score_anyway(session: Session, *, study_id: int, actor: str, role: str | None = None,
                 client: str | None = None) -> Study:
    """Re-queues a guard-refused study for scoring with the guard bypassed for it alone, and audits it.

    The caller commits and then enqueues the study (a lost message is re-sent by the ingester's sweep, since
    the study is queued with no enqueue time).
    """
    study = session.get(Study, study_id)
    if study is None:
        raise OverrideError(f"there is no study {study_id}")
    if not is_guard_refusal(study):
        raise OverrideError(f"study {study_id} is not a film refused by the out-of-distribution guard "
                            f"(status {study.status})")
    reason = study.error
    # Conditional on still being refused, so two admins clicking at once re-queue it once.
    done = session.execute(update(Study).where(Study.id == study_id, Study.status == Status.REFUSED).values(
        status=Status.QUEUED, error=None, guard_override_by=actor[:255], claim_token=None, claim_count=0,
        enqueued_at=None, started_at=None)).rowcount == 1
    if not done:
        raise OverrideError(f"study {study_id} changed meanwhile; reload the page")
    audit.record(session, actor=actor, role=role, client=client, action=audit.GUARD_OVERRIDDEN, study_id=study_id,
                 refusal=reason)
    session.refresh(study)
    return study
