"""The shipped ablation configs, the ablation table's noise verdicts, and the W&B workspace as code
(no runs here: tests/test_recipes_multiproc.py runs `ds-upcycle ablate` for real)."""

import json

import pytest

from ds_upcycle.config import load_run_config, shipped_configs
from ds_upcycle.preflight import validate
from ds_upcycle.tools.ablate import config_diff, mark_noise, seed_noise, write_table
from ds_upcycle.tools.demo import ABLATION_ARMS

METHOD_KEYS = {
    "copy": set(),
    "noise": {"expert_init", "expert_noise_std"},
    "drop": {"expert_init", "drop_ratio", "router_init"},
    "granular": {"num_experts", "top_k", "granularity"},
    "frozen_router": {"freeze_router"},
}
"""The keys each method changes (Drop-Upcycling's reference recipe includes the uniform router)."""


def test_one_shipped_config_per_arm_of_the_ablation_job():
    shipped = {name.removeprefix("ablations/") for name in shipped_configs() if name.startswith("ablations/")}
    assert shipped == set(METHOD_KEYS) == set(ABLATION_ARMS)
    assert ABLATION_ARMS[0] == "copy"  # the baseline comes first


@pytest.mark.parametrize("arm", sorted(METHOD_KEYS))
def test_arm_differs_from_the_base_only_in_its_method_keys(arm, tiny_setup):
    files = shipped_configs()
    base, raw = (json.loads(files[f"ablations/{name}"].read_text()) for name in ("copy", arm))
    diff = {k for k in config_diff(base, raw) if k != "ds_upcycle.description"}  # the files as written
    assert diff == {f"ds_upcycle.moe.{k}" for k in METHOD_KEYS[arm]}
    cfg = load_run_config(f"ablations/{arm}")
    assert cfg.description.startswith("Ablation arm")
    overrides = [f"--model.path={tiny_setup['model']}", f'--data.train=["{tiny_setup["train"]}"]',
                 f'--data.eval=["{tiny_setup["eval"]}"]']  # fmt: skip
    validate(load_run_config(f"ablations/{arm}", overrides), world_size=2)


def test_noise_verdicts_use_the_seed_to_seed_spread(tmp_path):
    rows = [
        {"config": "copy", "eval_loss_end": 3.00, "final_train_loss": 3.1},
        {"config": "drop", "eval_loss_end": 3.05},
        {"config": "granular", "eval_loss_end": 3.30},
    ]
    replicates = [{"config": "copy_seed1", "eval_loss_end": 3.04}]
    noise = seed_noise(rows, replicates)
    assert noise == pytest.approx(0.04 / 2**0.5)  # std of {3.00, 3.04}
    mark_noise(rows, noise)
    assert rows[1]["within_noise"] is True and rows[2]["within_noise"] is False  # 0.05 < 0.08 < 0.30
    assert "within_noise" not in rows[0] and rows[2]["delta_eval"] == pytest.approx(0.30)
    md = write_table(rows + replicates, tmp_path, noise, 0.02)
    assert "| drop |" in md and "| yes |" in md and "| no |" in md
    assert "Within noise: drop. Beyond noise: granular." in md
    assert (tmp_path / "ablation.csv").read_text().splitlines()[0].startswith("config,final_train_loss,eval_loss_end")
    assert "cannot say which differences are within noise" in write_table(rows[:1], tmp_path)


def test_workspace_panels_cover_loss_router_health_and_throughput(tmp_path):
    pytest.importorskip("wandb_workspaces")
    from ds_upcycle.tools.workspace import build_workspace, panel_keys, write_workspace

    ws = build_workspace("grp", layers=[0, 3], num_experts=16)
    assert [s.name for s in ws.sections] == [
        "Loss", "Upcycling health", "Router load per layer", "Router balance", "Throughput",
    ]  # fmt: skip
    keys = panel_keys(ws)
    assert {"loss/lm", "eval/loss", "health/dense_sim_mean", "health/router_margin", "throughput/tokens_per_s"} <= keys
    assert "router/layer_03/expert_15" in keys and "router/layer_01/expert_00" not in keys
    with pytest.raises(ValueError, match=r"W&B workspace panels name keys no run logged, e.g. 'eval/loss'"):
        write_workspace(ws, tmp_path, keys - {"eval/loss"}, online=False)
    report = write_workspace(ws, tmp_path, keys, online=False)
    spec = json.loads((tmp_path / "wandb_workspace.json").read_text())
    assert report["panels"] == sum(len(s.panels) for s in ws.sections) and spec["displayName"] == "ablation grp"
    assert "grp" in json.dumps(spec["spec"])  # the runset is filtered to the group


def test_a_second_ablation_into_the_same_folder_is_refused_or_replaced(tiny_setup, tmp_path, capsys):
    """`make ablate` twice: the first ablation's run folders are ablate's to refuse (naming --overwrite)
    or, with --overwrite, to replace; a run's own "already holds a run" check never stops the plan."""
    from ds_upcycle.cli import main as cli
    from ds_upcycle.tools.ablate import build_parser, fresh_runs, plan_runs

    out = tmp_path / "ablate"
    (out / "copy" / "checkpoints").mkdir(parents=True)
    (out / "copy" / "config.json").write_text("{}")
    (out / "copy" / "metrics.jsonl").write_text("")
    data = [f"--model.path={tiny_setup['model']}", f'--data.train=["{tiny_setup["train"]}"]',
            f'--data.eval=["{tiny_setup["eval"]}"]']  # fmt: skip
    argv = ["ablations/copy", "ablations/noise", "--out", str(out), "--num-gpus", "2", *data]
    assert cli(["ablate", *argv]) == 2
    assert "already holds run copy; pass --overwrite" in capsys.readouterr().err
    assert (out / "copy" / "metrics.jsonl").exists()  # refused: nothing touched
    args, overrides = build_parser().parse_known_args([*argv, "--overwrite"])
    plans = plan_runs(args, overrides)
    fresh_runs(out, [name for _, name, _, _ in plans], overwrite=True)
    assert not (out / "copy").exists()
