"""The worklist's sections, named once: which exist, their order, which page lists them, and how each is shown.

core.worklist pages them, web.api validates and lists them, web.pages groups them by view, and the templates
read their titles, help, columns and empty-list text from here (the Jinja global `worklist_sections`), so
renaming or adding a section is one edit. Every study is in exactly one section (`SECTIONS`).
"""
from __future__ import annotations

from dataclasses import dataclass

UNREAD = "unread"
IN_PROGRESS = "in_progress"
REFUSED = "refused"
FAILED = "failed"
DUPLICATES = "duplicates"
READ = "read"
# Search and filter results are listed in a table of their own; it is not a section (studies are not in it).
SEARCH = "search"

SECTIONS = (UNREAD, IN_PROGRESS, REFUSED, FAILED, DUPLICATES, READ)  # the API's listing order
GROUPED_SECTIONS = (UNREAD, READ)  # one row per DICOM study, materialised in worklist_rows
# The web pages ("views") and the sections each shows, in page order.
VIEW_SECTIONS = {UNREAD: (UNREAD, IN_PROGRESS, REFUSED, FAILED, DUPLICATES), READ: (READ,)}


@dataclass(frozen=True)
class Shown:
    """How a section's table is shown: heading, help line ("{wait}" is the overdue limit), columns, empty text."""

    title: str
    help: str
    columns: tuple[str, ...]
    empty: str

    def help_line(self, max_wait_minutes: int) -> str:
        """The help line with the overdue limit filled in ("1 minute", "15 minutes")."""
        return self.help.replace("{wait}", f"{max_wait_minutes} minute" + ("" if max_wait_minutes == 1 else "s"))


SHOWN = {
    UNREAD: Shown(
        "To read",
        "Flagged studies (score at or above the threshold) first, by score; then studies waiting longer than "
        "{wait} (OVERDUE), longest waiting first; then the rest by score. Equal scores: oldest first. "
        "The images of one DICOM study are one row; its risk is the highest score of its frontal images.",
        ("#", "Priority", "Risk score", "Study", "Accession", "Patient ID", "Received", "Waiting"),
        "No scored studies waiting to be read."),
    IN_PROGRESS: Shown(
        "In progress", "Received and waiting for, or being scored by, a worker. Oldest first.",
        ("Study", "Status", "Received", "Waiting"), "Nothing queued or being scored."),
    REFUSED: Shown(
        "Not scored (refused)",
        "Films the model was not built for (not CR/DX, not chest, lateral views), with the reason. Read them in "
        "the PACS; they are kept in the archive and never scored. Newest first.",
        ("Study", "Accession", "Patient ID", "Reason not scored", "Received"), "No films refused."),
    FAILED: Shown(
        "Failed", "Files that could not be scored, with the reason. The bytes are kept in quarantine. Newest first.",
        ("Study", "Accession", "Patient ID", "Reason", "Received"), "No failed studies."),
    DUPLICATES: Shown(
        "Duplicates",
        "Byte-identical copies of an earlier study, or a DICOM instance received again; not scored twice. "
        "Newest first.",
        ("Study", "Duplicate of", "Received"), "No duplicate files received."),
    READ: Shown(
        "Read studies",
        "Studies with a recorded finding; the outcome compares it with the flag in force when the study was scored.",
        ("Study", "Accession", "Patient ID", "Risk score", "Flag at scoring", "Finding", "Outcome", "Reviewer",
         "Read at", "Time to read"),
        "No findings recorded yet."),
    SEARCH: Shown(
        "Search results", "",
        ("Study", "Status", "Accession", "Patient ID", "Risk score", "Finding", "Received"),
        "No study has that accession number, patient ID, file name or study number."),
}

