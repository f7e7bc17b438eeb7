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
