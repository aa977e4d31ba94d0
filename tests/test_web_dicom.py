"""DICOM studies in the web app (TestClient): identity on the worklist, refused films, grouped study pages, API."""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import re
import shutil
from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from core.db import get_engine, session_scope
from core.intake.ingest import ingest_file
from core.migrate import upgrade
from core.ml.bundle import load_bundle
from core.models import AuditEvent, Status, Study
from core.pipeline import process_studies
from core.settings import Settings
from tests.conftest import fixture_images
from tests.dicom_samples import ACCESSION, PATIENT_ID, PATIENT_NAME, film, make_dataset, to_bytes
from tests.test_web import add_user, post_json, row_html, row_ids, sign_in
from web.app import create_app

SALT = "web-test-salt-0123456789abcdef0123456789"


@dataclass
class DicomSite:
    settings: Settings
    pa: int
    ap: int
    lateral: int
    ct: int
    jpeg: int
    study_uid: str


def settings_for(root) -> Settings:
    return Settings(data_dir=root / "data", inbox=root / "inbox", pseudonym_salt=SALT)


def frontal(index: int, **elements):
    return make_dataset(film(fixture_images()[index]), WindowCenter=128, WindowWidth=256, **elements)


@pytest.fixture(scope="module")
def site_template(tmp_path_factory, bundle_dir) -> DicomSite:
    root = tmp_path_factory.mktemp("dicom-site")
    settings = settings_for(root)
    settings.ensure_dirs()
    upgrade(settings.database_url)
    pa = frontal(0, ViewPosition="PA")
    same = {"StudyInstanceUID": pa.StudyInstanceUID}
    files = {"pa.dcm": to_bytes(pa), "ap.dcm": to_bytes(frontal(4, ViewPosition="AP", **same)),
             "lat.dcm": to_bytes(frontal(5, ViewPosition="LAT", **same)),
             "ct.dcm": to_bytes(frontal(2, modality="CT")), "film.jpeg": fixture_images()[1].read_bytes()}
    enqueued: list[int] = []
    ids = {}
    for name, data in files.items():
        (settings.inbox / name).write_bytes(data)
        ids[name] = ingest_file(settings.inbox / name, settings=settings, enqueue=enqueued.append, wait=False)
    outcome = process_studies(enqueued, bundle=load_bundle(bundle_dir, device="cpu"), settings=settings, worker="t")
    assert set(outcome.values()) == {"scored"} and len(outcome) == 3
    get_engine(settings.database_url).dispose()
    return DicomSite(settings, ids["pa.dcm"], ids["ap.dcm"], ids["lat.dcm"], ids["ct.dcm"], ids["film.jpeg"],
                     pa.StudyInstanceUID)


@pytest.fixture
def site(site_template, tmp_path) -> DicomSite:
    shutil.copytree(site_template.settings.data_dir, tmp_path / "data")
    settings = settings_for(tmp_path)
    yield DicomSite(**{**site_template.__dict__, "settings": settings})
    get_engine(settings.database_url).dispose()


def client_for(site: DicomSite, name: str, role: str) -> TestClient:
    add_user(site.settings, name, role)
    client = TestClient(create_app(site.settings))
    client.__enter__()
    sign_in(client, name)
    return client


@pytest.fixture
def doctor(site):
    client = client_for(site, "grey", "doctor")
    yield client
    client.__exit__(None, None, None)


def studies(site: DicomSite) -> dict[int, Study]:
    with session_scope(site.settings.database_url) as s:
        return {st.id: st for st in s.scalars(select(Study))}


def lead_and_other(site: DicomSite) -> tuple[Study, Study]:
    rows = studies(site)
    return tuple(sorted((rows[site.pa], rows[site.ap]), key=lambda st: -st.score))


def test_worklist_shows_one_row_per_dicom_study_with_accession_and_patient_id(site, doctor):
    html = doctor.get("/").text
    lead, other = lead_and_other(site)
    assert sorted(row_ids(html, "unread")) == sorted([lead.id, site.jpeg])  # one row for the two frontal films
    row = row_html(html, lead.id)
    assert f'<td class="accession">{ACCESSION}</td>' in row and f'<td class="patient-id">{PATIENT_ID}</td>' in row
    assert f'<td class="num score">{lead.score:.3f}</td>' in row and "2 images" in row
    assert 'class="row-flagged' in row if lead.score >= 0.5 else "routine" in row
    # The patient's name appears nowhere on the worklist; only on the study page.
    assert "Testperson" not in html and "Alice" not in html
    # Refused films are listed with the guard's reason, not scored.
    assert sorted(row_ids(html, "refused")) == sorted([site.lateral, site.ct])
    assert "lateral view (ViewPosition LAT): the model reads frontal (PA/AP) films only" in row_html(html, site.lateral)
    assert "modality CT is not scored" in row_html(html, site.ct)
    assert re.search(r'id="count-refused">2<', html)
    jpeg_row = row_html(html, site.jpeg)
    assert '<td class="accession">–</td>' in jpeg_row
    frag = doctor.get("/fragments/worklist").text  # the polled fragment carries the same rows
    assert row_ids(frag, "refused") == row_ids(html, "refused") and row_ids(frag, "unread") == row_ids(html, "unread")


def test_study_page_shows_identity_and_every_image_of_the_study(site, doctor):
    lead, other = lead_and_other(site)
    html = doctor.get(f"/studies/{other.id}").text
    assert '<dd id="patient-name">Testperson, Alice</dd>' in html
    assert '<dd id="patient-sex-age">F / 045Y</dd>' in html and '<dd id="study-date">2024-01-02 10:15:30</dd>' in html
    assert '<dd id="modality">DX</dd>' in html and '<dd id="view-position">' + other.view_position in html
    assert f'<span id="accession">{ACCESSION}</span>' in html and site.study_uid in html
    assert re.findall(r'data-image-id="(\d+)"', html) == [str(i) for i in sorted([site.pa, site.ap, site.lateral])]
    assert f'<a href="/studies/{lead.id}/heatmap.png">heat-map</a>' in html
    assert f'<a href="/studies/{site.lateral}/image">film</a>' in html
    assert f"study risk {lead.score:.3f}: the highest of its 2 scored images" in html
    assert "recorded on each of its\n          2 scored images" in html

    refused = doctor.get(f"/studies/{site.lateral}").text
    assert "Not scored: the model was not built for this film" in refused and "feedback-form" not in refused
    assert "lateral view (ViewPosition LAT)" in refused and 'id="film-image"' in refused
    # The refused film is shown for reference (decoded without the guard), though never scored.
    r = doctor.get(f"/studies/{site.lateral}/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == film(fixture_images()[5]).shape[::-1]
    assert doctor.get(f"/studies/{site.lateral}/heatmap.png").status_code == 404


def test_api_has_accession_patient_id_and_the_images_but_no_patient_name(site, doctor):
    lead, other = lead_and_other(site)
    r = doctor.get("/api/studies")
    assert PATIENT_NAME not in r.text and "Testperson" not in r.text and "patient_name" not in r.text
    items = {i["id"]: i for i in r.json()}
    assert set(items) == {lead.id, site.jpeg, site.lateral, site.ct}  # one item per worklist row
    row = items[lead.id]
    assert (row["accession_number"], row["patient_id"], row["study_instance_uid"]) == (ACCESSION, PATIENT_ID,
                                                                                       site.study_uid)
    assert (row["section"], row["score"], row["modality"]) == ("unread", lead.score, "DX")
    assert [(i["id"], i["status"]) for i in row["images"]] == [(site.pa, "scored"), (site.ap, "scored"),
                                                               (site.lateral, "refused")]
    assert row["images"][2]["error"].startswith("lateral view") and row["images"][2]["heatmap_url"] is None
    assert items[site.jpeg]["patient_id"] is None and [i["id"] for i in items[site.jpeg]["images"]] == [site.jpeg]
    assert [i["id"] for i in doctor.get("/api/studies?section=refused").json()] == [site.ct, site.lateral]
    one = doctor.get(f"/api/studies/{other.id}").json()
    assert one["id"] == other.id and one["images"] == row["images"] and one["accession_number"] == ACCESSION


def test_feedback_on_a_dicom_study_is_recorded_on_each_scored_image_and_exported_pseudonymously(site, doctor):
    lead, other = lead_and_other(site)
    r = post_json(doctor, f"/api/studies/{lead.id}/feedback", {"finding": "pneumonia", "comment": "bilateral"})
    assert r.status_code == 200 and r.json()["section"] == "read"
    rows = studies(site)
    assert [(rows[i].finding, rows[i].reviewer) for i in (site.pa, site.ap)] == [("pneumonia", "grey")] * 2
    assert rows[site.lateral].finding is None
    with session_scope(site.settings.database_url) as s:
        audited = sorted(e.study_id for e in s.scalars(select(AuditEvent).where(AuditEvent.action.like("finding%"))))
    assert audited == sorted([site.pa, site.ap])
    html = doctor.get("/?view=read").text
    assert row_ids(html, "read") == [lead.id] and "2 images" in row_html(html, lead.id)
    assert row_ids(doctor.get("/").text, "unread") == [site.jpeg]
    # A refused film takes no finding.
    assert post_json(doctor, f"/api/studies/{site.lateral}/feedback", {"finding": "normal"}).status_code == 409
    assert studies(site)[site.lateral].status == Status.REFUSED

    admin = client_for(site, "ada", "admin")
    try:
        export = admin.get("/api/feedback.csv").text
    finally:
        admin.__exit__(None, None, None)
    lines = list(csv.DictReader(io.StringIO(export)))
    key = hmac.new(SALT.encode(), PATIENT_ID.encode(), hashlib.sha256).hexdigest()[:16]
    assert sorted((int(r["study_id"]), r["patient_key"]) for r in lines) == sorted([(site.pa, key), (site.ap, key)])
    assert {float(r["logit"]) for r in lines} == {rows[site.pa].logit, rows[site.ap].logit}
    for value in (PATIENT_ID, PATIENT_NAME, "Testperson", ACCESSION, site.study_uid):
        assert value not in export
