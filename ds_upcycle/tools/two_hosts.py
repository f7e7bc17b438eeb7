"""Two hosts on this machine, for the multi-host tests and for trying a multi-node launch without a
cluster: one sshd listening on two loopback addresses (127.0.0.2 and 127.0.0.3, port 2222) with
its own config, host key, PID file and authorized key, all in one folder.

No user file is touched (nothing in ~/.ssh). The client settings (port, the generated key,
host-key checking off) sit in ``<folder>/ssh_config`` in a ``Host 127.0.0.2 127.0.0.3`` block,
and ``<folder>/bin/ssh`` runs the system ssh with that file (``ssh -F``). With ``<folder>/bin``
first on PATH, DeepSpeed's pre-launch ``ssh HOST hostname`` check (runner.py) and pdsh's ssh
module (which runs ``ssh`` from PATH) both use it. ``run`` does that for one command:

    ds-upcycle two-hosts run -- ds-upcycle train cpu_debug_zero2_ep2 --hostfile {hostfile} \\
        --master-addr 127.0.0.2 --ssh-port 2222

Both "hosts" share this machine's filesystem, as cluster nodes share one: the common set-up. The
ranks connect over loopback only (pass ``--master-addr 127.0.0.2``: without it DeepSpeed asks the
first host for ``hostname -I``, a non-loopback address).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HOSTS = ("127.0.0.2", "127.0.0.3")
PORT = int(os.environ.get("DS_UPCYCLE_SSH_PORT", "2222"))
"""2222 by default; DS_UPCYCLE_SSH_PORT moves it (two test sessions on one machine)."""
PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it ("Missing privilege separation directory")
SBIN = "/usr/sbin:/sbin"


def missing() -> list[str]:
    """What this machine lacks to run the two hosts (empty when nothing)."""
    path = os.environ.get("PATH", os.defpath) + os.pathsep + SBIN
    need = {"pdsh": "pdsh", "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client"}
    out = [f"{tool} (Debian package {pkg})" for tool, pkg in need.items() if shutil.which(tool, path=path) is None]
    if not PRIVSEP_DIR.is_dir() and os.geteuid() != 0:
        out.append(f"{PRIVSEP_DIR} (sshd's privilege separation folder; create it as root)")
    return out


@dataclass
class Cluster:
    folder: Path
    hosts: tuple[str, ...]
    port: int

    @property
    def pid_file(self) -> Path:
        return self.folder / "sshd.pid"

    @property
    def hostfile(self) -> Path:
        """One slot per host."""
        return self.folder / "hostfile"

    def write_hostfile(self, slots: int, name: str | None = None) -> Path:
        path = self.folder / (name or f"hostfile_{slots}_slots")
        path.write_text("".join(f"{h} slots={slots}\n" for h in self.hosts))
        return path

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) with the cluster's ssh first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.folder / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
        return env

    def sshd_pid(self) -> int | None:
        """The running sshd's PID, checked against its command line (never a reused PID)."""
        try:
            pid = int(self.pid_file.read_text().split()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            return None
        return pid if str(self.folder / "sshd_config") in cmdline else None


def _sshd_config(folder: Path, hosts: tuple[str, ...], port: int) -> str:
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.geteuid()).pw_name
    listen = "".join(f"ListenAddress {h}:{port}\n" for h in hosts)
    # StrictModes off: the authorized key lives in this private (0700) folder, under /tmp, whose
    # mode sshd's path check rejects. The server listens on loopback only and admits one key.
    return listen + (
        f"HostKey {folder}/host_key\nPidFile {folder}/sshd.pid\nAuthorizedKeysFile {folder}/authorized_keys\n"
        f"AllowUsers {user}\nStrictModes no\nUsePAM no\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
        "X11Forwarding no\nAllowTcpForwarding no\nAllowAgentForwarding no\nPermitTunnel no\nPrintMotd no\n"
    )


def _ssh_config(folder: Path, hosts: tuple[str, ...], port: int) -> str:
    return (
        f"Host {' '.join(hosts)}\n  Port {port}\n  IdentityFile {folder}/id_ed25519\n  IdentitiesOnly yes\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n"
        "  ProxyCommand none\n  ProxyJump none\n"
    )


def _wait_listening(hosts: tuple[str, ...], port: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            for h in hosts:
                socket.create_connection((h, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def start(folder: str | Path, hosts: tuple[str, ...] = HOSTS, port: int = PORT) -> Cluster:
    """Keys, configs and one sshd for ``hosts`` in ``folder`` (created; must be empty), plus
    ``folder/hostfile``. On any failure everything started or written is removed again."""
    if lacking := missing():
        raise RuntimeError("the two-host cluster needs: " + ", ".join(lacking) + " (`make install` installs them)")
    folder = Path(folder).resolve()
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"folder ({str(folder)!r}) is not empty; give a new or empty folder")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    cluster = Cluster(folder, tuple(hosts), port)
    try:
        for key in ("host_key", "id_ed25519"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ds_upcycle two-hosts", "-f",
                            str(folder / key)], check=True, capture_output=True)  # fmt: skip
        shutil.copy(folder / "id_ed25519.pub", folder / "authorized_keys")
        (folder / "sshd_config").write_text(_sshd_config(folder, cluster.hosts, port))
        (folder / "ssh_config").write_text(_ssh_config(folder, cluster.hosts, port))
        (folder / "bin").mkdir()
        wrapper = folder / "bin" / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F "{folder}/ssh_config" "$@"\n')
        wrapper.chmod(0o755)
        cluster.write_hostfile(1, "hostfile")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        sshd = shutil.which("sshd", path=os.environ.get("PATH", os.defpath) + os.pathsep + SBIN)
        proc = subprocess.run([sshd, "-f", str(folder / "sshd_config"), "-E", str(folder / "sshd.log")],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0 or not _wait_listening(cluster.hosts, port):
            log = (folder / "sshd.log").read_text() if (folder / "sshd.log").exists() else ""
            raise RuntimeError(f"sshd did not start on {', '.join(hosts)} port {port}: {proc.stderr}{log}".strip())
    except BaseException:
        stop(cluster)
        raise
    return cluster


def stop(cluster: Cluster | str | Path) -> None:
    """Stop the sshd and every session it still serves, and remove the folder (keys, configs)."""
    import psutil

    if not isinstance(cluster, Cluster):
        cluster = Cluster(Path(cluster).resolve(), HOSTS, PORT)
    pid = cluster.sshd_pid()
    if pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            master = psutil.Process(pid)
            family = master.children(recursive=True)
            master.kill()  # first, so that it accepts no new session
            for p in family:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs([master, *family], timeout=10)
    shutil.rmtree(cluster.folder, ignore_errors=True)


@contextlib.contextmanager
def two_hosts(folder: str | Path | None = None, hosts: tuple[str, ...] = HOSTS, port: int = PORT):
    """The cluster for the duration of a block; stopped and removed however the block ends."""
    folder = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix="ds_upcycle_two_hosts_"))
    cluster = start(folder, hosts, port)
    try:
        yield cluster
    finally:
        stop(cluster)


def _raise_on_sigterm(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ds-upcycle two-hosts",
        description="Two ssh hosts on this machine (127.0.0.2 and 127.0.0.3, one sshd on port 2222, loopback "
        "only) to try a multi-node launch without a cluster. `run` starts them, runs one command with their ssh "
        "settings ({hostfile} in it is replaced by the hostfile's path), and removes everything afterwards, also "
        "when the command fails. `start FOLDER` / `stop FOLDER` do the two halves. Nothing in ~/.ssh is "
        "touched. Needs pdsh and openssh-server (`make install` installs them as root).",
    )
    sub = p.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="start, run COMMAND, stop")
    run.add_argument("--slots", type=int, default=1, help="ranks per host in {hostfile} (default 1)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS]")
    for name, what in (("start", "start the hosts; keys, configs and hostfile go to FOLDER"),
                       ("stop", "stop the hosts started in FOLDER and remove FOLDER")):  # fmt: skip
        sub.add_parser(name, help=what).add_argument("folder")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.action == "stop":
        stop(args.folder)
        return 0
    if args.action == "start":
        try:
            c = start(args.folder)
        except RuntimeError as e:
            raise ValueError(str(e)) from None
        print(f"hosts {', '.join(c.hosts)} listen on port {c.port}; hostfile: {c.hostfile}\n"
              f"use their ssh settings with: export PATH={c.folder / 'bin'}:$PATH\n"
              f"stop and remove them with: ds-upcycle two-hosts stop {c.folder}")  # fmt: skip
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ValueError("run needs a command: ds-upcycle two-hosts run -- COMMAND [ARGS]")
    if args.slots < 1:
        raise ValueError(f"--slots ({args.slots}) must be >= 1")
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        with two_hosts() as c:
            hostfile = c.write_hostfile(args.slots)
            return subprocess.run([a.replace("{hostfile}", str(hostfile)) for a in command], env=c.env()).returncode
    except RuntimeError as e:
        raise ValueError(str(e)) from None


if __name__ == "__main__":
    sys.exit(main())
