"""Faults, injected for real: a killed rank, an interrupted save, corrupted files, NaN losses,
router collapse, hostile strings and secrets. Each failure is loud, fast and loses no work."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import DEBUG_CONFIG, LAUNCH_PORT, LOCAL_HOSTFILE, REFERENCE_STEPS, ROOT, debug_overrides, losses, train

from ds_upcycle import checkpoint
from ds_upcycle.launch import launcher_cmd, read_hostfile, shm_cleanup


def _run(tiny_setup, out, env=None, **extra):
    return train(tiny_setup, out, env=env, **extra)


@pytest.mark.slow
def test_killed_rank_fails_the_job_fast_and_names_it(tiny_setup, tmp_path):
    out = tmp_path / "run"
    cmd = launcher_cmd("ds_upcycle.train", [str(DEBUG_CONFIG), *debug_overrides(tiny_setup, out, **{"train.steps": 500})],
                       num_gpus=2, hostfile=LOCAL_HOSTFILE, master_port=LAUNCH_PORT)  # fmt: skip
    log = tmp_path / "launcher.log"
    with open(log, "w") as f, shm_cleanup():
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        try:
            deadline = time.time() + 240
            while time.time() < deadline and len(losses(out) if (out / "metrics.jsonl").exists() else {}) < 2:
                time.sleep(0.5)
            assert proc.poll() is None, log.read_text()[-3000:]
            pid = int(re.search(r"process (\d+) spawned with command: \[.*'--local_rank=1'", log.read_text())[1])
            os.kill(pid, signal.SIGKILL)
            t0 = time.time()
            rc = proc.wait(timeout=120)
            waited = time.time() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    print(f"killed rank 1 (pid {pid}); the job exited with {rc} after {waited:.1f} s")
    assert rc != 0 and waited < 60
    assert re.search(r"'--local_rank=1'.*\] exits with return code = -9", text)


@pytest.mark.slow
def test_interrupted_save_resumes_from_the_last_complete_checkpoint(reference_run, tiny_setup, tmp_path):
    out = tmp_path / "run"
    crashed = _run(tiny_setup, out, **{"train.steps": REFERENCE_STEPS, "train.save_every": 10,
                                       "debug.inject_crash_in_save_at_step": REFERENCE_STEPS})  # fmt: skip
    assert crashed.returncode != 0
    root = out / "checkpoints"
    assert (root / "latest_complete").read_text() == "step_00000010"  # the half-written save is not "latest"
    assert (root / "step_00000020").is_dir() and not (root / "step_00000020" / checkpoint.MANIFEST).exists()
    resumed = _run(tiny_setup, out, **{"train.steps": REFERENCE_STEPS, "train.save_every": 10,
                                       "train.resume": True})  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref, got = losses(reference_run), losses(out)
    worst = max(abs(ref[s] - got[s]) for s in range(11, REFERENCE_STEPS + 1))
    print(f"resume after an interrupted save: max |loss difference| = {worst:.3e}")
    assert worst <= 1e-5


@pytest.mark.slow
def test_corrupted_or_unsafe_checkpoint_files_are_named(reference_run, tmp_path):
    folder = tmp_path / "step"
    shutil.copytree(reference_run / "checkpoints" / "step_00000020", folder)
    checkpoint.verify(folder)  # intact
    victim = folder / "layer_1_expert_5_mp_rank_00_model_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"layer_1_expert_5_mp_rank_00_model_states.pt is truncated or altered"):
        checkpoint.verify(folder)
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(
        ValueError, match=r"layer_1_expert_5_mp_rank_00_model_states.pt is corrupted \(SHA-256 mismatch\)"
    ):
        checkpoint.verify(folder)
    victim.write_bytes(data)
    checkpoint.check_safe_to_unpickle(folder)  # DeepSpeed's own files pass the allow-list
    (folder / "evil.pt").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(ValueError, match=r"evil.pt holds objects outside the safe allow-list"):
        checkpoint.check_safe_to_unpickle(folder)


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.slow
def test_nan_stops_keeps_the_last_good_checkpoint_and_leaks_nothing(tiny_setup, tmp_path):
    """NaN at step 5 of 6, saves every 2: exit non-zero, step 4 stays the latest, nothing saved
    after. The same run carries a hostile run name (never given to a shell), a fake W&B key (never
    written anywhere) and a collapse threshold every router exceeds (warned, and logged)."""
    out = tmp_path / "run"
    marker = tmp_path / "pwned"
    secret = "wandb-secret-0123456789abcdef"
    proc = _run(tiny_setup, out, env={"WANDB_API_KEY": secret},
                **{"train.steps": 6, "train.save_every": 2, "debug.inject_nan_at_step": 4,
                   "log.name": f"$(touch {marker}); `touch {marker}`", "log.collapse_max_over_mean": 1.01,
                   "log.collapse_patience": 2})  # fmt: skip
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert (
        "loss is NaN/Inf at step 5 (micro-batch 0); stopped without saving (last complete checkpoint: step_00000004)"
        in text
    )
    from ds_upcycle.train import failure_message

    assert proc.failure["type"] == "NonFiniteError" and proc.failure["rank"] in (0, 1)
    assert re.match(r"rank [01] on .* failed first: loss is NaN/Inf at step 5", failure_message(proc))
    assert (out / "checkpoints" / "latest_complete").read_text() == "step_00000004"
    assert not (out / "checkpoints" / "step_00000006").exists()
    assert "router collapse: max/mean expert load" in text
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["alerts/router_collapse"] for r in rows if "alerts/router_collapse" in r][:3] == [0.0, 1.0, 1.0]
    assert not marker.exists()
    assert secret not in text
    for f in out.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_overflow_skipped_steps_are_counted_and_only_a_streak_stops(tiny_setup, tmp_path):
    """An Inf gradient at steps 1, 3 and 4 (train.on_nonfinite=stop, max 2 in a row): DeepSpeed skips
    those updates; step 1 alone is counted, logged and survived, with the LR schedule held back (the
    warm-up LR of step 1 is used again at step 2); the streak at steps 3-4 stops the run (exit 3),
    keeping step 3's checkpoint, whose state says 2 steps skipped and 1 applied. (The skip policy
    survives the same injection: tests/test_scale.py.)"""
    out = tmp_path / "run"
    proc = _run(tiny_setup, out, **{"train.steps": 6, "train.save_every": 1, "train.max_skipped_steps": 2,
                                   "debug.inject_inf_grad_at_steps": [0, 2, 3], "log.wandb": "disabled"})  # fmt: skip
    assert proc.returncode == 3, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "DeepSpeed skipped 2 steps in a row for a gradient overflow (up to step 4); stopped without saving " in (
        proc.stdout + proc.stderr
    )
    rows = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss/lm" in r}
    assert [rows[s]["optim/skipped_steps"] for s in (1, 2, 3)] == [1, 1, 2]
    assert rows[1]["optim/lr"] == rows[2]["optim/lr"] < rows[3]["optim/lr"]
    assert (
        rows[1]["optim/grad_norm"] != rows[1]["optim/grad_norm"] and rows[2]["optim/grad_norm"] > 0
    )  # NaN: none applied
    state = json.loads((out / "checkpoints" / "step_00000003" / checkpoint.STATE).read_text())
    assert (out / "checkpoints" / "latest_complete").read_text() == "step_00000003"
    assert state["data_position"] == {"next_step": 3} and state["lr_schedule_step"] == 1
    assert state["counters"]["skipped_steps"] == 2 and state["counters"]["skip_streak"] == 1


@pytest.mark.slow
def test_nan_can_be_skipped(tiny_setup, tmp_path):
    out = tmp_path / "run"
    proc = _run(tiny_setup, out, **{"train.steps": 3, "debug.inject_nan_at_step": 1,
                                   "train.on_nonfinite": "skip"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "loss/lm" in line]
    assert [r["optim/skipped_microbatches"] for r in rows] == [0, 1, 1]
    # Step 2's only micro-batch was dropped, so its window has no loss to average (NaN, not a made-up
    # 0); step 3's loss is finite: no NaN reached the weights.
    assert [r["loss/lm"] == r["loss/lm"] for r in rows] == [True, False, True]


@pytest.mark.parametrize(
    "text, message",
    [
        ("localhost slots=two\n", r"line 1 \('localhost slots=two'\) must be 'HOST slots=N' with N >= 1"),
        ("a slots=2\n# c\na slots=2\n", r"line 3 repeats host 'a'"),
        ("# nothing\n", r"lists no hosts"),
        ("a slots=0\n", r"line 1 \('a slots=0'\) must be 'HOST slots=N' with N >= 1"),
    ],
)
def test_malformed_hostfiles(tmp_path, text, message):
    hf = tmp_path / "hosts"
    hf.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_hostfile(hf)


def test_conflicting_launcher_flags(tmp_path):
    with pytest.raises(ValueError, match=r"--num_gpus \(4\) conflicts with multi-host hostfile"):
        launcher_cmd("ds_upcycle.train", [], num_gpus=4, hostfile=ROOT / "hostfiles" / "two_nodes.example")
    with pytest.raises(ValueError, match=r"hostfile \('.*missing'\) does not exist"):
        launcher_cmd("ds_upcycle.train", [], hostfile=tmp_path / "missing")


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_save_never_writes_into_a_complete_checkpoint(reference_run, tiny_setup, tmp_path):
    """A save cut off between its manifest and the latest pointer leaves step 20 complete while
    latest_complete says step 10. Resuming re-trains to step 20: the complete folder is moved aside
    untouched, never written into, and the new one verifies."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    root = run / "checkpoints"
    old = _contents(root / "step_00000020")
    (root / "latest_complete").write_text("step_00000010")
    proc = _run(tiny_setup, run, **{"train.steps": REFERENCE_STEPS, "train.save_every": 10, "train.resume": True})
    assert proc.returncode == 0, proc.output[-3000:]
    (aside,) = root.glob("step_00000020.superseded-*")
    assert _contents(aside) == old
    assert (root / "latest_complete").read_text() == "step_00000020"
    checkpoint.verify(root / "step_00000020")
