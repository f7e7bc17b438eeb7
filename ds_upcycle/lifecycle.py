"""The life of a run's processes: preemption, no orphans, no leaked shared memory.

A run started by a front end (`ds-upcycle train`, :func:`ds_upcycle.launch.run_training`) is

    front end -> deepspeed.launcher.runner -> deepspeed.launcher.launch -> one process per rank

and DeepSpeed's own signal handling (deepspeed 0.19.8) cannot be left in charge of a stop:

- runner.py handles SIGTERM/SIGINT only for multi-node pdsh launches; on one node a signal kills it
  alone, and launch.py and the ranks train on, re-parented to init.
- launch.py's ``sigkill_handler`` sends SIGTERM to each rank's process tree in turn and SIGKILLs what
  is left 30 s later (``terminate_process_tree``): a rank signalled that way has 30 s to save.

So the decisions live in our code, at both ends of the tree:

- Ranks (:class:`RankGuard`): SIGTERM/SIGINT only set a flag. After every step the ranks agree on it
  (one ``any_rank`` all-reduce), all save that step, and exit with ``EXIT_PREEMPTED``. A lost
  launcher counts as a signal: a parent-death signal covers launch.py, a watchdog thread covers the
  runner and the front end (the kernel tells a process only about its own parent). The same thread
  ends a rank that a second signal interrupts during the save, or that outlives
  ``train.preempt_save_timeout_s``.
- Front end (:func:`supervise`): starts the runner in its own session (a terminal's Ctrl-C reaches only
  the front end) with a parent-death signal, forwards its first SIGTERM/SIGINT straight to the ranks
  (never through launch.py), kills every process of the run at the second, and waits with a bound.

Shared memory: DeepSpeed's CPU comm op creates one /dev/shm buffer per (port, rank) and never
unlinks it (deepspeed/ops/csrc/cpu/comm/shm.cpp). Ranks unlink their own at exit; the front end
removes what its run left and, before a run, stale buffers of its port that no live process holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import psutil

from ds_upcycle.errors import EXIT_PREEMPT_TIMEOUT, EXIT_PREEMPTED

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
FRONTEND_PID_ENV = "DS_UPCYCLE_FRONTEND_PID"
"""Set by :func:`supervise` for the ranks' watchdog: the front end is part of the run."""
PREEMPTED = "preempted.json"
"""Written into the run folder by rank 0 once a preemption save is complete: why and at which step."""
SHM = Path("/dev/shm")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_LAUNCHER_MODULES = ("deepspeed.launcher.launch", "deepspeed.launcher.runner")


def _libc_prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _libc_prctl()  # looked up once here: a preexec_fn should not load libraries after fork


def set_parent_death_signal(sig: int) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``; it survives execve, so a preexec_fn sets it for a launched program).
    False where unsupported."""
    return _PRCTL is not None and _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0


def _say(message: str) -> None:
    """One line on stderr without Python's stream locks (safe from a signal handler or a thread)."""
    with contextlib.suppress(OSError):
        os.write(2, f"[ds_upcycle] {message}\n".encode())


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def gone(p: psutil.Process) -> bool:
    """True once ``p`` has exited. A zombie counts as exited: it runs nothing, and where PID 1 does
    not reap orphans (some containers) it stays a zombie."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _is_launcher(cmd: list[str]) -> bool:
    """deepspeed.launcher.launch, deepspeed.launcher.runner, or the `deepspeed` console script."""
    return any(m in cmd for m in _LAUNCHER_MODULES) or any(Path(a).name == "deepspeed" for a in cmd[:2])


def run_ancestors() -> list[psutil.Process]:
    """This process's ancestors that belong to its run: launch.py, the runner and the front end that
    started them, up to the first that is none of these (a shell, sshd, a scheduler's daemon)."""
    frontend = os.environ.get(FRONTEND_PID_ENV, "")
    out: list[psutil.Process] = []
    try:
        p = psutil.Process().parent()
        while p is not None and p.pid > 1 and (_is_launcher(_cmdline(p)) or str(p.pid) == frontend):
            out.append(p)
            p = p.parent()
    except psutil.Error:
        pass
    return out


# --------------------------------------------------------------------------------------------
# The rank side
# --------------------------------------------------------------------------------------------


class RankGuard:
    """One rank's side of a stop (see the module docstring).

    ``requested`` turns true at the first SIGTERM/SIGINT, when the launcher or the front end is gone,
    or when a peer rank reports a stop (:meth:`request`). Later signals are ignored until the
    preemption save starts: one stop often reaches a rank several times (a scheduler signals every
    process of a job, and the front end and launch.py forward theirs). A signal during the save, more
    than ``debounce_s`` after the request, ends the rank at once with 128 + the signal number. A rank
    still alive ``deadline_s`` after the request exits with ``EXIT_PREEMPT_TIMEOUT`` (or
    ``EXIT_PREEMPTED`` once its checkpoint is complete).
    """

    poll_s = 0.25

    def __init__(self, deadline_s: float = 120.0, debounce_s: float = 2.0) -> None:
        self.deadline_s = deadline_s
        self.debounce_s = debounce_s
        self.reason = ""
        self.requested_at: float | None = None
        self.in_save = False
        self.saved = False
        self._ancestors: list[psutil.Process] = []
        self._wake_w = -1

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def request(self, reason: str) -> None:
        if self.requested_at is None:
            self.reason, self.requested_at = reason, time.monotonic()

    def install(self) -> RankGuard:
        """Signal handlers, the parent-death signal and the watchdog. Once, early, in the main thread."""
        parent = os.getppid()
        set_parent_death_signal(signal.SIGTERM)  # launch.py gone -> the same path as a SIGTERM
        self._ancestors = run_ancestors()
        if os.getppid() != parent:  # the parent died before prctl took effect
            self.request("the launcher's exit")
        # Python runs signal handlers only between bytecodes of the main thread, which may sit in a
        # long C call (a collective, torch.save). Its C-level handler writes the signal number to the
        # wakeup fd at once: the watchdog thread reads it there and handles every delivery once.
        wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for s in STOP_SIGNALS:
            signal.signal(s, self._handler)
        threading.Thread(target=self._watch, args=(wake_r,), name="ds_upcycle-watchdog", daemon=True).start()
        return self

    def _handler(self, signum: int, frame) -> None:
        # Handle it here only if a library replaced our wakeup fd (then the watchdog never saw it).
        if signal.set_wakeup_fd(self._wake_w) != self._wake_w:
            self._on_signal(signum)

    @contextlib.contextmanager
    def saving(self) -> Iterator[None]:
        """Marks the preemption save: a fresh signal now ends the rank at once."""
        self.in_save = True
        try:
            yield
            self.saved = True
        finally:
            self.in_save = False

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.requested_at is None:
            self.request(name)
        elif self.in_save and time.monotonic() - self.requested_at > self.debounce_s:
            self._exit(128 + signum, f"{name} during the preemption save: stopped at once; nothing new is saved")

    def _watch(self, wake_r: int) -> None:
        while True:
            if select.select([wake_r], [], [], self.poll_s)[0]:
                for signum in os.read(wake_r, 64):
                    if signum in STOP_SIGNALS:
                        self._on_signal(signum)
            if self.requested_at is None and any(gone(p) for p in self._ancestors):
                self.request("the launcher's exit")
            if self.requested_at is not None and time.monotonic() - self.requested_at > self.deadline_s:
                if self.saved:
                    self._exit(EXIT_PREEMPTED, "the checkpoint is complete but the rank did not exit in time")
                self._exit(
                    EXIT_PREEMPT_TIMEOUT,
                    f"no checkpoint within train.preempt_save_timeout_s ({self.deadline_s:g} s) of {self.reason}; "
                    "stopped without one (the previous complete checkpoint stays latest_complete)",
                )

    def _exit(self, code: int, why: str) -> None:
        _say(f"rank {os.environ.get('RANK', '?')}: {why} (exit {code})")
        remove_own_shm_buffer()
        os._exit(code)


def write_preempted(out: Path, info: dict) -> None:
    """Rank 0, after a complete preemption save: the marker the front end reports from."""
    from ds_upcycle.checkpoint import atomic_write_text

    atomic_write_text(out / PREEMPTED, json.dumps(info, indent=2))


def read_preempted(out: Path, since: float) -> dict | None:
    """The preemption marker of a run that ended after ``since`` (time.time()), or None."""
    f = out / PREEMPTED
    try:
        return json.loads(f.read_text()) if f.stat().st_mtime >= since else None
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# The front-end side
# --------------------------------------------------------------------------------------------


def _runner_preexec() -> None:
    # The runner dies with the front end; a runner gone makes the ranks' watchdogs stop them.
    set_parent_death_signal(signal.SIGTERM)


class _Run:
    """The processes of one launch, with the role each had when first seen (orphans keep theirs)."""

    def __init__(self, runner: subprocess.Popen, grace_s: float) -> None:
        self.runner = runner
        self.grace_s = grace_s
        self.procs: dict[psutil.Process, str] = {}
        with contextlib.suppress(psutil.Error):
            self.procs[psutil.Process(runner.pid)] = "runner"
        self.stop_signal: int | None = None
        """The first SIGTERM/SIGINT the front end got (forwarded to the ranks)."""
        self.abort_signal: int | None = None
        """A second one: every process of the run was killed."""
        self.deadline = float("inf")
        """When the run must be over (set by a stop); everything left then is killed."""
        self.overran = False
        self.forwarded: set[psutil.Process] = set()
        self.runner_signalled = False
        self.pending: list[int] = []

    def discover(self) -> None:
        queue = list(self.procs)
        while queue:
            parent = queue.pop()
            try:
                children = parent.children()
            except psutil.Error:
                continue
            for c in children:
                if self.procs.get(c, "other") == "other":  # new, or not yet recognised
                    new = c not in self.procs
                    self.procs[c] = _role(c, self.procs[parent])
                    if new:
                        queue.append(c)

    def alive(self, *roles: str) -> list[psutil.Process]:
        return [p for p, r in self.procs.items() if (not roles or r in roles) and not gone(p)]

    def forward(self, sig: int) -> None:
        for p in self.alive("rank"):
            if p not in self.forwarded:
                self.forwarded.add(p)
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)

    def kill_all(self) -> None:
        for p in self.alive():
            with contextlib.suppress(psutil.Error):
                p.kill()

    def on_signal(self, signum: int) -> None:
        """The signal handler: only records it (it may interrupt poll() itself); poll() acts."""
        self.pending.append(signum)

    def _act(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is None:
            self.stop_signal = signum
            self.deadline = time.monotonic() + self.grace_s
            _say(
                f"{name}: every rank finishes its current step, saves a checkpoint and exits "
                f"(train.preempt_save_timeout_s); send {name} again to stop at once without saving"
            )
        elif self.abort_signal is None:
            self.abort_signal = signum
            self.kill_all()
            _say(f"second {name}: killed every process of the run; nothing new was saved")

    def poll(self) -> None:
        """Periodic work: signals received, new processes, forwarding a stop, the deadline."""
        self.discover()
        while self.pending:
            self._act(self.pending.pop(0))
        now = time.monotonic()
        if self.stop_signal is not None:
            self.forward(self.stop_signal)
            self._signal_remote_launcher()
        if self.runner.poll() is not None and self.alive("launch", "rank") and self.deadline == float("inf"):
            # The runner is gone but the run is not (someone signalled it): the ranks' watchdogs stop
            # them; give them the save's time.
            self.deadline = now + self.grace_s
        if now > self.deadline and self.alive():
            self.overran = True
            self.kill_all()

    def _signal_remote_launcher(self) -> None:
        """Ranks on other hosts (pdsh, mpirun) are out of reach: signal the runner, whose own handler
        stops them (deepspeed/launcher/runner.py, sigkill_handler). Only when it runs such a child
        and no local launch.py (a child younger than 1 s may be launch.py before its exec)."""
        if self.runner_signalled or self.runner.poll() is not None or self.alive("launch", "rank"):
            return
        try:
            children = psutil.Process(self.runner.pid).children()
            remote = any(
                "deepspeed.launcher.launch" not in _cmdline(c) and time.time() - c.create_time() > 1 for c in children
            )
        except psutil.Error:
            return
        if remote:
            self.runner_signalled = True
            self.runner.send_signal(self.stop_signal)

    def returncode(self, runner_rc: int, outlived: bool) -> int:
        if self.abort_signal is not None:
            return 128 + self.abort_signal
        if self.overran:
            return EXIT_PREEMPT_TIMEOUT
        if runner_rc < 0:
            return 128 - runner_rc
        # launch.py killed by a signal: the runner exits 0 (runner.py propagates only codes > 0).
        return 1 if runner_rc == 0 and outlived else runner_rc


def _role(p: psutil.Process, parent_role: str) -> str:
    """By parentage first: just after fork, before exec, a child still shows its parent's cmdline."""
    if parent_role == "launch":
        return "rank"
    if parent_role == "runner" and "deepspeed.launcher.launch" in _cmdline(p):
        return "launch"
    return "other"


@contextlib.contextmanager
def _signals_to(handler: Callable[[int], None]) -> Iterator[None]:
    """SIGTERM/SIGINT call ``handler`` while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.signal(s, lambda signum, frame: handler(signum)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


def supervise(
    cmd: list[str], env: dict, *, cwd=None, capture: bool = False, text: bool = False,
    timeout: float | None = None, grace_s: float = 150.0, poll_s: float = 0.25,
) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a launcher command to the end of every process it starts.

    The first SIGTERM/SIGINT to this process goes to the ranks (they save and exit); a second kills
    the run (exit 128 + signal). A stop, or a runner that dies first, gives the run ``grace_s`` before
    everything left is killed (exit ``EXIT_PREEMPT_TIMEOUT``). ``timeout`` kills the run and raises
    subprocess.TimeoutExpired, like subprocess.run. Call it from the thread that keeps running: the
    runner's parent-death signal fires when the thread that started it exits.
    """
    pipe = subprocess.PIPE if capture else None
    runner = subprocess.Popen(
        cmd, env={**env, FRONTEND_PID_ENV: str(os.getpid())}, cwd=cwd, stdout=pipe, stderr=pipe, text=text,
        start_new_session=True, preexec_fn=_runner_preexec,
    )  # fmt: skip
    run = _Run(runner, grace_s)
    end = float("inf") if timeout is None else time.monotonic() + timeout
    out = err = None
    drained = not capture  # with capture: until every holder of the pipes (launch.py, ranks) has exited
    outlived = False  # launch.py or a rank outlived the runner
    with _signals_to(run.on_signal):
        while True:
            run.poll()
            if runner.poll() is not None:
                left = run.alive("launch", "rank")
                outlived = outlived or bool(left)
                if drained and not left:
                    break
            if time.monotonic() > end:
                run.kill_all()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    out, err = runner.communicate(timeout=30) if not drained else (out, err)
                raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err)
            try:
                if not drained:
                    out, err = runner.communicate(timeout=poll_s)
                    drained = True
                elif runner.poll() is None:
                    runner.wait(timeout=poll_s)
                else:
                    time.sleep(poll_s)
            except subprocess.TimeoutExpired:
                pass
    return subprocess.CompletedProcess(cmd, run.returncode(runner.returncode, outlived), out, err)


# --------------------------------------------------------------------------------------------
# Shared memory
# --------------------------------------------------------------------------------------------


def shm_buffers(port: int | None = None) -> set[Path]:
    """DeepSpeed's /dev/shm buffers (of one master port, or all):
    ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` (deepspeed/ops/csrc/cpu/comm/shm.cpp)."""
    if not SHM.is_dir():
        return set()
    files = set(SHM.glob("deepspeed_*"))
    if port is None:
        return files
    name = re.compile(rf"^deepspeed_allreduce_buffer_\d+_.+_{port}_\d+$")
    return {f for f in files if name.match(f.name)}


def held_open() -> set[str]:
    """/dev/shm paths that a live process holds open or mapped (from /proc/*/fd and /proc/*/maps)."""
    held: set[str] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(f"{SHM}/"):
                        held.add(target)
        with contextlib.suppress(OSError), open(proc / "maps") as maps:
            held.update(line.split(None, 5)[5].strip() for line in maps if f" {SHM}/" in line)
    return held


def remove_unheld(paths: Iterable[Path]) -> list[Path]:
    """Unlink the given /dev/shm files that no live process holds; returns those removed."""
    paths = list(paths)
    held = held_open() if paths else set()
    removed = []
    for p in paths:
        if str(p) not in held:
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def remove_stale_shm(port: int) -> list[Path]:
    """Before a run: the buffers of its port that earlier runs left and no live process holds."""
    return remove_unheld(shm_buffers(port))


def own_shm_buffer() -> Path | None:
    """This rank's DeepSpeed CPU comm buffer (named from MASTER_ADDR, MASTER_PORT and RANK)."""
    env = os.environ
    if not all(k in env for k in ("MASTER_ADDR", "MASTER_PORT", "RANK")):
        return None
    return SHM / f"deepspeed_allreduce_buffer_{os.getuid()}_{env['MASTER_ADDR']}_{env['MASTER_PORT']}_{env['RANK']}"


def remove_own_shm_buffer() -> None:
    """At a rank's exit, after its peers are done with it: unlinking only drops the name, so a peer
    that still maps the buffer keeps it until it exits."""
    path = own_shm_buffer()
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()
