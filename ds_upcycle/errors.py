"""User-facing failures and the one place that turns them into a message and an exit code.

User mistakes are ``ValueError`` everywhere in the library (the message names the field, the
value and the fix). Runs that end abnormally but by design raise a :class:`RunError` subclass
carrying its documented exit code. Both become one ``error: ...`` line on stderr, never a
traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USAGE = 2
"""A user error: bad config, path, flag or input. Nothing was started or written."""


class RunError(RuntimeError):
    """A run that ended early by design; ``exit_code`` is documented in the README."""

    exit_code = 1


class NonFiniteError(RunError):
    """The loss or gradient norm became NaN/Inf under ``train.on_nonfinite=stop``."""

    exit_code = 3


EXIT_PREEMPTED = 75
"""Stopped by SIGTERM/SIGINT (or a lost launcher) after a step, with a complete checkpoint of that
step: resume with ``--train.resume=true``. 75 is EX_TEMPFAIL of sysexits.h: "try again later"."""

EXIT_PREEMPT_TIMEOUT = 124
"""Stopped, but the save did not finish within ``train.preempt_save_timeout_s``: the previous
complete checkpoint stays ``latest_complete``."""


class PreemptedError(RunError):
    """A signal (or the loss of the launcher) stopped the run after a step, which was saved."""

    exit_code = EXIT_PREEMPTED


def run_guarded(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """Call a ``main(argv) -> int``; user errors become one line on stderr and their exit code."""
    try:
        return main(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
