"""The DICOM receiver: `chestaid dicom-listen` (C-STORE and C-ECHO into the inbox)."""
from __future__ import annotations

import click

from cli._common import load_settings, setup_logging


@click.command("dicom-listen")
@click.option("--port", type=int, default=None, help="TCP port (default CHESTAID_DICOM_PORT, 11112)")
@click.option("--ae-title", default=None, help="this receiver's AE title (default CHESTAID_DICOM_AE_TITLE, CHESTAID)")
@click.option("--allow-ae", "allowed", multiple=True,
              help="accept associations only from this calling AE title (repeatable; default "
                   "CHESTAID_DICOM_ALLOWED_AES; with none, every association is rejected)")
@click.option("--host", default=None, help="bind address (default CHESTAID_DICOM_HOST, 127.0.0.1; "
                                           "0.0.0.0 for every interface)")
def dicom_listen(port: int | None, ae_title: str | None, allowed: tuple[str, ...], host: str | None) -> None:
    """Receives DICOM radiographs pushed by modalities/PACS (C-STORE, C-ECHO) into the inbox."""
    import signal

    from core.intake.dicom_listener import run_listener

    setup_logging()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop cleanly on SIGTERM as on Ctrl-C
    run_listener(load_settings(), port=port, ae_title=ae_title, allowed=list(allowed) or None, host=host)


DICOM_COMMANDS = [dicom_listen]
