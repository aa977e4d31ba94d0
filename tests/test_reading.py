"""The reading flow's server side (issue 11): record a finding and go on to the next unread study, search,
filters and sorts of the worklist, the threshold preview and confirmations (real app, real DB, real films)."""
from __future__ import annotations

from core import repository as repo
from core.db import session_scope
from tests.test_web import (admin_client, client, csrf_token, post_form, row_ids, site,  # noqa: F401 (fixtures)
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
