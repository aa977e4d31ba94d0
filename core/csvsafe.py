"""Spreadsheet-safe CSV cells, shared by every export (the audit trail and feedback.csv).

Spreadsheets evaluate a cell that starts with =, +, -, @ (and, in some, a leading TAB or CR) as a formula,
so attacker-typed text (a login name, a finding comment) could run `=HYPERLINK(...)` on an admin's desk.
"""
from __future__ import annotations

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: object) -> object:
    """Returns value as a CSV cell that no spreadsheet runs as a formula.

    Numbers (int, float) pass through unchanged, so a negative logit stays a number that readers can parse;
    None becomes an empty cell; any other value is written as text, prefixed with ' when it would start
    a formula.
    """
    if value is None:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    text = str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text
