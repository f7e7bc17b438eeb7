"""Starting jobs through the real `deepspeed` launcher, safely, from Python.

:func:`run_training` is the one way a front end (`ds-upcycle train`, demo, bench, ablate, the
tests) starts a training run: validate, launch, and read the run's summary back.

User strings are passed as an argument list, never through a shell. Hostfiles are checked
before any process starts. DeepSpeed's CPU comm op leaves a ~69 MB
/dev/shm/deepspeed_allreduce_buffer_* file per (master port, rank) and never removes it
(deepspeed/ops/csrc/cpu/comm/shm.cpp); :func:`run_launcher` removes the ones its run created.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
    """The number of ranks the launcher will start, counted as deepspeed/launcher/runner.py (main)
    counts them: a hostfile's slots (its default /job/hostfile too, when it exists), each host cut to
    num_gpus when given; else num_gpus; else the devices CUDA_VISIBLE_DEVICES lists; else every local
    device the accelerator counts (a CPU counts its NUMA nodes with cores, or LOCAL_SIZE)."""
    from deepspeed.launcher.runner import DLTS_HOSTFILE

    if hostfile is None and Path(DLTS_HOSTFILE).is_file():
        hostfile = DLTS_HOSTFILE
    if hostfile is not None:
        hosts = read_hostfile(hostfile)
        return num_gpus * len(hosts) if num_gpus else sum(hosts.values())
    if num_gpus:
        return num_gpus
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    visible = os.environ.get(accelerator.visible_devices_envs()[0], "")
    return len(visible.split(",")) if visible else accelerator.device_count()


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


def _shm_files() -> set[Path]:
    shm = Path("/dev/shm")
    return set(shm.glob("deepspeed_*")) if shm.is_dir() else set()


@contextlib.contextmanager
def shm_cleanup():
    """Remove the /dev/shm/deepspeed_* files created while the block runs (DeepSpeed's CPU comm op
    never does)."""
    before = _shm_files()
    try:
        yield
    finally:
        for f in _shm_files() - before:
            f.unlink(missing_ok=True)


def run_launcher(cmd: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a launcher command (no shell); remove the /dev/shm files this run created."""
    with shm_cleanup():
        return subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, **kwargs)


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
    proc = launch_module(
        "ds_upcycle.train", [str(path), *overrides], num_gpus=num_gpus, hostfile=hostfile, master_port=master_port,
        env=env, capture_output=capture, text=True, timeout=timeout, cwd=cwd,
    )  # fmt: skip
    out = Path(cwd or ".") / cfg.train.output_dir
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if proc.returncode == 0 and summary_file.is_file() else None
    return TrainingRun(proc.returncode, out, proc.stdout or "", proc.stderr or "", summary)
