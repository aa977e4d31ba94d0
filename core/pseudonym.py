"""Pseudonymous patient keys for exports: a salted HMAC of the DICOM PatientID, never the identifier itself."""
from __future__ import annotations

import hashlib
import hmac

from core.secretfile import load_or_create
from core.settings import Settings

SALT_FILE = "pseudonym_salt"
KEY_CHARS = 16  # 64 bits: collisions stay negligible for any one hospital's patients


def load_salt(settings: Settings) -> bytes:
    """Returns CHESTAID_PSEUDONYM_SALT, else the salt kept under data_dir (created once, mode 0600)."""
    configured = settings.pseudonym_salt.get_secret_value()
    if configured:
        return configured.encode("utf-8")
    return load_or_create(settings.data_dir / SALT_FILE, what="pseudonym salt",
                          lost_hint="restore it from a backup (a new one would give every patient a new key)"
                          ).encode("utf-8")


def patient_key(salt: bytes, patient_id: str | None) -> str:
    """Returns the pseudonymous key of a PatientID ('' when there is none, e.g. a PNG/JPEG film)."""
    if not patient_id:
        return ""
    return hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:KEY_CHARS]
