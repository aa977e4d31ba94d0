"""The `chestaid` command: service processes, training and model tools, administration, DICOM receiver."""
from __future__ import annotations

import click

from cli.accounts import ACCOUNT_COMMANDS
from cli.dicom import DICOM_COMMANDS
from cli.model import MODEL_COMMANDS
from cli.service import SERVICE_COMMANDS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Chest-Aid: chest X-ray triage worklist (a second look, never a diagnosis)."""


for _command in (*SERVICE_COMMANDS, *MODEL_COMMANDS, *ACCOUNT_COMMANDS, *DICOM_COMMANDS):
    main.add_command(_command)
