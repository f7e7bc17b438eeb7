"""Starting jobs through the real `deepspeed` launcher, safely, from Python.

:func:`run_training` is the one way a front end (`ds-upcycle train`, demo, bench, ablate, the
tests) starts a training run: validate, launch, and read the run's summary back.

User strings are passed as an argument list, never through a shell. Hostfiles are checked
before any process starts. DeepSpeed's CPU comm op leaves a ~69 MB
/dev/shm/deepspeed_allreduce_buffer_* file per (master port, rank) and never removes it
(deepspeed/ops/csrc/cpu/comm/shm.cpp); :func:`run_launcher` removes the ones its run created and
stale ones of its port. Signals, orphans and the wait for every process of a run on one host:
``ds_upcycle.lifecycle``.

Across hosts (a hostfile naming other hosts) DeepSpeed's runner starts every host's
``deepspeed.launcher.launch`` through pdsh, i.e. through a remote shell (multinode_runner.py,
``PDSHRunner``), which strips quotes from arguments. So the front end never hands the run's
settings to the ranks as arguments: it writes the resolved config into ``<output_dir>/launch.json``
and the ranks read that one file (:func:`write_launch_file`, :func:`read_launch_file`). It also
checks every host over ssh before anything starts (:func:`check_hosts`) and supervises the job
(:func:`supervise_hosts`): when one host's launcher fails and another keeps running (a stopped or
hung rank never ends, and pdsh waits for it), it stops what is left of the run by the PIDs the ranks
recorded (:func:`record_rank`, :func:`stop_ranks`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ds_upcycle.config import RunConfig

from ds_upcycle import lifecycle
from ds_upcycle.errors import EXIT_PREEMPTED

_HOST_LINE = re.compile(r"^\s*(\S+)\s+slots=(\d+)\s*$")
MAX_SLOTS = 1024
"""Ranks per host, at most: far beyond any machine; catches typos before they exhaust memory."""


def read_hostfile(path: str | Path) -> dict[str, int]:
    """Parse a DeepSpeed hostfile (``host slots=N`` lines, ``#`` comments), or raise ValueError
    naming the file, the line and the fix."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"hostfile ({str(path)!r}) is a folder; give a file of 'HOST slots=N' lines (see hostfiles/)")
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
        if int(m.group(2)) > MAX_SLOTS:
            raise ValueError(f"hostfile {str(path)!r} line {n} ({raw.strip()!r}) has more than {MAX_SLOTS} slots")
        if m.group(1) in hosts:
            raise ValueError(f"hostfile {str(path)!r} line {n} repeats host {m.group(1)!r}; list each host once")
        hosts[m.group(1)] = int(m.group(2))
    if not hosts:
        raise ValueError(f"hostfile {str(path)!r} lists no hosts; add lines like 'localhost slots=2'")
    return hosts


def is_local(hosts: dict[str, int]) -> bool:
    return list(hosts) in (["localhost"], ["127.0.0.1"])


def add_world_arguments(p) -> None:
    """--num-gpus and --hostfile, as every command that counts the world with :func:`world_size` takes them."""
    p.add_argument(
        "--num-gpus", type=int, default=None,
        help="ranks on this machine (default: every local device, as the deepspeed launcher counts them; "
        "1 CPU rank per NUMA node)",
    )  # fmt: skip
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (see hostfiles/); world size = its slots")


def world_size(num_gpus: int | None, hostfile: str | Path | None) -> int:
    """The number of ranks the launcher will start, counted as deepspeed/launcher/runner.py (main)
    counts them: a hostfile's slots (its default /job/hostfile too, when it exists), each host cut to
    num_gpus when given; else num_gpus; else the devices CUDA_VISIBLE_DEVICES lists; else every local
    device the accelerator counts (a CPU counts its NUMA nodes with cores, or LOCAL_SIZE)."""
    from deepspeed.launcher.runner import DLTS_HOSTFILE

    if num_gpus is not None and not 1 <= num_gpus <= MAX_SLOTS:
        raise ValueError(f"--num-gpus ({num_gpus}) must be between 1 and {MAX_SLOTS}")
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
    master_addr: str | None = None,
    ssh_port: int | None = None,
    ssh_check: bool = True,
) -> list[str]:
    """The `deepspeed ... --module MODULE ARGS` argument list.

    A single-host hostfile (localhost) gets ``--no_ssh_check --master_addr 127.0.0.1``, which a
    machine without an ssh server needs. ``num_gpus`` and a multi-host hostfile conflict (the
    launcher would silently take the hostfile's slots) and are refused. ``master_addr`` and
    ``ssh_port`` only mean something across hosts; ``ssh_check=False`` skips DeepSpeed's own ssh
    check of the first host (for callers that checked every host, see :func:`check_hosts`).
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner"]
    hosts = read_hostfile(hostfile) if hostfile is not None else {"localhost": 1}
    local = is_local(hosts)
    if local and (master_addr is not None or ssh_port is not None):
        flag = "--master-addr" if master_addr is not None else "--ssh-port"
        raise ValueError(
            f"{flag} is for a hostfile that names other hosts; a launch on this machine alone uses 127.0.0.1 "
            "without ssh (drop the flag, or give --hostfile with the hosts)"
        )
    if ssh_port is not None and not 1 <= ssh_port <= 65535:
        raise ValueError(f"--ssh-port ({ssh_port}) must be a TCP port, 1..65535")
    if hostfile is not None:
        if num_gpus is not None and not local:
            raise ValueError(
                f"--num_gpus ({num_gpus}) conflicts with multi-host hostfile {str(hostfile)!r}; "
                "set slots in the hostfile instead"
            )
        cmd += ["--hostfile", str(hostfile)]
    if local:
        cmd += ["--no_ssh_check", "--master_addr", "127.0.0.1"]
    else:
        if master_addr is not None:
            cmd += ["--master_addr", master_addr]
        if ssh_port is not None:
            cmd += ["--ssh_port", str(ssh_port)]
        if not ssh_check:
            cmd += ["--no_ssh_check"]
    if num_gpus is not None:
        if not 1 <= num_gpus <= MAX_SLOTS:
            raise ValueError(f"--num-gpus ({num_gpus}) must be between 1 and {MAX_SLOTS}")
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


# --------------------------------------------------------------------------------------------
# What every rank reads: the resolved config and the forwarded environment, in one file
# --------------------------------------------------------------------------------------------

LAUNCH_FILE = "launch.json"
"""``<output_dir>/launch.json``: the resolved config (after overrides) and the forwarded
environment, written by :func:`run_training` and read by every rank (``ds_upcycle.train
--launch-file=FILE``). ``<output_dir>/config.json`` stays what rank 0 ran with."""

RANKS_DIR = "ranks"
"""``<output_dir>/ranks/rank_NNNNN.json``: where each rank of the current launch ran (node, PIDs,
threads, a digest of the config it read), written by :func:`record_rank`."""

FORWARDED_ENV = (
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "GLOO_SOCKET_IFNAME", "WANDB_MODE", "WANDB_DIR", "WANDB_ENTITY",
    "WANDB_BASE_URL", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_DATASETS_CACHE",
    "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
)  # fmt: skip
"""Variables of the launching environment that every rank gets, on every host. pdsh starts the
ranks of every host (the first one too) in that host's login environment plus what DeepSpeed's
runner exports: names starting with PYTHON, MLFLOW, MV2 or UCX, the accelerator's (NCCL on GPUs),
and the lines of ``.deepspeed_env`` in ``~`` or the working directory (runner.py, EXPORT_ENVS and
DEEPSPEED_ENVIRONMENT_PATHS). Secrets (WANDB_API_KEY, HF_TOKEN) are never forwarded, because the
launch file is written to the run folder: use ``wandb login`` on a shared home."""

# DeepSpeed's pdsh runner `cd`s into the working directory unquoted and re-quotes only arguments
# with spaces (multinode_runner.py, PDSHRunner): any other character a shell interprets would be
# interpreted on the remote hosts.
_SHELL_SAFE_ARG = re.compile(r"^[\w@%+=:,./ -]+$")
_SHELL_SAFE_DIR = re.compile(r"^[\w@%+=:,./-]+$")


def forwarded_env(env: dict[str, str]) -> dict[str, str]:
    return {k: env[k] for k in FORWARDED_ENV if k in env}


def config_digest(cfg: RunConfig) -> str:
    """SHA-256 of a RunConfig's resolved dict: every rank must have read the same config."""
    return hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_launch_file(out_dir: Path, cfg: RunConfig, source: Path, overrides: list[str], env: dict[str, str]) -> Path:
    """Write ``<out_dir>/launch.json`` (and clear the previous launch's rank records)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / RANKS_DIR, ignore_errors=True)
    spec = {"source": str(source), "overrides": overrides, "env": env, "config": cfg.to_dict()}
    path = out_dir / LAUNCH_FILE
    _atomic_write(path, json.dumps(spec, indent=2))
    return path


def read_launch_file(path: str | Path) -> tuple[RunConfig, dict[str, str]]:
    """(RunConfig, forwarded environment) of a launch file, or ValueError naming it."""
    from ds_upcycle.config import run_config_from_dict

    try:
        spec = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(
            f"launch file {str(path)!r} cannot be read on host {socket.gethostname()} ({e}); every host must see "
            "the output folder at the same path (a shared filesystem)"
        ) from None
    return run_config_from_dict(spec["config"], source=spec.get("source", str(path))), dict(spec.get("env", {}))


def apply_env(env: dict[str, str]) -> None:
    """Set the forwarded variables in this rank. torch is already imported, so its thread pool
    is resized by hand (OpenMP reads OMP_NUM_THREADS only once, when it loads)."""
    import torch

    os.environ.update(env)
    if env.get("OMP_NUM_THREADS", "").isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))


def record_rank(cfg: RunConfig) -> Path:
    """Write where this rank runs into ``<output_dir>/ranks/``: the front end names hosts and
    ranks from it when a job fails, and stops left-over processes by these PIDs."""
    import torch

    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank, "local_rank": int(os.environ.get("LOCAL_RANK", "0")),
        "node_rank": int(os.environ.get("CROSS_RANK", "0")), "hostname": socket.gethostname(), "pid": os.getpid(),
        "launcher_pid": os.getppid(), "threads": torch.get_num_threads(), "config_sha256": config_digest(cfg),
        "env": {k: os.environ.get(k) for k in cfg.debug.report_env},
    }  # fmt: skip
    folder = Path(cfg.train.output_dir) / RANKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank_{rank:05d}.json"
    _atomic_write(path, json.dumps(record, indent=2))
    return path


def rank_records(out_dir: str | Path) -> list[dict]:
    folder = Path(out_dir) / RANKS_DIR
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank_*.json"))] if folder.is_dir() else []


# --------------------------------------------------------------------------------------------
# Across hosts: check them first, watch the job, stop what a failure leaves behind
# --------------------------------------------------------------------------------------------

SSH_CONNECT_TIMEOUT_S = 10
STRAGGLER_GRACE_S = 3.0
"""After one host's launcher fails, how long the other hosts get to end by themselves (their ranks
see the broken connections within seconds) before the front end stops what is left of the run. A
stopped or hung rank never ends, and pdsh would wait for it forever."""

_PDSH_EXIT = re.compile(r"^pdsh@\S+: (\S+): ssh exited with exit code (\d+)")
_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped", "t": "stopped by a tracer"}


def _ssh(host: str, ssh_port: int | None, *remote: str) -> list[str]:
    port = ["-p", str(ssh_port)] if ssh_port is not None else []
    return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_CONNECT_TIMEOUT_S}", *port, host, *remote]


def _in_parallel(fn, items: list) -> list:
    results: dict[int, object] = {}
    threads = [threading.Thread(target=lambda i=i, x=x: results.__setitem__(i, fn(x))) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(items))]


def check_hosts(hosts: list[str], ssh_port: int | None, env: dict[str, str], hostfile: str | Path) -> None:
    """ssh to every host, in parallel, before anything starts: an unreachable host is an error
    naming it within seconds, not ranks waiting train.timeout_s for a peer that never comes.
    (DeepSpeed's runner checks only the first host: runner.py, main.)"""
    path = env.get("PATH", os.defpath)
    for tool, package in (("ssh", "openssh-client"), ("pdsh", "pdsh")):
        if shutil.which(tool, path=path) is None:
            raise ValueError(
                f"hostfile {str(hostfile)!r} names other hosts, which DeepSpeed reaches with pdsh over ssh, but "
                f"{tool!r} is not installed here; install it (Debian: apt-get install -y {package})"
            )

    def probe(host: str) -> str:
        try:
            r = subprocess.run(_ssh(host, ssh_port, "true"), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=SSH_CONNECT_TIMEOUT_S + 20)  # fmt: skip
        except subprocess.TimeoutExpired:
            return "no answer"
        return "" if r.returncode == 0 else (r.stderr.strip().splitlines() or [f"exit code {r.returncode}"])[-1]

    bad = [(h, why) for h, why in zip(hosts, _in_parallel(probe, hosts), strict=True) if why]
    if bad:
        port = f" -p {ssh_port}" if ssh_port is not None else ""
        raise ValueError(
            "; ".join(f"host {h} (hostfile {str(hostfile)!r}) is not reachable over ssh: {why}" for h, why in bad)
            + f". Every host must accept passwordless ssh from this one; check with `ssh{port} {bad[0][0]} true`"
        )


def check_remote_paths(launch_file: Path, cwd: Path) -> None:
    if not _SHELL_SAFE_ARG.match(str(launch_file)):
        raise ValueError(
            f"train.output_dir ({str(launch_file.parent)!r}) has characters the remote shell of a multi-host launch "
            "would interpret; use letters, digits, spaces and ._-/ only"
        )
    if not _SHELL_SAFE_DIR.match(str(cwd)):
        raise ValueError(
            f"the working directory ({str(cwd)!r}) has characters the remote shell of a multi-host launch would "
            "interpret (DeepSpeed cds into it unquoted); start from a folder named with letters, digits and ._-/"
        )


def stop_ranks(
    out_dir: Path, hosts: list[str], ssh_port: int | None, env: dict[str, str], marker: str, sig: str = "KILL",
    ranks_only: bool = False,
) -> list[str]:  # fmt: skip
    """Send ``sig`` (SIGKILL by default) to the processes of this run that are still alive: each
    host's launcher and ranks (or, with ``ranks_only``, the ranks), by the PIDs the ranks recorded,
    and only where the process's command line still holds ``marker`` (so a reused PID is never hit).
    Returns one line per process signalled. SIGTERM to the ranks is a preemption request: each rank's
    RankGuard (ds_upcycle/lifecycle.py) finishes its step, all save, and they exit 75.

    Never SIGTERM DeepSpeed's runner for this: its handler runs ``pkill -f`` on the command line
    every host's launcher shares (runner.py, sigkill_handler; multinode_runner.py, kill_command),
    which would also stop every other DeepSpeed job on those hosts. And a stopped rank ignores
    SIGTERM until it is continued (deepspeed/launcher/launch.py waits 30 s before its SIGKILL)."""
    targets: dict[int, dict[int, str]] = {}
    for r in rank_records(out_dir):
        pids = targets.setdefault(r["node_rank"], {})
        if not ranks_only:
            pids.setdefault(r["launcher_pid"], "the launcher")
        pids[r["pid"]] = f"rank {r['rank']}"
    work = [(hosts[n], pids) for n, pids in sorted(targets.items()) if n < len(hosts)]

    def stop(item) -> list[str]:
        host, pids = item
        script = (
            f"M={shlex.quote(marker)}; for p in {' '.join(map(str, pids))}; do "
            "c=$(tr '\\0' ' ' 2>/dev/null </proc/$p/cmdline) || continue; case \"$c\" in *\"$M\"*) "
            f"s=$(sed -n 's/.*) \\(.\\) .*/\\1/p' /proc/$p/stat); kill -{sig} $p 2>/dev/null && echo \"$p $s\";; "
            "esac; done; true"
        )
        try:
            r = subprocess.run(_ssh(host, ssh_port, script), env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=SSH_CONNECT_TIMEOUT_S + 20)  # fmt: skip
        except subprocess.TimeoutExpired:
            return [f"{host}: no answer over ssh; its processes could not be checked"]
        lines = []
        for line in r.stdout.splitlines():
            pid, _, state = line.partition(" ")
            if pid.isdigit() and int(pid) in pids:
                lines.append(f"{pids[int(pid)]} on {host} (pid {pid}, {_STATES.get(state, state or '?')})")
        return lines

    return [line for lines in _in_parallel(stop, work) for line in lines]


class _Reader:
    """Reads one output stream of the runner line by line, echoing it (or keeping it), and notes
    each host whose launcher exited non-zero, as pdsh reports it on stderr."""

    def __init__(self, stream, sink, keep: bool, exits: list | None = None):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=self._read, args=(stream, sink, keep, exits), daemon=True)
        self.thread.start()

    def _read(self, stream, sink, keep: bool, exits: list | None) -> None:
        for line in stream:
            if keep:
                self.lines.append(line)
            else:
                sink.write(line)
                sink.flush()
            m = _PDSH_EXIT.match(line) if exits is not None else None
            if m and int(m[2]) != 0:
                exits.append((m[1], int(m[2]), time.monotonic()))

    def text(self) -> str:
        self.thread.join(timeout=10)
        return "".join(self.lines)


def _kill_local_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the runner and what it started here (pdsh, ssh clients): all children of ours."""
    import psutil

    try:
        runner = psutil.Process(proc.pid)
        family = [runner, *runner.children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()


def _exit_meaning(code: int) -> str:
    if code == 255:
        return "its ssh session ended with code 255: the connection was lost, or the host's processes were killed"
    return f"its launcher exited with code {code}"


@dataclass
class MultiHostJob:
    """What the front end knows of a running multi-host job, and what it saw go wrong."""

    hosts: list[str]
    ssh_port: int | None
    out_dir: Path
    marker: str
    env: dict[str, str]
    grace_s: float = 150.0
    """After a stop request, how long the ranks have to save and exit before everything is killed."""
    exits: list = field(default_factory=list)
    """(host, exit code, time) of each host whose launcher failed, in order, as pdsh reports them."""
    stopped: list[str] = field(default_factory=list)
    stopped_at: float | None = None

    def request_stop(self) -> list[str]:
        """Preemption across hosts: SIGTERM every rank (never DeepSpeed's runner, whose handler would
        pkill every DeepSpeed job on the hosts, nor launch.py, which SIGKILLs its ranks 30 s later)."""
        return stop_ranks(self.out_dir, self.hosts, self.ssh_port, self.env, self.marker, "TERM", ranks_only=True)

    def stop_left_overs(self) -> None:
        began = time.monotonic()
        lines = stop_ranks(self.out_dir, self.hosts, self.ssh_port, self.env, self.marker)
        if lines and self.stopped_at is None:
            self.stopped_at = began
        self.stopped += lines

    def note(self) -> str:
        """The front end's account of a failed multi-host job: which host failed first, what was
        left running and stopped."""
        if not self.exits and not self.stopped:
            return ""
        lines = []
        if self.exits:
            host, code, _ = self.exits[0]
            lines.append(f"host {host} failed first ({_exit_meaning(code)})")
            for h, c, at in self.exits[1:]:
                why = "once ds-upcycle stopped its processes" if self.stopped_at and at >= self.stopped_at else ""
                lines.append(f"then host {h} ({why or _exit_meaning(c)})")
        if self.stopped:
            lines.append(f"left running, so stopped by ds-upcycle: {'; '.join(self.stopped)}")
        return "ds-upcycle: the multi-host job failed: " + "; ".join(lines) + "\n"


def supervise_hosts(
    cmd: list[str], job: MultiHostJob, *, capture: bool, timeout: float | None, cwd: str | Path | None
) -> tuple[int, str, str]:
    """Run a multi-host launcher command: (returncode, stdout, stderr) with the output kept when
    ``capture``, else echoed. Once a host's launcher has failed and the job has not ended
    STRAGGLER_GRACE_S later, what is left of the run is stopped (:func:`stop_ranks`)."""
    proc = subprocess.Popen(
        cmd, env=job.env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE, text=True, errors="replace", start_new_session=True,
    )  # fmt: skip
    err = _Reader(proc.stderr, sys.stderr, capture, job.exits)
    out = _Reader(proc.stdout, sys.stdout, True) if capture else None
    start, stopped_at, stop_requested_at = time.monotonic(), None, None
    signals: list[int] = []
    on_main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda n, _: signals.append(n)) for s in lifecycle.STOP_SIGNALS} if on_main else {}
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            now = time.monotonic()
            if signals and stop_requested_at is None:  # the first SIGTERM/SIGINT: the ranks save and exit
                stop_requested_at = now
                print("[ds_upcycle] stop requested: every rank finishes its step, saves a checkpoint and exits",
                      file=sys.stderr, flush=True)  # fmt: skip
                job.request_stop()
            if len(signals) > 1 or (stop_requested_at is not None and now - stop_requested_at > job.grace_s):
                job.stop_left_overs()  # a second signal, or a save past its grace: stop at once
                _kill_local_tree(proc)
                break
            if (
                stop_requested_at is None
                and stopped_at is None
                and job.exits
                and now - job.exits[0][2] > STRAGGLER_GRACE_S
            ):
                stopped_at = now
                job.stop_left_overs()
            elif stopped_at is not None and now - stopped_at > SSH_CONNECT_TIMEOUT_S + 20:
                _kill_local_tree(proc)  # pdsh still waits on a host we could not reach
            if timeout is not None and now - start > timeout:
                raise subprocess.TimeoutExpired(cmd, timeout)
    except BaseException:  # a timeout, Ctrl-C or SIGTERM: leave nothing of the run behind
        job.stop_left_overs()
        _kill_local_tree(proc)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if len(signals) > 1:
        return 128 + signals[-1], out.text() if out else "", err.text()
    if stop_requested_at is not None:  # preempted: the ranks saved and exited 75; no failure to explain
        return proc.returncode, out.text() if out else "", err.text()
    if proc.returncode != 0 and stopped_at is None:
        job.stop_left_overs()  # e.g. ranks whose host's session died under them
    note = job.note() if proc.returncode != 0 else ""
    stderr = err.text()
    if note and capture:
        stderr += note
    elif note:
        sys.stderr.write(note)
    return proc.returncode, out.text() if out else "", stderr


@dataclass
class TrainingRun:
    """What a finished `ds_upcycle.train` launch left: exit code, output (when captured), summary."""

    returncode: int
    output_dir: Path
    stdout: str = ""
    stderr: str = ""
    summary: dict | None = None
    """The run's summary.json (None when the run failed)."""
    note: str = ""
    """The front end's account of a failed multi-host job (the host that failed first, the
    processes it stopped); also printed, or appended to ``stderr`` when captured."""
    failure: dict | None = None
    """The earliest failure record a rank left (ds_upcycle.errors.first_failure), when it failed."""
    preempted: dict | None = None
    """How a stopped run ended (reason, step, checkpoint; lifecycle.PREEMPTED), or None."""

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def prepare_data(cfg, global_batch: int, cwd: str | Path | None, progress: bool) -> None:
    """Tokenise the run's data into its cache here, before the launch (ds_upcycle.data.prepare_run),
    so the ranks only open it. Paths in the config are relative to the run's ``cwd``."""
    from ds_upcycle.data import prepare_run

    here = os.getcwd()
    os.chdir(cwd or here)
    try:
        prepare_run(cfg, global_batch, progress=progress)
    finally:
        os.chdir(here)


def run_training(
    config: str | Path, overrides: list[str], *, num_gpus: int | None = None, hostfile: str | Path | None = None,
    master_port: int | None = None, master_addr: str | None = None, ssh_port: int | None = None,
    env: dict | None = None, capture: bool = False, timeout: float | None = None, cwd: str | Path | None = None,
) -> TrainingRun:  # fmt: skip
    """Validate a run against the world the launcher will start, prepare its data, launch it, and
    read its summary.

    The resolved config goes to the ranks in ``<output_dir>/launch.json``, never as arguments (a
    multi-host launch passes arguments through a remote shell). With a hostfile naming other
    hosts, every host is checked over ssh first and the job is supervised (:func:`supervise`).
    ValueError (before any process starts or any file is written) for a bad config, hostfile,
    layout or unreachable host.
    """
    from ds_upcycle.config import load_run_config, resolve_config
    from ds_upcycle.errors import FAILURES, first_failure
    from ds_upcycle.preflight import validate

    path = resolve_config(config).resolve()
    cfg = load_run_config(path, overrides)
    world = world_size(num_gpus, hostfile)
    hosts = list(read_hostfile(hostfile)) if hostfile is not None else ["localhost"]
    multi = not is_local(dict.fromkeys(hosts, 1))
    try:
        derived = validate(cfg, world)
    except ValueError as e:
        if not multi:
            raise
        raise ValueError(f"{e} (world size {world} = the slots of hostfile {str(hostfile)!r})") from None
    workdir = Path(cwd or ".").resolve()
    out = workdir / cfg.train.output_dir
    launch_file = out / LAUNCH_FILE
    marker = f"--launch-file={launch_file}"
    cmd = launcher_cmd(
        "ds_upcycle.train", [marker], num_gpus=num_gpus, hostfile=hostfile, master_port=master_port,
        master_addr=master_addr, ssh_port=ssh_port, ssh_check=not multi,
    )  # fmt: skip
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    if multi:
        check_remote_paths(launch_file, workdir)
        check_hosts(hosts, ssh_port, full_env, hostfile)
    prepare_data(cfg, derived.global_batch, cwd, progress=not capture)  # a bad data file fails here, not in ranks
    shutil.rmtree(out / FAILURES, ignore_errors=True)  # an earlier launch's records
    write_launch_file(out, cfg, path, overrides, forwarded_env(full_env))
    started = time.time()
    note = ""
    if multi:
        job = MultiHostJob(hosts, ssh_port, out, marker, full_env, grace_s=cfg.train.preempt_save_timeout_s + 30)
        with shm_cleanup():
            returncode, stdout, stderr = supervise_hosts(cmd, job, capture=capture, timeout=timeout, cwd=cwd)
        note = job.note() if returncode != 0 else ""
    else:
        proc = run_launcher(cmd, env=full_env, capture_output=capture, text=True, timeout=timeout, cwd=cwd,
                            grace_s=cfg.train.preempt_save_timeout_s + 30)  # fmt: skip
        returncode, stdout, stderr = proc.returncode, proc.stdout or "", proc.stderr or ""
    summary_file = out / "summary.json"
    summary = json.loads(summary_file.read_text()) if returncode == 0 and summary_file.is_file() else None
    preempted = lifecycle.read_preempted(out, since=started)
    returncode = EXIT_PREEMPTED if preempted else returncode  # launch.py's own exit code may be 1
    failure = first_failure(out) if returncode not in (0, EXIT_PREEMPTED) else None
    return TrainingRun(returncode, out, stdout, stderr, summary, note, failure, preempted)
