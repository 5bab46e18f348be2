"""What every program shares: which exceptions are the user's to fix (one line, exit code 2)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from dune_scale.config import ConfigError
from dune_scale.data.errors import DataError
from dune_scale.data.mixture import MixtureError
from dune_scale.engine.checkpointer import CheckpointError
from dune_scale.engine.pretrained import PretrainedError
from dune_scale.teachers import TeacherCheckpointError

# Exit code of a problem with what the user gave (config, checkpoints, data, arguments).
EXIT_USER_ERROR = 2

# Problems with what the user gave: one message, exit code 2, no traceback.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, CheckpointError, PretrainedError, MixtureError, TeacherCheckpointError, DataError,
)


def run_program(program: Callable[[], int], errors: tuple[type[Exception], ...] = USER_ERRORS) -> int:
    """Run ``program``; a user error becomes one ``error: …`` line on stderr and exit code 2."""
    try:
        return program()
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR


def setup_logging(is_main: bool) -> None:
    """INFO on the main rank, warnings only elsewhere (N ranks would repeat every line)."""
    logging.basicConfig(
        level=logging.INFO if is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
