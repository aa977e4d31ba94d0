"""The refusals and limits every film reader shares, so imaging and dicom both import them from here."""
from __future__ import annotations

MIN_SIDE = 64
DEFAULT_MAX_FILE_BYTES = 100_000_000  # core.settings.max_file_bytes; callers with settings pass theirs


class ImageRejected(ValueError):
    """Raised when a file cannot be scored; the message is shown to users as the failure reason."""


class FilmRefused(ImageRejected):
    """Raised by the guard: a readable film the model was not built for (listed as refused, not quarantined)."""


def over_limit(size: int, max_bytes: int) -> str:
    """The reason given for a file over the byte cap (one wording for every reader)."""
    return f"file is {size:,} bytes, over the limit of {max_bytes:,}"
