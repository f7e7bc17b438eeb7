"""The recipes on 2 real ranks through the `deepspeed` launcher (ep 2, ZeRO-2, W&B offline):
granular step-0 parity, and `ds-upcycle ablate` over two shipped ablation configs (frozen router,
granular), whose runs are then checked: router bit-identical, health metrics, export parity,
the table, plots and the W&B workspace against what the runs logged."""

import json

import pytest
import torch
from conftest import LAUNCH_PORT, debug_overrides
from wandb_records import find_run_file, read_config, read_history

pytestmark = pytest.mark.slow
STEPS = 4


@pytest.mark.parametrize("experts, top_k, g", [(16, 4, 2), (32, 8, 4)])
def test_two_rank_granular_upcycling_is_exact(launcher, tmp_path, experts, top_k, g):
    """GQA, tied embeddings and rope scaling at once; each rank builds half of the E x G experts."""
    out = tmp_path / "parity.json"
    args = ["--tiny", "gqa_tied_rope", f"--moe.num_experts={experts}", f"--moe.top_k={top_k}",
            f"--moe.granularity={g}", "--moe.router_init=uniform", "--moe.ep_size=2", "--json", str(out)]  # fmt: skip
    proc = launcher("ds_upcycle.tools.check", args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["local_experts_per_layer"] == experts // 2
    assert result["router_identical_across_ranks"] and result["parity_asserted"]
    assert result["max_abs_diff"] <= 1e-5


@pytest.fixture(scope="module")
def ablation(tiny_setup, tmp_path_factory):
    """`ds-upcycle ablate ablations/frozen_router ablations/granular` on the tiny setup, 2 ranks."""
    from ds_upcycle.tools.ablate import main as ablate

    out = tmp_path_factory.mktemp("ablation") / "abl"
    extra = {"train.steps": STEPS, "train.warmup_steps": 1, "data.seq_len": 64, "log.eval_every": 2,
             "log.health_every": 2, "ds.optimizer.params.lr": 3e-3}  # fmt: skip
    rc = ablate(["ablations/frozen_router", "ablations/granular", "--out", str(out), "--num-gpus", "2",
                 "--master-port", str(LAUNCH_PORT), *debug_overrides(tiny_setup, out / "unused", **extra)])  # fmt: skip
    assert rc == 0
    return out


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _last_checkpoint(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest_complete").read_text()


def test_frozen_router_is_bit_identical_after_training_while_experts_moved(ablation, tiny_setup):
    from ds_upcycle.config import load_run_config
    from ds_upcycle.upcycle import router_init

    run = ablation / "frozen_router"
    cfg = load_run_config(run / "config.json")
    folder = _last_checkpoint(run)
    module = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
    for layer in (0, 1):
        router = module[f"model.layers.{layer}.mlp.moe.deepspeed_moe.gate.wg.weight"]
        assert torch.equal(router, router_init(cfg.moe, layer, 64)), f"layer {layer} router moved"
    from safetensors.torch import load_file

    dense = load_file(f"{tiny_setup['model']}/model.safetensors")
    for layer in (0, 1):
        for e in range(8):
            expert = torch.load(folder / f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt", weights_only=True)
            key = f"model.layers.{layer}.mlp.moe.deepspeed_moe.experts.deepspeed_experts.{e}.up_proj.weight"
            assert not torch.equal(expert[key], dense[f"model.layers.{layer}.mlp.up_proj.weight"])


@pytest.mark.parametrize("arm", ["frozen_router", "granular"])
def test_health_metrics_start_at_one_with_copies_and_fall_with_training(ablation, arm):
    rows = _rows(ablation / arm)
    health = {r["step"]: r for r in rows if "health/dense_sim_mean" in r}
    assert sorted(health) == [0, 2, 4]
    for key in ("health/dense_sim_mean", "health/dense_sim_min", "health/expert_sim_mean"):
        assert health[0][key] == pytest.approx(1.0, abs=1e-6), key
        assert health[STEPS][key] < 1 - 1e-6, key
    assert 0 < health[STEPS]["health/router_margin"] < 1 and "health/router_margin" not in health[0]
    layers = {k.split("/")[1] for k in health[STEPS] if k.startswith("health/layer_")}
    assert layers == {"layer_00", "layer_01"}


def test_granular_run_exports_to_a_mixtral_that_reproduces_it(dist_world, ablation, tmp_path):
    from transformers import MixtralForCausalLM

    from ds_upcycle.checkpoint import load_moe_model
    from ds_upcycle.cli import main as cli
    from ds_upcycle.moe import attach_process_groups

    run = ablation / "granular"
    assert cli(["export", str(run), str(tmp_path / "mixtral"), "--dtype", "fp32"]) == 0
    theirs = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", dtype=torch.float32).eval()
    cfg = theirs.config
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (16, 4, 64)
    ours, _, _ = load_moe_model(run)
    attach_process_groups(ours)
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def test_ablation_table_plots_and_workspace(ablation):
    table = (ablation / "ablation.md").read_text()
    assert "| frozen_router |" in table and "| granular |" in table and "expert-dense sim" in table
    assert "cannot say which differences are within noise" in table  # no replicates asked for
    for png in ("heldout_loss.png", "dense_similarity.png"):
        assert (ablation / png).read_bytes()[:4] == b"\x89PNG"
    pytest.importorskip("wandb_workspaces")
    spec = json.loads((ablation / "wandb_workspace.json").read_text())
    panels = [
        p["config"]["metrics"] for s in spec["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]
    ]
    logged = set()
    for arm in ("frozen_router", "granular"):
        run_file = find_run_file(ablation / arm)
        assert read_config(run_file)["ds_upcycle"]["log"]["group"] == "abl"  # one W&B group
        logged |= {k for row in read_history(run_file) for k in row}
    missing = {key for keys in panels for key in keys} - logged
    assert not missing, f"workspace panels name keys no run logged to W&B: {sorted(missing)[:5]}"
    assert "router/layer_01/expert_15" in {k for keys in panels for k in keys}  # the granular run's experts
