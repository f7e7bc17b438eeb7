"""Starting jobs through the real `deepspeed` launcher, safely, from Python.

:func:`run_training` is the one way a front end (`ds-upcycle train`, demo, bench, ablate, the
tests) starts a training run: validate, launch, and read the run's summary back.

User strings are passed as an argument list, never through a shell. Hostfiles are checked
before any process starts. DeepSpeed's CPU comm op leaves a ~69 MB
/dev/shm/deepspeed_allreduce_buffer_* file per (master port, rank) and never removes it
(deepspeed/ops/csrc/cpu/comm/shm.cpp); :func:`run_launcher` removes the ones its run created and
stale ones of its port. Signals, orphans and the wait for every process of the run:
``ds_upcycle.lifecycle``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ds_upcycle import lifecycle
from ds_upcycle.errors import EXIT_PREEMPTED

_HOST_LINE = re.compile(r"^\s*(\S+)\s+slots=(\d+)\s*$")


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Parse a DeepSpeed hostfile (``host slots=N`` lines, ``#`` comments), or raise ValueError
    naming the file, the line and the fix."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"hostfile ({str(path)!r}) does not exist; see hostfiles/ for examples")
    hosts: dict[str, int] = {}
    for n, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOST_LINE.match(line)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"hostfile {str(path)!r} line {n} ({raw.strip()!r}) must be 'HOST slots=N' with N >= 1")
        if m.group(1) in hosts:
            raise ValueError(f"hostfile {str(path)!r} line {n} repeats host {m.group(1)!r}; list each host once")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ValueError(f"hostfile {str(path)!r} lists no hosts; add lines like 'localhost slots=2'")
    return hosts


def is_local(hosts: dict[str, int]) -> bool:
    return list(hosts) in (["localhost"], ["127.0.0.1"])


def world_size(num_gpus: int | None, hostfile: str | Path | None) -> int:
    """The number of ranks a launch will start: a multi-host hostfile's slots, else num_gpus (1)."""
    if hostfile is not None:
        hosts = read_hostfile(hostfile)
        if not (num_gpus and is_local(hosts)):
            return sum(hosts.values())
    return num_gpus or 1


def launcher_cmd(
    module: str,
    args: list[str],
    *,
    num_gpus: int | None = None,
    hostfile: str | Path | None = None,
    master_port: int | None = None,
) -> list[str]:
    """The `deepspeed ... --module MODULE ARGS` argument list.

    A single-host hostfile (localhost) gets ``--no_ssh_check --master_addr 127.0.0.1``, which a
    machine without an ssh server needs. ``num_gpus`` and a multi-host hostfile conflict (the
    launcher would silently take the hostfile's slots) and are refused.
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile is not None:
        hosts = read_hostfile(hostfile)
        if num_gpus is not None and not is_local(hosts):
            raise ValueError(
                f"--num_gpus ({num_gpus}) conflicts with multi-host hostfile {str(hostfile)!r}; "
                "set slots in the hostfile instead"
            )
        cmd += ["--hostfile", str(hostfile)]
        if is_local(hosts):
            cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1"]
    else:
        cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1"]
    if num_gpus is not None:
        if num_gpus < 1:
            raise ValueError(f"--num_gpus ({num_gpus}) must be >= 1")
        cmd += ["--num_gpus", str(num_gpus)]
    if master_port is not None:
        cmd += ["--master_port", str(master_port)]
    return cmd + ["--module", module, *args]


@contextlib.contextmanager
def shm_cleanup():
    """Remove the /dev/shm/deepspeed_* files created while the block runs (DeepSpeed's CPU comm op
    never does), except those a live process still holds (another run's)."""
    before = lifecycle.shm_buffers()
    try:
        yield
    finally:
        lifecycle.remove_unheld(lifecycle.shm_buffers() - before)


def _master_port(cmd: list[str]) -> int:
    """The launcher's --master_port (deepspeed/launcher/runner.py defaults it to 29500)."""
    for i, a in enumerate(cmd[:-1]):
        if a == "--master_port":
            return int(cmd[i + 1])
    return 29500


def run_launcher(
    cmd: list[str], env: dict | None = None, *, capture_output: bool = False, text: bool = False,
    timeout: float | None = None, cwd: str | Path | None = None, grace_s: float = 150.0,
) -> subprocess.CompletedProcess:  # fmt: skip
    """Run a launcher command (no shell) until every process of its run has exited
    (:func:`ds_upcycle.lifecycle.supervise`: signals, orphans, ``grace_s``); remove stale /dev/shm
    buffers of its port first and the ones this run created after."""
    lifecycle.remove_stale_shm(_master_port(cmd))
    with shm_cleanup():
        return lifecycle.supervise(
            cmd, {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd, capture=capture_output, text=text,
            timeout=timeout, grace_s=grace_s,
        )  # fmt: skip


def launch_module(
    module: str, args: list[str], *, num_gpus: int | None = None, hostfile: str | Path | None = None,
    master_port: int | None = None, env: dict | None = None, **kwargs,
) -> subprocess.CompletedProcess:  # fmt: skip
    """Run ``deepspeed ... --module MODULE ARGS`` to completion (subprocess.run keyword arguments
    pass through, e.g. capture_output, timeout, cwd)."""
    cmd = launcher_cmd(module, args, num_gpus=num_gpus, hostfile=hostfile, master_port=master_port)
    return run_launcher(cmd, env=env, **kwargs)


@dataclass
class TrainingRun:
    """What a finished `ds_upcycle.train` launch left: exit code, output (when captured), summary."""

    returncode: int
    output_dir: Path
    stdout: str = ""
    stderr: str = ""
    summary: dict | None = None
    """The run's summary.json (None when the run failed)."""
    preempted: dict | None = None
    """How a stopped run ended (reason, step, checkpoint; lifecycle.PREEMPTED), or None."""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_training(
    config: str | Path, overrides: list[str], *, num_gpus: int | None = None, hostfile: str | Path | None = None,
    master_port: int | None = None, env: dict | None = None, capture: bool = False, timeout: float | None = None,
    cwd: str | Path | None = None,
) -> TrainingRun:  # fmt: skip
    """Validate a run against the world the launcher will start, launch it, and read its summary.

    ValueError (before any process starts) for a bad config, hostfile or layout.
    """
    from ds_upcycle.config import load_run_config, resolve_config
    from ds_upcycle.preflight import validate

    path = resolve_config(config).resolve()
    cfg = load_run_config(path, overrides)
    validate(cfg, world_size(num_gpus, hostfile))
    started = time.time()
    proc = launch_module(
        "ds_upcycle.train", [str(path), *overrides], num_gpus=num_gpus, hostfile=hostfile, master_port=master_port,
        env=env, capture_output=capture, text=True, timeout=timeout, cwd=cwd,
        grace_s=cfg.train.preempt_save_timeout_s + 30,
    )  # fmt: skip
    out = Path(cwd or ".") / cfg.train.output_dir
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if proc.returncode == 0 and summary_file.is_file() else None
    preempted = lifecycle.read_preempted(out, since=started)
    returncode = EXIT_PREEMPTED if preempted else proc.returncode  # launch.py's own exit code may be 1
    return TrainingRun(returncode, out, proc.stdout or "", proc.stderr or "", summary, preempted)
