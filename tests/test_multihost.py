"""Across hosts for real: two ssh hosts on loopback addresses (127.0.0.2 and 127.0.0.3, one sshd),
DeepSpeed's pdsh launcher with a hostfile, one rank (or two) per host. Training, resume, export,
the environment of remote ranks, and failures: a host that dies, a rank that hangs, a host that is
not there. Nothing is mocked; the hosts share this machine's filesystem, as cluster nodes share one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import DEBUG_CONFIG, LAUNCH_PORT, REFERENCE_STEPS, ROOT, debug_overrides, losses, train

from ds_upcycle import checkpoint
from ds_upcycle.config import load_run_config
from ds_upcycle.launch import (
    LAUNCH_FILE,
    check_remote_paths,
    config_digest,
    launcher_cmd,
    rank_records,
    read_launch_file,
    run_training,
    shm_cleanup,
    write_launch_file,
)
from ds_upcycle.tools import two_hosts

MASTER = two_hosts.HOSTS[0]
SECOND = two_hosts.HOSTS[1]
TIMEOUT_S = 25  # train.timeout_s of the failure runs: low, so that a hang is detected quickly
HOSTILE = """it's "quoted", [bracketed] {braced} $(not run) `nor this` & spaced"""
PROBE = "DS_UPCYCLE_PROBE"
QUICK = {"log.wandb": "disabled", "log.heatmap_every": 0}  # what these runs need not pay for (W&B: phase 4)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if lacking := two_hosts.missing():
        pytest.skip("multi-host tests need " + ", ".join(lacking) + "; `make install` installs them as root")
    user_ssh = _snapshot(Path.home() / ".ssh")
    with two_hosts.two_hosts(tmp_path_factory.mktemp("hosts") / "cluster") as c:
        yield c
        pid = c.sshd_pid()
    assert not c.folder.exists() and not psutil.pid_exists(pid)  # keys, configs and sshd are gone
    assert _snapshot(Path.home() / ".ssh") == user_ssh  # ~/.ssh was never touched
    assert not [f for f in Path("/dev/shm").glob("deepspeed_*") if f"_{LAUNCH_PORT}_" in f.name]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()} if folder.is_dir() else {}


def _logged_steps(out: Path) -> set[int]:
    """Steps in metrics.jsonl so far (a line being written is skipped)."""
    steps = set()
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        try:
            steps.add(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def _env(cluster, **extra) -> dict[str, str]:
    """The launching environment: the cluster's ssh first on PATH, one thread per rank, gloo on
    the loopback interface (no other address is ever used)."""
    base = {k: v for k, v in os.environ.items() if k not in (PROBE, "WANDB_MODE")}
    return cluster.env({**base, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", **extra})


def _front_end(cluster, tiny_setup, out, log: Path, hostfile=None, env=None, **overrides) -> subprocess.Popen:
    """`ds-upcycle train` across the two hosts, as a user runs it (a process of its own)."""
    cmd = [sys.executable, "-m", "ds_upcycle", "train", str(DEBUG_CONFIG), "--hostfile", str(hostfile or cluster.hostfile),
           "--master-addr", MASTER, "--ssh-port", str(cluster.port), "--master-port", str(LAUNCH_PORT),
           *debug_overrides(tiny_setup, out, **{**QUICK, **overrides})]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=env or _env(cluster), stdout=log.open("w"), stderr=subprocess.STDOUT)


@contextlib.contextmanager
def _stopped_on_failure(job: subprocess.Popen):
    """A failing check must not leave the job running: SIGTERM makes the front end stop the run's
    processes on every host, as Ctrl-C does."""
    try:
        yield job
    finally:
        if job.poll() is None:
            job.terminate()
            job.wait(timeout=120)


def _wait_for(predicate, proc: subprocess.Popen, log: Path, seconds: float = 420) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, f"the job ended early:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def _latest_step(out: Path) -> int:
    tag = checkpoint.latest_tag(out / "checkpoints")
    return int(tag.split("_")[1]) if tag else 0


def _rank(out: Path, rank: int) -> dict:
    return next(r for r in rank_records(out) if r["rank"] == rank)


def _left_over(out: Path, cluster) -> list[str]:
    """Processes of the run still alive on either host: anything naming the run folder (ranks,
    launchers, shells, pdsh, ssh), and any ssh session still open on the two hosts."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    deadline = time.monotonic() + 5  # an ended session's sshd needs a moment to go
    while time.monotonic() < deadline:
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            if p.info["pid"] not in mine and str(out) in " ".join(p.info["cmdline"] or []):
                found.append(" ".join(p.info["cmdline"]))
        found += [" ".join(p.cmdline()) for p in psutil.Process(cluster.sshd_pid()).children(recursive=True)]
        if not found:
            break
        time.sleep(0.2)
    return found


def _losses_vs_reference(reference_run, out: Path) -> float:
    """max |loss - reference loss| over every logged row (resumed runs log some steps twice)."""
    ref = losses(reference_run)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return max(abs(r["loss/lm"] - ref[r["step"]]) for r in rows if "loss/lm" in r)


def _kill_host(cluster, out: Path) -> list[int]:
    """SIGKILL every process of the second host's part of the job: its ssh session, the shell, the
    DeepSpeed launcher and its rank, all at once."""
    launcher = psutil.Process(_rank(out, 1)["launcher_pid"])
    session = [p for p in launcher.parents() if p.pid != cluster.sshd_pid() and cluster.sshd_pid() in
               {q.pid for q in p.parents()}]  # fmt: skip
    victims = [*session, launcher, *launcher.children(recursive=True)]
    for p in victims:
        p.send_signal(signal.SIGKILL)
    return [p.pid for p in victims]


@pytest.mark.slow
def test_two_hosts_train_fail_resume_and_export(cluster, tiny_setup, reference_run, tmp_path, dist_world):
    """One chain on the same LR schedule as the single-host reference run (20 steps):
    1. `deepspeed --hostfile` directly, a rank per host, ep 2 across them, ZeRO-2: steps 1-3.
    2. `ds-upcycle train --hostfile` resumes from that checkpoint; the second host dies at step >= 5.
    3. it resumes again; a rank of the second host hangs (SIGSTOP) after the next checkpoint.
    4. it resumes again, hostile strings in the config, and SIGTERM to the front end preempts it on both
       hosts (exit 75, a verified checkpoint of the last step); the export matches HF Mixtral.
    Every logged loss equals the reference's; no failure leaves a process behind."""
    out = tmp_path / "run"
    measured = {}

    # 1. The plain launcher, as a user types it. The settings sit in a config file (pdsh's remote
    # shell would strip the quotes of a list override); GLOO_SOCKET_IFNAME and a probe variable are
    # only in .deepspeed_env in the working directory, which DeepSpeed's runner exports to every host.
    work = tmp_path / "work"
    work.mkdir()
    cfg = load_run_config(DEBUG_CONFIG, [*debug_overrides(tiny_setup, out, **QUICK), f'--debug.report_env=["{PROBE}", '
                          '"SSH_CONNECTION", "GLOO_SOCKET_IFNAME"]']).to_dict()  # fmt: skip
    (work / "run.json").write_text(json.dumps(cfg))
    (work / ".deepspeed_env").write_text(
        f"{PROBE}=reached rank 1 from .deepspeed_env\nGLOO_SOCKET_IFNAME=lo\nOMP_NUM_THREADS=1\n"
    )
    cmd = launcher_cmd("ds_upcycle.train", ["run.json", f"--train.steps={REFERENCE_STEPS}", "--train.stop_after=3",
                       "--train.save_every=3"], hostfile=cluster.hostfile, master_port=LAUNCH_PORT, master_addr=MASTER,
                       ssh_port=cluster.port)  # fmt: skip
    assert cmd[3:9] == ["--hostfile", str(cluster.hostfile), "--master_addr", MASTER, "--ssh_port", str(cluster.port)]
    env = {k: v for k, v in _env(cluster).items() if k not in ("GLOO_SOCKET_IFNAME", "OMP_NUM_THREADS")}
    with shm_cleanup():
        proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rank0, rank1 = _rank(out, 0), _rank(out, 1)
    assert rank1["node_rank"] == 1 and rank1["env"]["SSH_CONNECTION"].split()[2] == SECOND  # via sshd on .3
    assert rank0["node_rank"] == 0 and rank0["env"]["SSH_CONNECTION"].split()[2] == MASTER
    assert rank1["env"][PROBE] == "reached rank 1 from .deepspeed_env" and rank1["env"]["GLOO_SOCKET_IFNAME"] == "lo"
    assert rank1["threads"] == 1
    assert _latest_step(out) == 3
    (work / ".deepspeed_env").unlink()

    # 2. The front end resumes across the two hosts; the second host dies mid-run.
    log = tmp_path / "death.log"
    job = _front_end(cluster, tiny_setup, out, log, **{"train.resume": True, "train.save_every": 2,
                                                       "train.timeout_s": TIMEOUT_S})  # fmt: skip
    with _stopped_on_failure(job):
        _wait_for(lambda: _latest_step(out) >= 4 and max(_logged_steps(out)) >= 5, job, log)
        _kill_host(cluster, out)
        t0 = time.monotonic()
        rc = job.wait(timeout=TIMEOUT_S + 120)
    measured["host dies"] = time.monotonic() - t0
    text = log.read_text()
    assert rc != 0 and measured["host dies"] <= TIMEOUT_S + 30, text[-4000:]
    assert f"ds-upcycle: the multi-host job failed: host {SECOND} failed first" in text, text[-4000:]
    assert _left_over(out, cluster) == []
    kept = _latest_step(out)
    checkpoint.verify(out / "checkpoints" / checkpoint.tag_for(kept))

    # 3. Resume from it; after one more checkpoint, rank 1 (second host) stops (SIGSTOP).
    log = tmp_path / "hang.log"
    job = _front_end(cluster, tiny_setup, out, log, **{"train.resume": True, "train.save_every": 2,
                                                       "train.timeout_s": TIMEOUT_S})  # fmt: skip
    with _stopped_on_failure(job):
        _wait_for(lambda: _latest_step(out) > kept, job, log)
        stopped = _rank(out, 1)["pid"]
        os.kill(stopped, signal.SIGSTOP)
        t0 = time.monotonic()
        rc = job.wait(timeout=TIMEOUT_S + 120)
    measured["rank hangs"] = time.monotonic() - t0
    text = log.read_text()
    assert rc != 0 and measured["rank hangs"] <= TIMEOUT_S + 30, text[-4000:]
    assert f"rank 1 on {SECOND} (pid {stopped}, stopped)" in text, text[-4000:]
    assert _left_over(out, cluster) == []
    kept_after_hang = _latest_step(out)
    assert kept_after_hang > kept
    checkpoint.verify(out / "checkpoints" / checkpoint.tag_for(kept_after_hang))

    # 4. Resume through the front end, with a list override and a hostile string that must reach
    # every rank intact (they read the launch file, not arguments), and W&B's mode and the thread
    # count from the launching environment; two steps in, SIGTERM to the front end preempts the run
    # on both hosts: every rank finishes its step, all save it, and the job exits 75.
    log = tmp_path / "resume.log"
    assert not any((d / ".deepspeed_env").exists() for d in (ROOT, Path.home()))  # only the front end forwards
    env = _env(cluster, WANDB_MODE="offline")
    job = _front_end(cluster, tiny_setup, out, log, env=env, **{
        "train.resume": True, "log.notes": HOSTILE, "log.name": HOSTILE, "log.wandb": "offline",
        "debug.step_delay_s": 0.5,
        "debug.report_env": ["WANDB_MODE", "OMP_NUM_THREADS", "SSH_CONNECTION", "PYTHONPATH"]})  # fmt: skip
    with _stopped_on_failure(job):
        _wait_for(lambda: max(_logged_steps(out), default=0) >= kept_after_hang + 2, job, log)
        job.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        rc = job.wait(timeout=300)
    measured["SIGTERM to the front end"] = time.monotonic() - t0
    assert rc == 75, log.read_text()[-4000:]
    preempted = json.loads((out / "preempted.json").read_text())
    assert _latest_step(out) == preempted["step"] == max(losses(out)) > kept_after_hang + 1
    checkpoint.verify(out / "checkpoints" / checkpoint.tag_for(preempted["step"]))
    assert "Resume with:" in log.read_text() and _left_over(out, cluster) == []
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["ds_upcycle"]["log"]["notes"] == HOSTILE and resolved["ds_upcycle"]["log"]["name"] == HOSTILE
    assert read_launch_file(out / LAUNCH_FILE)[0].to_dict() == resolved
    rank1 = _rank(out, 1)
    assert rank1["env"]["WANDB_MODE"] == "offline" and rank1["env"]["OMP_NUM_THREADS"] == "1"
    assert rank1["env"]["SSH_CONNECTION"].split()[2] == SECOND and rank1["threads"] == 1
    assert str(ROOT) in rank1["env"]["PYTHONPATH"].split(os.pathsep)  # the runner prepends the working directory
    assert {r["config_sha256"] for r in rank_records(out)} == {config_digest(load_run_config(out / "config.json"))}
    from wandb_records import find_run_file, read_config

    assert read_config(find_run_file(out))["ds_upcycle"]["log"]["notes"] == HOSTILE
    measured["max |dloss|"] = _losses_vs_reference(reference_run, out)
    print("two hosts:", {k: round(v, 8) for k, v in measured.items()}, f"kept: step {kept}, then {kept_after_hang}")
    assert measured["max |dloss|"] <= 1e-5

    # The checkpoint written by both hosts exports to HF Mixtral with the same logits.
    _export_parity(out, tmp_path / "mixtral")


def _export_parity(run: Path, target: Path) -> None:
    import torch
    from transformers import MixtralForCausalLM

    from ds_upcycle.checkpoint import load_moe_model
    from ds_upcycle.cli import main as cli
    from ds_upcycle.moe import attach_process_groups

    assert cli(["export", str(run), str(target), "--dtype", "fp32"]) == 0
    ours, _, _ = load_moe_model(run)
    attach_process_groups(ours)
    theirs = MixtralForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    print(f"export of the two-host checkpoint: max |delta logits| = {diff:.3e}")
    assert diff <= 1e-4


@pytest.mark.slow
def test_two_slots_per_host(cluster, tiny_setup, tmp_path):
    """4 ranks, 2 per host, ep 2: each expert group on one host (ep 4, spreading it over both hosts,
    runs in test_four_ranks_ep4_continue_on_two_ranks_ep2)."""
    out = tmp_path / "run"
    run = _four_ranks(cluster, tiny_setup, out, **{"train.steps": 2, "moe.ep_size": 2})
    assert run.summary["steps_done"] == 2
    experts = sorted(p.name for p in (out / "checkpoints" / checkpoint.tag_for(2)).glob("layer_0_expert_*"))
    assert len(experts) == 8  # every expert saved once, whichever host held it


def _four_ranks(cluster, tiny_setup, out: Path, **overrides):
    run = run_training(DEBUG_CONFIG, debug_overrides(tiny_setup, out, **{**QUICK, **overrides}),
                       hostfile=cluster.write_hostfile(2), master_addr=MASTER, ssh_port=cluster.port,
                       master_port=LAUNCH_PORT, env=_env(cluster), capture=True, timeout=600, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    assert run.summary["world_size"] == 4
    assert [(r["rank"], r["node_rank"], r["local_rank"]) for r in rank_records(out)] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1)]  # fmt: skip
    return run


@pytest.mark.slow
def test_four_ranks_ep4_continue_on_two_ranks_ep2(cluster, tiny_setup, tmp_path):
    """Elastic resume off a multi-host run: 4 ranks, 2 per host, ep 4 (each expert group over both
    hosts), steps 1-4 saving at 2; its step 2 on this host's 2 ranks, ep 2, gradient accumulation 2
    (the same global batch of 16): steps 3-4 equal the 4-rank run's, and the state the resume
    restored equals the one saved, parameter by parameter."""
    from layout_free_checks import max_loss_difference, resaved_equals_read

    four = tmp_path / "four"
    _four_ranks(cluster, tiny_setup, four, **{"train.steps": 4, "train.save_every": 2, "moe.ep_size": 4})
    experts = sorted(p.name for p in (four / "checkpoints" / checkpoint.tag_for(2)).glob("layer_0_expert_*"))
    assert len(experts) == 8  # every expert saved once, whichever host held it
    two = tmp_path / "two"
    checkpoint.copy_to_new_run(four, 2, two)
    run = train(tiny_setup, two, nprocs=2, **{**QUICK, "train.steps": 4, "train.resume": True, "moe.ep_size": 2,
                                              "ds.gradient_accumulation_steps": 2, "debug.save_at_resume": True})  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    assert run.summary["resume_mode"] == "layout_free"
    worst = max_loss_difference(four, two, range(3, 5))
    compared = resaved_equals_read(two, 2)
    print(f"4 ranks ep 4 (2 hosts) -> 2 ranks ep 2: max |dloss| = {worst:.3e} over steps 3-4; restored state equal "
          f"for all {compared} parameters")  # fmt: skip
    assert worst <= 1e-5


def test_unreachable_host_is_named_before_anything_starts(cluster, tiny_setup, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(f"{MASTER} slots=1\n127.0.0.4 slots=1\n")  # nothing listens on 127.0.0.4
    out = tmp_path / "run"
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"host 127\.0\.0\.4 \(hostfile '.*hosts'\) is not reachable over ssh: "
                                         r".*Connection refused.*check with `ssh -p \d+ 127\.0\.0\.4 true`"):  # fmt: skip
        run_training(DEBUG_CONFIG, debug_overrides(tiny_setup, out), hostfile=hostfile, master_addr=MASTER,
                     ssh_port=cluster.port, env=_env(cluster), cwd=ROOT)  # fmt: skip
    assert time.monotonic() - t0 < 30 and not out.exists()


# -- no second host needed ---------------------------------------------------------------------


def test_multi_host_flags(tmp_path):
    two = tmp_path / "two"
    two.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    cmd = launcher_cmd("m", ["x"], hostfile=two, master_addr="127.0.0.2", ssh_port=2222, ssh_check=False)
    assert cmd[3:] == ["--hostfile", str(two), "--master_addr", "127.0.0.2", "--ssh_port", "2222", "--no_ssh_check",
                       "--module", "m", "x"]  # fmt: skip
    with pytest.raises(ValueError, match=r"--master-addr is for a hostfile that names other hosts"):
        launcher_cmd("m", [], hostfile=ROOT / "hostfiles" / "localhost", master_addr="10.0.0.1")
    with pytest.raises(ValueError, match=r"--ssh-port is for a hostfile that names other hosts"):
        launcher_cmd("m", [], num_gpus=2, ssh_port=2222)
    with pytest.raises(ValueError, match=r"--ssh-port \(70000\) must be a TCP port"):
        launcher_cmd("m", [], hostfile=two, ssh_port=70000)


def test_world_size_comes_from_the_hostfile_slots(tiny_setup, tmp_path):
    three = tmp_path / "three"
    three.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=2\n")
    with pytest.raises(ValueError, match=r"world size \(3\) must be divisible by moe.ep_size \(2\).*"
                                         r"\(world size 3 = the slots of hostfile '.*three'\)"):  # fmt: skip
        run_training(DEBUG_CONFIG, debug_overrides(tiny_setup, tmp_path / "run"), hostfile=three)
    assert not (tmp_path / "run").exists()


def test_paths_a_remote_shell_would_interpret_are_refused(tiny_setup, tmp_path):
    two = tmp_path / "two"
    two.write_text("127.0.0.2 slots=1\n127.0.0.3 slots=1\n")
    out = tmp_path / "$(touch pwned)"
    with pytest.raises(ValueError, match=r"train.output_dir \('.*\$\(touch pwned\)'\) has characters the remote shell"):
        run_training(DEBUG_CONFIG, debug_overrides(tiny_setup, out), hostfile=two)
    assert not out.exists()
    with pytest.raises(ValueError, match=r"the working directory \('/tmp/a b'\) has characters"):
        check_remote_paths(tmp_path / "ok" / LAUNCH_FILE, Path("/tmp/a b"))


def test_launch_file_carries_the_config_and_the_environment_but_no_secret(tiny_setup, tmp_path):
    overrides = [*debug_overrides(tiny_setup, tmp_path / "run"), f"--log.notes={HOSTILE}"]
    cfg = load_run_config(DEBUG_CONFIG, overrides)
    from ds_upcycle.launch import forwarded_env

    env = forwarded_env({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_API_KEY": "secret", "HOME": "/x"})
    assert env == {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    (tmp_path / "run" / "ranks").mkdir(parents=True)
    path = write_launch_file(tmp_path / "run", cfg, DEBUG_CONFIG, overrides, env)
    assert not (tmp_path / "run" / "ranks").exists()  # the previous launch's records go
    back, back_env = read_launch_file(path)
    assert back.to_dict() == cfg.to_dict() and back.log.notes == HOSTILE and back_env == env
    assert back.source == str(DEBUG_CONFIG) and "secret" not in path.read_text()
    with pytest.raises(ValueError, match=r"launch file '.*nowhere.json' cannot be read on host .*shared filesystem"):
        read_launch_file(tmp_path / "nowhere.json")


def test_a_list_stripped_of_its_quotes_gets_a_hint():
    with pytest.raises(ValueError, match=r"data.train \('\[/a.txt\]'\) must be a list of str; its quotes look lost"):
        load_run_config(DEBUG_CONFIG, ["--data.train=[/a.txt]"])


def test_expert_groups_get_the_collective_timeout(dist_world):
    """DeepSpeed makes its expert groups with torch's 30-minute default timeout; a hung peer would
    stall an MoE all-to-all that long instead of train.timeout_s."""
    import datetime

    import torch
    import torch.distributed as dist

    from ds_upcycle.distributed import bound_all_groups

    group = dist.new_group([0])  # what deepspeed/utils/groups.py does for each expert group
    gloo = group._get_backend(torch.device("cpu"))
    assert gloo.options._timeout == datetime.timedelta(minutes=30)
    assert bound_all_groups(300) >= 2
    assert gloo.options._timeout == datetime.timedelta(seconds=300)


def test_pdsh_exit_lines_are_read():
    from ds_upcycle.launch import _PDSH_EXIT

    m = _PDSH_EXIT.match("pdsh@vm: 127.0.0.3: ssh exited with exit code 255\n")
    assert m and (m[1], m[2]) == ("127.0.0.3", "255")
    assert not _PDSH_EXIT.match("127.0.0.3: [ds_upcycle] step 1/4 | loss 5.79")
    assert re.search("two-hosts", subprocess.run([sys.executable, "-m", "ds_upcycle", "--help"], capture_output=True,
                                                 text=True, cwd=ROOT).stdout)  # fmt: skip
