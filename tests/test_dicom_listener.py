"""The C-STORE receiver: real pynetdicom associations against the listener, files checked byte for byte."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from core.films.dicom import header_identity, read_dicom_info
from core.films.imaging import load_grayscale
from core.intake.dicom_listener import (
    OUT_OF_RESOURCES,
    STORAGE_CLASSES,
    start_listener,
    stop_listener,
)
from core.settings import Settings
from tests.conftest import fixture_images
from tests.dicom_samples import (
    ACCESSION,
    PATIENT_ID,
    PATIENT_NAME,
    compressed,
    film,
    make_dataset,
    to_bytes,
)

SCU_SYNTAXES = [uid.ExplicitVRLittleEndian, uid.JPEG2000Lossless, uid.RLELossless, uid.DeflatedExplicitVRLittleEndian]
SENDERS = ["MODALITY1", "MODALITY2", "RUDE"]  # the calling AE titles the tests' receivers allow


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox")


@pytest.fixture
def listener(settings):
    server = start_listener(settings, port=0, ae_title="CHESTAID", allowed=SENDERS, host="127.0.0.1")
    yield server
    stop_listener(server)


def port_of(server) -> int:
    return server.server_address[1]


def instances(n: int) -> list:
    """n distinct instances built from the fixture films: DX and CR, MONOCHROME1/2, some compressed."""
    out = []
    for i in range(n):
        v = film(fixture_images()[i % len(fixture_images())]).astype(np.uint16) * 16
        if i % 3 == 1:
            ds = make_dataset(4095 - v, modality="CR", photometric="MONOCHROME1", bits_stored=12)
        else:
            ds = make_dataset(v, modality="DX", bits_stored=12)
        if i % 3 == 2:
            ds = compressed(ds, uid.JPEG2000Lossless)
        out.append(ds)
    return out


def scu(ae_title: str = "MODALITY1") -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(Verification)
    # One context per (class, syntax): a compressed instance can only travel in a context accepted for its syntax.
    for sop_class in STORAGE_CLASSES[:2] + (CTImageStorage,):
        for syntax in SCU_SYNTAXES:
            ae.add_requested_context(sop_class, syntax)
    return ae


def send(port: int, datasets, ae_title: str = "MODALITY1") -> list[int | None]:
    """Sends datasets over one association; returns each C-STORE status (None when none came back)."""
    assoc = scu(ae_title).associate("127.0.0.1", port, ae_title="CHESTAID")
    if not assoc.is_established:
        return [None] * len(datasets)
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds) if assoc.is_established else None
        statuses.append(int(status.Status) if status else None)
    if assoc.is_established:
        assoc.release()
    return statuses


def assert_received(inbox: Path, datasets) -> None:
    """Every instance is in the inbox under its SOP UID, whole, with the preamble, decoding like the original."""
    for ds in datasets:
        path = inbox / f"{ds.SOPInstanceUID}.dcm"
        data = path.read_bytes()
        assert data[128:132] == b"DICM"
        got = dcmread(path)
        assert got.SOPInstanceUID == ds.SOPInstanceUID
        assert got.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
        assert got.PixelData == ds.PixelData
        assert np.array_equal(np.asarray(load_grayscale(data)), np.asarray(load_grayscale(to_bytes(ds))))
    assert not [p.name for p in inbox.iterdir() if p.name.startswith(".") or p.suffix == ".part"]


def test_echo_and_several_instances_over_two_associations(listener, settings, caplog):
    caplog.set_level(logging.DEBUG)
    port = port_of(listener)
    assoc = scu().associate("127.0.0.1", port, ae_title="CHESTAID")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    batch = instances(5)
    assert send(port, batch[:3]) == [0, 0, 0]
    assert send(port, batch[3:], ae_title="MODALITY2") == [0, 0]
    assert_received(settings.inbox, batch)
    assert sorted(p.name for p in settings.inbox.iterdir()) == sorted(f"{d.SOPInstanceUID}.dcm" for d in batch)
    for phi in (PATIENT_ID, PATIENT_NAME, ACCESSION):
        assert phi not in caplog.text
    assert batch[0].SOPInstanceUID in caplog.text


def test_received_file_is_the_dataset_as_sent(listener, settings):
    ds = instances(1)[0]
    assert send(port_of(listener), [ds]) == [0]
    # Same transfer syntax on both sides: the stored dataset bytes equal the sender's encoding exactly.
    sent = to_bytes(ds)
    stored = (settings.inbox / f"{ds.SOPInstanceUID}.dcm").read_bytes()
    assert stored.endswith(sent[sent.index(b"\x08\x00\x16\x00"):])  # from (0008,0016) SOPClassUID onward


def test_an_instance_taken_from_the_inbox_at_once_is_still_answered_success(listener, settings, monkeypatch, caplog):
    """The ingester claims a renamed-in instance at once (it moves out of the inbox): the C-STORE that wrote it
    is answered success all the same, and the log gives the size received."""
    from core.intake import dicom_listener

    caplog.set_level(logging.INFO)
    taken = settings.data_dir / "taken"
    taken.mkdir(parents=True)
    store = dicom_listener.store_instance

    def store_then_claimed(inbox, sop_instance_uid, data):
        path = store(inbox, sop_instance_uid, data)
        os.rename(path, taken / path.name)  # what the ingester's claim does
        return path
    monkeypatch.setattr(dicom_listener, "store_instance", store_then_claimed)
    ds = instances(1)[0]
    assert send(port_of(listener), [ds]) == [0]
    kept = taken / f"{ds.SOPInstanceUID}.dcm"
    assert dcmread(kept).SOPInstanceUID == ds.SOPInstanceUID
    assert f"received SOP {ds.SOPInstanceUID} from MODALITY1 ({kept.stat().st_size} bytes)" in caplog.text


def test_unlisted_calling_ae_title_is_rejected(settings):
    server = start_listener(settings, port=0, ae_title="CHESTAID", allowed=["PACS"], host="127.0.0.1")
    try:
        intruder = scu("INTRUDER").associate("127.0.0.1", port_of(server), ae_title="CHESTAID")
        assert intruder.is_rejected
        ds = instances(1)[0]
        assert send(port_of(server), [ds], ae_title="PACS") == [0]
        assert_received(settings.inbox, [ds])
    finally:
        stop_listener(server)


def test_other_modalities_are_refused_at_negotiation(listener, settings):
    assoc = scu().associate("127.0.0.1", port_of(listener), ae_title="CHESTAID")
    assert assoc.is_established
    ct = make_dataset(film(fixture_images()[0]), modality="CT")
    ct.SOPClassUID = ct.file_meta.MediaStorageSOPClassUID = CTImageStorage
    with pytest.raises(ValueError, match="No presentation context"):
        assoc.send_c_store(ct)
    assoc.release()
    assert list(settings.inbox.iterdir()) == []


def test_nothing_is_lost_when_the_receiver_stops_mid_way_and_restarts(settings):
    batch = instances(6)
    server = start_listener(settings, port=0, ae_title="CHESTAID", allowed=SENDERS, host="127.0.0.1")
    port = port_of(server)
    assoc = scu().associate("127.0.0.1", port, ae_title="CHESTAID")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in batch[:2]]
    stop_listener(server)  # mid-association: the receiver goes away under the sender
    for ds in batch[2:]:
        status = assoc.send_c_store(ds) if assoc.is_established else None
        statuses.append(int(status.Status) if status else None)
    assert statuses[:2] == [0, 0]
    assert statuses[2:] == [None] * 4
    assert send(port, batch[2:]) == [None] * 4  # nobody listening: the association is refused

    server = start_listener(settings, port=port, ae_title="CHESTAID", allowed=SENDERS, host="127.0.0.1")
    try:
        failed = [ds for ds, status in zip(batch, statuses) if status != 0]
        assert send(port, failed) == [0] * len(failed)
    finally:
        stop_listener(server)
    assert_received(settings.inbox, batch)
    assert len(list(settings.inbox.iterdir())) == 6


def test_write_failure_answers_out_of_resources_and_the_server_keeps_serving(listener, settings):
    port = port_of(listener)
    first, second = instances(2)
    # A misbehaving sender: associates, then aborts without a word.
    rude = scu("RUDE").associate("127.0.0.1", port, ae_title="CHESTAID")
    assert rude.is_established
    rude.abort()
    # The inbox vanishes (a full or unmounted share): the sender is told, nothing is half-written.
    moved = settings.inbox.with_name("inbox-away")
    settings.inbox.rename(moved)
    settings.inbox.write_bytes(b"not a directory")
    assert send(port, [first]) == [OUT_OF_RESOURCES]
    settings.inbox.unlink()
    moved.rename(settings.inbox)
    assert send(port, [first, second]) == [0, 0]
    assert_received(settings.inbox, [first, second])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_dicom_listen_receives_into_the_inbox(tmp_path):
    port = _free_port()
    env = {**os.environ, "CHESTAID_DATA_DIR": str(tmp_path / "var"), "CHESTAID_INBOX": str(tmp_path / "inbox"),
           "CHESTAID_DICOM_HOST": "127.0.0.1"}
    chestaid = shutil.which("chestaid", path=str(Path(sys.executable).parent))
    proc = subprocess.Popen([chestaid, "dicom-listen", "--port", str(port), "--ae-title", "CHESTAID",
                             "--allow-ae", "MODALITY1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ae = scu()
        ae.connection_timeout = 1
        deadline = time.monotonic() + 120  # wait for the process to listen (slow to start on a busy CI box)
        while True:
            assoc = ae.associate("127.0.0.1", port, ae_title="CHESTAID")
            if assoc.is_established or time.monotonic() > deadline:
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.5)
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        ds = instances(1)[0]
        assert assoc.send_c_store(ds).Status == 0
        assoc.release()
        assert_received(tmp_path / "inbox", [ds])
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    log = out.decode()
    assert f"received SOP {ds.SOPInstanceUID} from MODALITY1" in log
    assert PATIENT_ID not in log and PATIENT_NAME not in log


def test_by_default_the_receiver_binds_loopback_and_rejects_every_association(settings, caplog):
    caplog.set_level(logging.INFO)
    assert (settings.dicom_host, settings.dicom_allowed_aes) == ("127.0.0.1", [])
    server = start_listener(settings, port=0, ae_title="CHESTAID")  # host and allow-list from the settings
    try:
        assert server.server_address[0] == "127.0.0.1"
        for caller in ("MODALITY1", "PACS1", "CHESTAID"):
            assoc = scu(caller).associate("127.0.0.1", port_of(server), ae_title="CHESTAID")
            assert assoc.is_rejected, caller
            rejection = assoc.acceptor.primitive
            # Rejected-permanent (1), by the service user (1): calling AE title not recognised (3).
            assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)
        assert send(port_of(server), instances(1)) == [None]
    finally:
        stop_listener(server)
    assert list(settings.inbox.iterdir()) == []
    assert "rejected an association from calling AE 'PACS1': no calling AE titles are allowed" in caplog.text
    assert """set CHESTAID_DICOM_ALLOWED_AES='["PACS1"]'""" in caplog.text and "--allow-ae PACS1" in caplog.text


def test_the_allow_list_from_the_environment_admits_only_its_titles(tmp_path, monkeypatch):
    monkeypatch.setenv("CHESTAID_DICOM_ALLOWED_AES", '["PACS1"]')
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox")
    server = start_listener(settings, port=0, ae_title="CHESTAID")
    try:
        ds = instances(1)[0]
        assert send(port_of(server), [ds], ae_title="MODALITY1") == [None]
        assert send(port_of(server), [ds], ae_title="PACS1") == [0]
    finally:
        stop_listener(server)
    assert_received(settings.inbox, [ds])


def test_an_instance_over_max_file_bytes_is_refused_with_out_of_resources_and_not_written(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    small = make_dataset(np.ascontiguousarray(film(fixture_images()[0])[:64, :64]))
    big = instances(1)[0]
    cap = len(to_bytes(small)) + 512
    assert len(to_bytes(big)) > 4 * cap
    settings = Settings(data_dir=tmp_path / "var", inbox=tmp_path / "inbox", max_file_bytes=cap)
    server = start_listener(settings, port=0, ae_title="CHESTAID", allowed=SENDERS, host="127.0.0.1")
    try:
        assert send(port_of(server), [big, small]) == [OUT_OF_RESOURCES, 0]
    finally:
        stop_listener(server)
    assert_received(settings.inbox, [small])
    assert sorted(p.name for p in settings.inbox.iterdir()) == [f"{small.SOPInstanceUID}.dcm"]
    assert f"refused SOP {big.SOPInstanceUID} from MODALITY1:" in caplog.text
    assert f"over the limit of {cap}" in caplog.text


def test_deflated_instances_are_received_and_a_deflate_bomb_fails_at_the_header_read(listener, settings):
    good = make_dataset(film(fixture_images()[1]), WindowCenter=128, WindowWidth=256)
    bomb = make_dataset(np.zeros((2000, 2000), dtype=np.uint16), bits_stored=12)  # 8 MB of zeros
    for ds in (good, bomb):
        ds.file_meta.TransferSyntaxUID = uid.DeflatedExplicitVRLittleEndian
    assert send(port_of(listener), [good, bomb]) == [0, 0]
    assert_received(settings.inbox, [good])
    stored = settings.inbox / f"{bomb.SOPInstanceUID}.dcm"
    assert stored.stat().st_size < 100_000  # the sender's deflate: small on the wire and on disk
    assert header_identity(stored, max_bytes=1_000_000) == (None, "Deflated DICOM inflates beyond 1,000,000 bytes")
    info, reason = header_identity(settings.inbox / f"{good.SOPInstanceUID}.dcm")
    assert reason is None and info == read_dicom_info(to_bytes(good))
    assert info.sop_instance_uid == good.SOPInstanceUID
