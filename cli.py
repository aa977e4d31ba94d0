"""The `chestaid` command: service processes, training and model tools, administration."""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Chest-Aid: chest X-ray triage worklist (a second look, never a diagnosis)."""


# --- service processes (web, ingester, worker, migrate, serve) ----------------------------------


# --- model: train, score, evaluate, recalibrate, calibration ------------------------------------

from training.commands import MODEL_COMMANDS  # noqa: E402  (click only; heavy imports are lazy)

for _command in MODEL_COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    main()
