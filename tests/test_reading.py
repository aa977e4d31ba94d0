"""The reading flow's server side: record a finding and go on to the next unread study, search,
filters and sorts of the worklist, the threshold preview and confirmations (real app, real DB, real films)."""
from __future__ import annotations

import datetime as dt
import re

import pytest

from core import auth, calibrations
from core import repository as repo
from core.db import session_scope
from core.worklist_filter import SORTS, Filters, filtered
from tests.test_web import (add_user, admin_client, client, post_form, row_ids, site,  # noqa: F401 (fixtures)
                            site_template)


def test_record_and_next_goes_to_the_first_unread_study_in_triage_order(client, site):  # noqa: F811
    order = row_ids(client.get("/").text, "unread")
    assert order[0] == site.flagged
    r = post_form(client, f"/studies/{site.flagged}/feedback", {"finding": "pneumonia", "then": "next"},
                  follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, f"/studies/{order[1]}?after={site.flagged}")
    page = client.get(r.headers["location"])
    assert f"Finding recorded on study #{site.flagged}" in page.text
    # Without `then`, the form stays on the study, as before.
    r = post_form(client, f"/studies/{order[1]}/feedback", {"finding": "normal"}, follow_redirects=False)
    assert r.headers["location"] == f"/studies/{order[1]}?saved=1#feedback"
    for study_id in order[2:]:
        r = post_form(client, f"/studies/{study_id}/feedback", {"finding": "normal", "then": "next"},
                      follow_redirects=False)
    # The last one: nothing unread is left, so the worklist says so.
    assert r.headers["location"] == f"/?after={order[-1]}"
    assert "No unread studies are left" in client.get(r.headers["location"]).text
    with session_scope(site.settings.database_url) as s:
        assert repo.get_study(s, study_id=site.flagged).finding == "pneumonia"
        assert {repo.get_study(s, study_id=i).finding for i in order[1:]} == {"normal"}
    bad = post_form(client, f"/studies/{site.flagged}/feedback", {"finding": "normal", "then": "elsewhere"})
    assert bad.status_code == 422


def test_search_filters_and_sorts_are_server_side_and_keep_the_triage_order_reachable(client, site):  # noqa: F811
    triage = row_ids(client.get("/").text, "unread")
    with session_scope(site.settings.database_url) as s:
        studies = {i: repo.get_study(s, study_id=i) for i in triage}
    by_risk = sorted(triage, key=lambda i: (-studies[i].score, i))
    by_arrival = sorted(triage, key=lambda i: (studies[i].received_at, i))
    assert triage != by_risk  # the overdue study is lifted above the routine ones in triage order

    # Search by exact file name (and study number); a listing always offers the way back to triage order.
    page = client.get("/", params={"q": studies[site.flagged].source_name})
    assert site.flagged in row_ids(page.text, "search") and 'id="back-to-triage"' in page.text
    assert row_ids(client.get("/", params={"q": f"#{site.overdue}"}).text, "search") == [site.overdue]
    assert 'id="back-to-triage"' not in client.get("/").text

    def listed(**params) -> list[int]:
        r = client.get("/", params=params)
        assert r.status_code == 200, r.text
        return row_ids(r.text, "read" if params.get("finding") == "recorded" else "unread")

    assert listed(flagged="1") == [site.flagged]
    assert listed(overdue="1") == [site.overdue]
    assert listed(sort="risk") == by_risk
    assert listed(sort="oldest") == by_arrival
    assert listed(sort="newest") == by_arrival[::-1]
    assert listed(modality="DX") == []  # no DICOM films here
    tomorrow = (dt.date.today() + dt.timedelta(days=2)).isoformat()
    assert listed(**{"from": tomorrow}) == [] and listed(to=tomorrow) == by_risk
    for bad in ({"modality": "XX"}, {"sort": "name"}, {"from": "2026-13-01"}, {"from": tomorrow, "to": "2000-01-01"}):
        assert client.get("/", params=bad).status_code == 422
    # The poll of a filtered page sends the filtered list, not the triage sections.
    fragment = client.get("/fragments/worklist", params={"flagged": "1"}, headers={"HX-Request": "true"})
    assert row_ids(fragment.text, "unread") == [site.flagged] and "body-failed" not in fragment.text
    post_form(client, f"/studies/{site.flagged}/feedback", {"finding": "pneumonia"})
    assert listed(finding="recorded") == [site.flagged]
    assert site.flagged not in listed(sort="risk")


def test_filtered_listing_pages_with_cursors(site):  # noqa: F811
    with session_scope(site.settings.database_url) as s:
        for sort in SORTS:
            whole = filtered(s, filters=Filters(sort=sort), max_wait_minutes=60, limit=100)
            seen, cursor = [], None
            while True:
                page = filtered(s, filters=Filters(sort=sort), max_wait_minutes=60, limit=1, cursor=cursor)
                assert page.total == whole.total and page.offset == len(seen)
                seen += [e.study.id for e in page.entries]
                cursor = page.next_cursor
                if cursor is None:
                    break
            assert seen == [e.study.id for e in whole.entries] and len(seen) == whole.total >= 3


def test_threshold_change_previews_counts_and_rates_then_asks_to_confirm(admin_client, client, site):  # noqa: F811
    with session_scope(site.settings.database_url) as s:
        scores = sorted((repo.get_study(s, study_id=i).score for i in site.scored), reverse=True)
        before = calibrations.active(s)
    post_form(client, f"/studies/{site.flagged}/feedback", {"finding": "pneumonia"})
    post_form(client, f"/studies/{site.scored[1]}/feedback", {"finding": "normal"})
    page = admin_client.get("/admin/calibrations").text
    assert f'value="{before.threshold:.4f}"' in page  # the field shows a rounded value
    assert 'novalidate' in page
    # A threshold just under the second-highest score: one more unread study would be flagged.
    new = round(scores[1] - 1e-4, 4)
    r = post_form(admin_client, "/admin/calibrations/threshold", {"threshold": str(new)})
    assert r.status_code == 200
    newly = re.search(r'id="preview-newly-flagged">(\d+)<', r.text).group(1)
    with session_scope(site.settings.database_url) as s:
        unread = [repo.get_study(s, study_id=i) for i in site.scored + [site.overdue] if
                  repo.get_study(s, study_id=i).finding is None]
        assert int(newly) == sum(1 for st in unread if not st.flagged and st.score >= new)
        assert calibrations.active(s).version == before.version  # nothing changed yet
    # The recorded pneumonia (flagged) and normal (scored[1], now at or above the new threshold).
    assert re.search(r'id="preview-sensitivity">100\.0 %<', r.text)
    assert re.search(r'id="preview-specificity">0\.0 %<', r.text)
    assert 'id="threshold-confirm"' in r.text
    r = post_form(admin_client, "/admin/calibrations/threshold", {"threshold": str(new), "confirm": "yes"},
                  follow_redirects=False)
    assert r.status_code == 303
    with session_scope(site.settings.database_url) as s:
        assert calibrations.active(s).threshold == new
    bad = post_form(admin_client, "/admin/calibrations/threshold", {"threshold": "1.5"})
    assert bad.status_code == 422 and 'aria-invalid="true"' in bad.text and 'id="admin-error"' in bad.text


def test_disabling_a_user_asks_to_confirm(admin_client, site):  # noqa: F811
    add_user(site.settings, "zed", "nurse")
    r = post_form(admin_client, "/admin/users/zed/disable", {})
    assert r.status_code == 200 and 'id="confirm-disable"' in r.text
    with session_scope(site.settings.database_url) as s:
        assert not auth.get_user(s, name="zed").disabled
    r = post_form(admin_client, "/admin/users/zed/disable", {"confirm": "yes"}, follow_redirects=False)
    assert r.status_code == 303
    with session_scope(site.settings.database_url) as s:
        assert auth.get_user(s, name="zed").disabled


def test_comparisons_show_enough_digits_and_times_carry_their_zone():
    from web.templating import compare_digits, when

    assert compare_digits(0.99996, 0.99999) == 5  # "1.000 < 1.000" otherwise
    assert compare_digits(0.5, 0.5) == 3 and compare_digits(0.1234, 0.5678) == 3
    assert compare_digits(0.4, 0.4 + 1e-12) == 10
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc)
    html = str(when(moment))
    assert html.startswith('<time class="local-time" datetime="') and html.endswith("</time>")
    assert dt.datetime.fromisoformat(re.search(r'datetime="([^"]+)"', html).group(1)) == moment


def test_other_findings_are_recorded_but_never_labels(client, admin_client, site, tmp_path):  # noqa: F811
    from core import cohort, monitoring
    from core.feedback import FeedbackFormatError, read_feedback_csv

    ranked = site.scored
    post_form(client, f"/studies/{ranked[0]}/feedback", {"finding": "pneumonia"})
    r = post_form(client, f"/studies/{ranked[1]}/feedback", {"finding": "poor quality", "comment": "rotated"},
                  follow_redirects=False)
    assert r.status_code == 303
    api = client.post(f"/api/studies/{ranked[2]}/feedback", json={"finding": "indeterminate"},
                      headers={"X-CSRF-Token": re.search(r'name="csrf-token" content="([^"]+)"',
                                                         client.get("/").text).group(1)})
    assert api.status_code == 200 and api.json()["outcome"] is None
    with session_scope(site.settings.database_url) as s:
        other = repo.get_study(s, study_id=ranked[1])
        assert (other.finding, other.outcome) == ("poor quality", None)
        model = other.model_version
        # Monitoring and the recalibration cohort see the one label only.
        z, y = monitoring.reviewed_cases(s, model_version=model, last=100)
        assert list(y) == [1] and len(z) == 1
        assert list(cohort.reviewed(s, window=cohort.Window(last=100)).labels) == [1]
    read = row_ids(client.get("/?view=read").text, "read")
    assert set(read) == {ranked[0], ranked[1], ranked[2]}  # all three are read
    # The export has every finding; the recalibration reader counts the other ones apart.
    csv_text = admin_client.get("/api/feedback.csv").text
    assert "poor quality" in csv_text and "indeterminate" in csv_text
    path = tmp_path / "feedback.csv"
    path.write_text(csv_text)
    excluded: dict[str, int] = {}
    logits, labels, _ = read_feedback_csv(path, excluded=excluded)
    assert labels == [1] and excluded == {"indeterminate": 1, "poor quality": 1}
    path.write_text(csv_text.replace("poor quality", "maybe"))
    with pytest.raises(FeedbackFormatError, match="'maybe'"):
        read_feedback_csv(path)


def test_soft_reading_marks_show_to_others_expire_and_never_block(client, site):  # noqa: F811
    from fastapi.testclient import TestClient

    from core import reading
    from tests.test_web import sign_in
    from web.app import create_app

    add_user(site.settings, "nina", "nurse")
    with TestClient(create_app(site.settings)) as nurse:
        sign_in(nurse, "nina")
        assert "Open by" not in nurse.get("/").text
        assert client.get(f"/studies/{site.flagged}").status_code == 200  # the doctor opens the study
        row = re.search(rf'<tr[^>]*data-study-id="{site.flagged}".*?</tr>', nurse.get("/").text, re.S).group(0)
        assert "Open by grey for under a minute" in re.sub(r"<[^>]+>", "", row)
        page = nurse.get(f"/studies/{site.flagged}").text
        assert "Also open by grey" in page
        # The doctor does not see their own mark; the nurse's opening shows to the doctor.
        assert "Also open by nina" in client.get(f"/studies/{site.flagged}/reading").text
        assert "Open by grey" not in client.get("/").text
        # Never a lock: the nurse's mark does not stop the doctor recording the finding.
        r = post_form(client, f"/studies/{site.flagged}/feedback", {"finding": "normal"}, follow_redirects=False)
        assert r.status_code == 303
    with session_scope(site.settings.database_url) as s:
        grey = auth.get_user(s, name="grey")
        later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=site.settings.reading_claim_seconds + 1)
        assert reading.readers(s, study_ids=[site.flagged], expire_seconds=site.settings.reading_claim_seconds,
                               now=later) == {}  # expired: nobody shows
        # Refreshed after expiring, a mark starts its time afresh; while fresh it keeps it.
        reading.mark_open(s, study_id=site.flagged, user_id=grey.id, user_name="grey",
                          expire_seconds=site.settings.reading_claim_seconds, now=later)
        five = later + dt.timedelta(minutes=1, seconds=30)
        reading.mark_open(s, study_id=site.flagged, user_id=grey.id, user_name="grey",
                          expire_seconds=site.settings.reading_claim_seconds, now=five)
        found = reading.readers(s, study_ids=[site.flagged], expire_seconds=site.settings.reading_claim_seconds,
                                now=five)[site.flagged]
        assert [(r.user_name, r.minutes) for r in found if r.user_name == "grey"] == [("grey", 1)]
        assert reading.prune(s, expire_seconds=60, now=five + dt.timedelta(days=2)) == 2
