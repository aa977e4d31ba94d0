"""DICOM C-STORE receiver: radiographs pushed by modalities and PACS land, unchanged and whole, in the inbox."""
from __future__ import annotations

import logging
import os
import re
import uuid
from collections.abc import Iterable
from pathlib import Path

from pydicom import uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from core.settings import Settings

log = logging.getLogger(__name__)

# Secondary Capture is received so that a digitised film is listed with the guard's reason rather than bounced.
STORAGE_CLASSES = (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                   DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)
# Only syntaxes that core.films.dicom can decode: a sender offered nothing else converts or reports the failure itself.
# Deflated is safe to take: the stored file is capped at max_file_bytes, and core.films.dicom inflates it only up
# to that cap (a deflate bomb fails at ingest with "Deflated DICOM inflates beyond N bytes").
TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian, uid.ImplicitVRLittleEndian, uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian, uid.JPEGBaseline8Bit, uid.JPEGExtended12Bit, uid.JPEGLossless, uid.JPEGLosslessSV1,
    uid.JPEGLSLossless, uid.JPEGLSNearLossless, uid.JPEG2000Lossless, uid.JPEG2000, uid.RLELossless,
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # PS3.4 C-STORE "Refused: Out of Resources": the sender retries later
CANNOT_UNDERSTAND = 0xC000
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
HOW_TO_ALLOW = ("set CHESTAID_DICOM_ALLOWED_AES='[\"PACS1\"]' (a JSON list) or pass --allow-ae PACS1 "
                "to chestaid dicom-listen")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def store_instance(inbox: Path, sop_instance_uid: str, data: bytes) -> Path:
    """Writes one instance as <SOP Instance UID>.dcm via a hidden .part file, fsync and rename."""
    final = inbox / f"{sop_instance_uid}.dcm"
    # Dot-prefixed and *.part: the ingester skips both, so it never reads half an instance.
    tmp = inbox / f".{sop_instance_uid}.{uuid.uuid4().hex}.part"
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(inbox)  # the rename itself must survive a power cut before we answer success
    return final


def _refuse_oversize(calling: str, sop_uid: str, size: int, max_bytes: int) -> int:
    log.warning("refused SOP %s from %s: %d bytes, over the limit of %d (CHESTAID_MAX_FILE_BYTES)", sop_uid,
                calling, size, max_bytes)
    return OUT_OF_RESOURCES


def _handle_store(event: evt.Event, inbox: Path, max_bytes: int) -> int:
    """Answers one C-STORE: success only once the instance is durably in the inbox; over max_bytes, 0xA700."""
    calling = event.assoc.requestor.ae_title
    sop_uid = str(event.request.AffectedSOPInstanceUID or "").strip()
    if len(sop_uid) > 64 or not _UID.fullmatch(sop_uid):
        log.warning("refused an instance from %s: invalid SOP Instance UID", calling)
        return CANNOT_UNDERSTAND
    # pynetdicom has the encoded dataset in memory by now; checking its size first avoids copying a huge one.
    size = event.request.DataSet.getbuffer().nbytes
    if size > max_bytes:
        return _refuse_oversize(calling, sop_uid, size, max_bytes)
    try:
        # The encoded bytes as sent, with preamble and file meta: the archive keeps the DICOM unchanged.
        data = event.encoded_dataset(include_meta=True)
        if len(data) > max_bytes:  # the file meta can tip an instance just under the cap over it
            return _refuse_oversize(calling, sop_uid, len(data), max_bytes)
        store_instance(inbox, sop_uid, data)
    except OSError as exc:
        log.error("could not write SOP %s from %s to the inbox: %s", sop_uid, calling, exc.strerror or exc)
        return OUT_OF_RESOURCES
    except Exception:  # a malformed request must cost this instance only, never the server
        log.exception("could not store SOP %s from %s", sop_uid, calling)
        return CANNOT_UNDERSTAND
    # Not the stored file's size: the ingester may have claimed it (moved it out of the inbox) by now.
    log.info("received SOP %s from %s (%d bytes)", sop_uid, calling, len(data))
    return SUCCESS


def _handle_request(event: evt.Event, allowed: list[str]) -> None:
    """Rejects an association whose calling AE title is not allowed (all of them when the list is empty)."""
    calling = str(event.assoc.requestor.primitive.calling_ae_title or "").strip()
    if calling in allowed:
        return
    if allowed:
        log.warning("rejected an association from calling AE %r: not in the allow-list", calling)
    else:
        log.warning("rejected an association from calling AE %r: no calling AE titles are allowed; %s", calling,
                    HOW_TO_ALLOW)
    # Sent from EVT_REQUESTED, pynetdicom skips its own negotiation (PS3.8 A-ASSOCIATE-RJ: rejected-permanent,
    # service-user, calling AE title not recognised), as it does for its own require_calling_aet check.
    event.assoc.acse.send_reject(0x01, 0x01, 0x03)
    event.assoc.kill()


def build_ae(ae_title: str, allowed: Iterable[str] = ()) -> AE:
    """Builds the application entity: Verification and CR/DX/Secondary Capture storage for allowed callers.

    The allow-list itself is enforced by _handle_request, bound by _prepare; an empty list admits no one.
    """
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    allowed = [a.strip() for a in allowed if a.strip()]
    if allowed:
        ae.require_calling_aet = allowed
    return ae


def _prepare(settings: Settings, ae_title: str | None, allowed: Iterable[str] | None):
    # pynetdicom's DEBUG output can include raw PDU bytes (patient identifiers); never let it through.
    pn_log = logging.getLogger("pynetdicom")
    if pn_log.getEffectiveLevel() < logging.INFO:
        pn_log.setLevel(logging.INFO)
    settings.inbox.mkdir(parents=True, exist_ok=True)
    allowed = [a.strip() for a in (settings.dicom_allowed_aes if allowed is None else allowed) if a.strip()]
    ae = build_ae(ae_title or settings.dicom_ae_title, allowed)
    handlers = [(evt.EVT_REQUESTED, _handle_request, [allowed]),
                (evt.EVT_C_STORE, _handle_store, [settings.inbox, settings.max_file_bytes])]
    return ae, handlers, allowed


def start_listener(settings: Settings, port: int | None = None, ae_title: str | None = None,
                   allowed: Iterable[str] | None = None, *, host: str | None = None) -> ThreadedAssociationServer:
    """Starts the receiver in background threads; stop it with stop_listener(). Port 0 picks a free port."""
    ae, handlers, _ = _prepare(settings, ae_title, allowed)
    address = (host if host is not None else settings.dicom_host, settings.dicom_port if port is None else port)
    return ae.start_server(address, block=False, evt_handlers=handlers)


def stop_listener(server: ThreadedAssociationServer) -> None:
    """Stops accepting and aborts associations still open, as a process exit would; their senders resend."""
    server.ae.shutdown()


def run_listener(settings: Settings, port: int | None = None, ae_title: str | None = None,
                 allowed: Iterable[str] | None = None, *, host: str | None = None) -> None:
    """Runs the receiver in the foreground until interrupted."""
    ae, handlers, allowed = _prepare(settings, ae_title, allowed)
    address = (host if host is not None else settings.dicom_host, settings.dicom_port if port is None else port)
    log.info("DICOM receiver %s listening on %s:%s, writing to %s", ae.ae_title, address[0], address[1],
             settings.inbox)
    if allowed:
        log.info("accepting associations from calling AE titles: %s", ", ".join(allowed))
    else:
        log.warning("no calling AE titles are allowed, so every association will be rejected; %s", HOW_TO_ALLOW)
    try:
        ae.start_server(address, block=True, evt_handlers=handlers)  # returns on Ctrl-C (and SIGTERM, see cli)
    finally:
        ae.shutdown()
        log.info("DICOM receiver stopped")
