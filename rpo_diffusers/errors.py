"""How the command-line entry points end on an error: one ``error: ...`` line for the errors whose message
is the whole story, a traceback for the rest (bugs), and ``--debug`` to see the traceback anyway."""

from __future__ import annotations

import sys
from collections.abc import Callable


def is_project_error(err: BaseException) -> bool:
    """A missing path or model, a bad value, or any error class the project defines (ExportError,
    CheckpointError, NonFiniteLossError, ModelNotAvailableError, ...): its message says what to do."""
    return isinstance(err, (FileNotFoundError, NotADirectoryError, ValueError)) or type(
        err
    ).__module__.startswith("rpo_diffusers.")


def run_cli(main: Callable[[], int | None], debug: bool = False) -> int:
    """Run ``main`` and turn the project's errors into ``error: <message>`` on stderr and exit status 2
    (130 for Ctrl-C). With ``debug`` every error keeps its traceback."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted (what was already saved is intact)", file=sys.stderr)
        return 130
    except Exception as err:
        if debug or not is_project_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
