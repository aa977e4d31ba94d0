"""Recording a clinician's finding on a worklist row, with its audit rows (keyword-only, no commits)."""
from __future__ import annotations

from sqlalchemy.orm import Session

from core import audit
from core import repository as repo
from core.models import Study


def record_finding(session: Session, *, study_id: int, finding: str, comment: str | None, actor: str,
                   actor_role: str | None, client: str | None) -> list[Study]:
    """Records `actor`'s finding on the study's worklist row (each scored image of a DICOM study) and audits
    it per image, as recorded or as changed from the old value. `client` is the caller's address as text.
    Returns the images the finding was stored on."""
    old = {s.id: s.finding for s in repo.group_images(session, study_id=study_id)}
    images = repo.record_study_feedback(session, study_id=study_id, finding=finding, comment=comment,
                                        reviewer=actor)
    for image in images:
        audit.record_finding(session, actor=actor, role=actor_role, client=client, study_id=image.id,
                             old=old.get(image.id), new=finding)
    return images
