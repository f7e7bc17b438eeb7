"""Real training: 2 CPU ranks through the `deepspeed` launcher, ZeRO-2, ep 2, W&B offline."""

import json
import math

import pytest
from conftest import DEBUG_CONFIG, REFERENCE_STEPS, ROOT, debug_overrides, losses, train
from wandb_records import find_run_file, read_config, read_history

pytestmark = pytest.mark.slow
STEPS = REFERENCE_STEPS


def _train(tiny_setup, out, **extra):
    proc = train(tiny_setup, out, **extra)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def full_run(reference_run):
    return reference_run


def test_loss_goes_down(full_run):
    curve = losses(full_run)
    assert sorted(curve) == list(range(1, STEPS + 1))
    assert curve[STEPS] < curve[1] - 1.0, curve
    summary = json.loads((full_run / "summary.json").read_text())
    assert summary["eval_loss_end"] < summary["eval_loss_start"]
    assert summary["world_size"] == 2 and summary["steps_done"] == STEPS


def test_wandb_offline_run_has_router_and_throughput_metrics(full_run):
    run_file = find_run_file(full_run)
    rows = [r for r in read_history(run_file) if "loss/lm" in r]
    assert len(rows) == STEPS
    for row in rows:
        for layer in (0, 1):
            fracs = [row[f"router/layer_{layer:02d}/expert_{e:02d}"] for e in range(8)]
            assert math.isclose(sum(fracs), 1.0, abs_tol=1e-9)
            assert 1.0 <= row[f"router/layer_{layer:02d}/max_over_mean"] <= 8.0
            assert 0.0 <= row[f"router/layer_{layer:02d}/entropy"] <= 1.0
            assert row[f"router/layer_{layer:02d}/drop_frac"] == 0.0  # dropless
        assert 0.0 < row["throughput/mfu"] < 1.0
        assert row["throughput/tokens_per_s"] > 0 and row["memory/peak_gib"] > 0
        assert row["loss/aux"] > 0 and row["optim/lr"] > 0
    assert any("router/load_heatmap/path" in r for r in read_history(run_file))
    config = read_config(run_file)
    assert config["ds_upcycle"]["moe"]["ep_size"] == 2  # the resolved config is on the run
    assert json.loads((full_run / "config.json").read_text())["ds_upcycle"]["moe"]["num_experts"] == 8


def test_checkpoints_are_complete(full_run):
    root = full_run / "checkpoints"
    assert (root / "latest_complete").read_text() == f"step_{STEPS:08d}"
    folder = root / f"step_{STEPS:08d}"
    assert len(list(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 2 * 8
    state = json.loads((folder / "ds_upcycle_state.json").read_text())
    assert state["step"] == STEPS and state["data_position"] == {"next_step": STEPS}


def test_exact_resume(full_run, tiny_setup, tmp_path):
    """Stop at step 10, resume: every later loss equals the uninterrupted run's."""
    out = tmp_path / "resumed"
    _train(tiny_setup, out, **{"train.steps": STEPS, "train.stop_after": 10})
    assert (out / "checkpoints" / "latest_complete").read_text() == "step_00000010"
    _train(tiny_setup, out, **{"train.steps": STEPS, "train.resume": True})
    full, resumed = losses(full_run), losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # no step repeated or skipped
    worst = max(abs(full[s] - resumed[s]) for s in range(11, STEPS + 1))
    print(f"exact resume: max |loss difference| over steps 11-{STEPS} = {worst:.3e}")
    assert worst <= 1e-5


def test_ablation_of_two_configs(tiny_setup, tmp_path):
    from conftest import LAUNCH_PORT

    from ds_upcycle.tools.ablate import main as ablate

    other = tmp_path / "top1.json"
    cfg = json.loads(DEBUG_CONFIG.read_text())
    cfg["ds_upcycle"]["moe"]["top_k"] = 1
    other.write_text(json.dumps(cfg))
    out = tmp_path / "abl"
    rc = ablate([str(DEBUG_CONFIG), str(other), "--out", str(out), "--num-gpus", "2", "--master-port",
                 str(LAUNCH_PORT), "--drop-checkpoints",
                 *debug_overrides(tiny_setup, tmp_path / "unused", **{"train.steps": 4})])  # fmt: skip
    assert rc == 0
    assert not (out / "top1" / "checkpoints").exists() and (out / "top1" / "summary.json").is_file()
    table = (out / "ablation.md").read_text()
    assert "| cpu_debug_zero2_ep2 |" in table and "| top1 |" in table
    lines = (out / "ablation.csv").read_text().splitlines()
    assert lines[0].startswith("config,final_train_loss,eval_loss_end,delta_eval,within_noise,tokens_per_s,mfu")
    assert len(lines) == 3
    diff = json.loads((out / "top1" / "config_diff.json").read_text())
    assert diff == {"ds_upcycle.moe.top_k": [2, 1]}
    assert ROOT.exists()
