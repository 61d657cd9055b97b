"""User errors: the one base class, and the one place that turns one into a message and exit 2.

A `UserError` is a problem the user fixes by changing a recipe, a command line, data or the
environment: it is shown as a short message naming the key and the fix, never as a traceback.
Everything else is a bug and keeps its traceback. `lrft` (cli.py) and `python lrft/train.py`
(train.py, also under `accelerate launch`) both go through :func:`run_command`.

This module imports nothing heavy, so every other module can derive its errors from it.
"""

from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERROR_EXIT = 2  # argparse's status for bad usage; `lrft compare` reads it from its cells


class UserError(Exception):
    """A problem the user fixes (recipe, arguments, data, environment); shown without traceback."""


class RecipeError(UserError, ValueError):
    """One or more problems in a recipe; ``problems`` lists them, ``str()`` shows them all."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(self.problems)} problem(s){where}:"] + [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(UserError, ValueError):
    """The data a recipe names cannot be used; raised before training starts."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written (disk full, folder gone); the previous one is intact."""


def _is_user_error(error: BaseException) -> bool:
    # A missing file named on the command line (a recipe, a run folder) is the user's to fix.
    return isinstance(error, (UserError, FileNotFoundError))


def run_command(name: str, body: Callable[[], int | None]) -> int:
    """Run a command body; print a user error as `lrft NAME: message` and return its exit code.

    Args:
        name: the command as the user typed it (`train`, `check`, ...), shown in the message.
        body: the command; its return value (None means 0) is the exit code.

    Returns:
        The exit code: the body's, 2 for a user error, 130 on Ctrl-C. A closed stdout
        (`lrft check R | head -1`) ends quietly with the body's code.
    """
    try:
        code = body()
        sys.stdout.flush()
        return 0 if code is None else code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except Exception as e:  # noqa: BLE001 - user errors become a message, the rest re-raise
        if not _is_user_error(e):
            raise
        print(f"lrft {name}: {e}", file=sys.stderr)
        return USER_ERROR_EXIT


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush raises no second BrokenPipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)
