"""User-facing failures and the one place that turns them into a message and an exit code.

User mistakes are ``ValueError`` everywhere in the library (the message names the field, the
value and the fix). Runs that end abnormally but by design raise a :class:`RunError` subclass
carrying its documented exit code. Both become one ``error: ...`` line on stderr, never a
traceback.
"""

from __future__ import annotations

import errno
import json
import re
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

EXIT_USAGE = 2
"""A user error: bad config, path, flag or input. Nothing was started or written."""


class RunError(RuntimeError):
    """A run that ended early by design; ``exit_code`` is documented in the README."""

    exit_code = 1


class NonFiniteError(RunError):
    """The loss or gradient norm became NaN/Inf under ``train.on_nonfinite=stop``."""

    exit_code = 3


EXIT_OS = 4
"""The operating system refused: no space left, a read-only or unwritable path."""


def os_message(e: OSError) -> str:
    """One line for an OSError: what happened, where, and what is kept."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (
            f"no space left on the device{where}; free space or choose another folder and rerun. Outputs are written "
            "beside their target and moved into place only when complete, so the interrupted one is not used and "
            "earlier complete ones are kept"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"{e.strerror.lower()}{where}; choose a folder you can write to"
    return f"{e.strerror or e}{where}"


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
    except OSError as e:
        print(f"error: {os_message(e)}", file=sys.stderr)
        return EXIT_OS


# --------------------------------------------------------------------------------------------
# Which rank failed first: each rank leaves a record, the front end reads the earliest
# --------------------------------------------------------------------------------------------

FAILURES = "failures"
"""Folder (in the run's output folder) of one JSON record per rank that raised."""


def record_failure(out_dir: Path, rank: int, exc: BaseException) -> None:
    """Leave a record of this rank's failure for the front end (best effort: never masks ``exc``)."""
    record = {
        "rank": rank, "host": socket.gethostname(), "time": time.time(), "type": type(exc).__name__,
        "user_error": isinstance(exc, ValueError), "exit_code": exit_code(exc),
        "message": os_message(exc) if isinstance(exc, OSError) else str(exc)[:2000],
    }  # fmt: skip
    try:
        folder = out_dir / FAILURES
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank_{rank:05d}.json").write_text(json.dumps(record))
    except OSError:
        pass


LOST_PEER = re.compile(
    r"Connection closed by peer|Connection reset|Broken pipe|timed? ?out|remote process exited|communicator was aborted",
    re.IGNORECASE,
)
"""What a rank raises when a peer died or hung: a consequence, never the cause."""


def first_failure(out_dir: Path) -> dict | None:
    """The failure record that explains a run's end: the earliest rank that failed for its own
    reason, not a peer that then lost its connection to it (those get ``lost_peer``: true, and are
    returned only when no rank recorded a cause of its own), or None."""
    records = []
    for f in sorted((out_dir / FAILURES).glob("rank_*.json")):
        try:
            records.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    for r in records:
        r["lost_peer"] = bool(LOST_PEER.search(r["message"]))
    causes = [r for r in records if not r["lost_peer"]] or records
    return min(causes, key=lambda r: r["time"]) if causes else None


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, ValueError):
        return EXIT_USAGE
    if isinstance(exc, RunError):
        return exc.exit_code
    return EXIT_OS if isinstance(exc, OSError) else 1
