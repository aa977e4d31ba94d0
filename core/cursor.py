"""Opaque keyset cursors for paged lists: where the previous page ended, not how many rows it skipped.

A cursor names the list section, the unread tier it stopped in, the sort key of its last row, how many rows
came before the next one, and (for the unread list) the overdue cut-off the first page used: "overdue"
depends on the clock, so a list that kept moving its tier boundary while being paged could skip or repeat
rows. Keeping the first page's cut-off makes every page of one listing use the same order.
"""
from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from dataclasses import dataclass

from core.worklist_sections import DUPLICATES, FAILED, IN_PROGRESS, READ, REFUSED, SEARCH, UNREAD

_D, _F, _I = "datetime", "float", "int"
# The sort key of each list, per unread tier (None for the lists without tiers).
KEY_TYPES: dict[tuple[str, int | None], tuple[str, ...]] = {
    (UNREAD, 0): (_F, _D, _I), (UNREAD, 1): (_D, _F, _I), (UNREAD, 2): (_F, _D, _I),
    (READ, None): (_D, _I), (IN_PROGRESS, None): (_D, _I), (REFUSED, None): (_D, _I),
    (FAILED, None): (_D, _I), (DUPLICATES, None): (_D, _I), (SEARCH, None): (_I,),
    # Filtered listings (core.worklist_filter), one per sort; they keep the overdue cut-off like unread.
    ("filter-risk", None): (_F, _I), ("filter-oldest", None): (_D, _I), ("filter-newest", None): (_D, _I),
}
_KEEPS_CUTOFF = (UNREAD, "filter-risk", "filter-oldest", "filter-newest")


class BadCursor(ValueError):
    """Raised for a cursor that this server did not make (or that was cut or altered)."""


@dataclass(frozen=True)
class Cursor:
    """Where the next page of a list starts."""

    section: str
    key: tuple
    tier: int | None = None
    offset: int = 0  # rows before the next page, for numbering
    cutoff: dt.datetime | None = None  # the overdue boundary of the listing (unread only)

    def encode(self) -> str:
        """Returns the cursor as URL-safe text."""
        key = [v.isoformat() if isinstance(v, dt.datetime) else v for v in self.key]
        data = {"s": self.section, "t": self.tier, "k": key, "n": self.offset,
                "c": self.cutoff.isoformat() if self.cutoff else None}
        return base64.urlsafe_b64encode(json.dumps(data, separators=(",", ":")).encode()).decode().rstrip("=")


def start_of(section: str) -> Cursor:
    """Returns the cursor of a section's first page."""
    return Cursor(section, ())


def _datetime(value) -> dt.datetime:
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("naive time")
    return parsed


def decode(text: str, *, section: str | None = None) -> Cursor:
    """Parses a cursor made by Cursor.encode; raises BadCursor with the reason otherwise."""
    try:
        data = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
        name, tier, raw, offset = data["s"], data["t"], data["k"], data["n"]
        # An empty key is the start of a section (a listing of several sections moving on to the next one).
        types = KEY_TYPES[(name, tier)] if raw else ()
        if name not in {n for n, _ in KEY_TYPES} or (not raw and tier is not None):
            raise ValueError("unknown list")
        if len(raw) != len(types) or not isinstance(offset, int) or offset < 0:
            raise ValueError("wrong shape")
        key = []
        for kind, value in zip(types, raw):
            if kind == _D:
                key.append(_datetime(value))
            elif kind == _F and isinstance(value, (int, float)) and not isinstance(value, bool):
                key.append(float(value))
            elif kind == _I and isinstance(value, int) and not isinstance(value, bool):
                key.append(value)
            else:
                raise ValueError("wrong type")
        cutoff = _datetime(data["c"]) if name in _KEEPS_CUTOFF and raw else None
    except (KeyError, TypeError, ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadCursor(f"invalid page cursor ({exc.__class__.__name__}); start again from the first page") from None
    if section is not None and name != section:
        raise BadCursor(f"this cursor pages the {name!r} list, not {section!r}")
    return Cursor(name, tuple(key), tier, offset, cutoff)
