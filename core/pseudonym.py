"""Pseudonymous patient keys for exports: a salted HMAC of the DICOM PatientID, never the identifier itself."""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat

from core.settings import Settings

log = logging.getLogger(__name__)

SALT_FILE = "pseudonym_salt"
KEY_CHARS = 16  # 64 bits: collisions stay negligible for any one hospital's patients


def load_salt(settings: Settings) -> bytes:
    """Returns CHESTAID_PSEUDONYM_SALT, else the salt kept under data_dir (created once, mode 0600)."""
    configured = settings.pseudonym_salt.get_secret_value()
    if configured:
        return configured.encode("utf-8")
    path = settings.data_dir / SALT_FILE
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SALT_FILE}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            # Linking is atomic: processes starting together all end up with the first one's salt.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; restrict it with chmod 600", path)
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < 32:
        raise RuntimeError(f"{path} holds no usable pseudonym salt; restore it from a backup (a new one "
                           "would give every patient a new key)")
    return value.encode("utf-8")


def patient_key(salt: bytes, patient_id: str | None) -> str:
    """Returns the pseudonymous key of a PatientID ('' when there is none, e.g. a PNG/JPEG film)."""
    if not patient_id:
        return ""
    return hmac.new(salt, patient_id.encode("utf-8"), hashlib.sha256).hexdigest()[:KEY_CHARS]
