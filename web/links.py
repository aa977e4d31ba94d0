"""Where a study's film and heat-map are served, and when each exists: one rule for the API and the pages.

web.schemas puts these URLs in the JSON; the templates call the same functions (Jinja globals).
"""
from __future__ import annotations

from core.models import Status, Study


def film_url(study: Study) -> str | None:
    """The film's URL; None for a failed study, whose bytes are kept in quarantine and never served."""
    return f"/studies/{study.id}/image" if study.status != Status.FAILED else None


def heatmap_url(study: Study) -> str | None:
    """The Grad-CAM heat-map's URL; only a scored study that has one stored."""
    return f"/studies/{study.id}/heatmap.png" if study.status == Status.SCORED and study.heatmap_path else None
