"""What every `chestaid` command shares: the configured settings, the audit actor, and log setup."""
from __future__ import annotations

import getpass
import logging
import os


def load_settings():
    """Returns the process settings (imported lazily so `chestaid --help` stays quick)."""
    from core.settings import get_settings

    return get_settings()


def cli_actor() -> str:
    """Returns the audit actor for this shell user ("cli:<os user>")."""
    try:
        who = getpass.getuser()
    except Exception:  # no passwd entry (containers): the uid still identifies the caller
        who = f"uid{os.getuid()}"
    return f"cli:{who}"


def setup_logging() -> None:
    """Sends INFO logs to stderr with time, level and logger name, for the long-running processes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
