"""A random secret kept in a private file under the data dir, created once and shared by every process."""
from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

log = logging.getLogger(__name__)
MIN_CHARS = 32


def load_or_create(path: Path, *, what: str, lost_hint: str, nbytes: int = 32) -> str:
    """Returns the secret in path, first writing a new one (mode 0600) if the file does not exist."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(secrets.token_urlsafe(nbytes))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            # Linking is atomic: processes starting together all end up with the first one's secret.
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users; restrict it with chmod 600", path)
    value = path.read_text(encoding="utf-8").strip()
    if len(value) < MIN_CHARS:
        raise RuntimeError(f"{path} holds no usable {what}; {lost_hint}")
    return value
