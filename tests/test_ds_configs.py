"""Every shipped ds_configs file loads, is complete and concrete, and validates at its ep layout."""

from pathlib import Path

import pytest
from conftest import ROOT

from ds_upcycle.config import load_run_config
from ds_upcycle.preflight import validate

CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def test_the_required_configs_ship():
    names = {p.stem for p in CONFIGS}
    assert "cpu_debug_zero2_ep2" in names
    assert {f"gpu_zero{s}_bf16_ep{e}" for s in (1, 2) for e in (1, 2, 8)} <= names
    assert {"llama3_8b_paper_cf4", "llama3_8b_paper_dropless"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_validates(path: Path, tiny_setup):
    cfg = load_run_config(path)
    world = cfg.moe.ep_size * 2
    micro, accum = cfg.ds["train_micro_batch_size_per_gpu"], cfg.ds.get("gradient_accumulation_steps", 1)
    overrides = [f"--model.path={tiny_setup['model']}", f"--data.train=[\"{tiny_setup['train']}\"]",
                 "--data.eval=[]", "--data.seq_len=64", f"--ds.train_batch_size={micro * accum * world}"]  # fmt: skip
    derived = validate(load_run_config(path, overrides), world)
    assert derived.global_batch == micro * accum * world
    assert cfg.moe.num_experts == 8 and cfg.moe.top_k == 2


def test_paper_recipe():
    cf4 = load_run_config(ROOT / "ds_configs" / "llama3_8b_paper_cf4.json")
    dropless = load_run_config(ROOT / "ds_configs" / "llama3_8b_paper_dropless.json")
    assert cf4.moe.capacity_factor == 4.0 and cf4.moe.drop_tokens and not dropless.moe.drop_tokens
    for cfg in (cf4, dropless):
        assert cfg.ds["optimizer"]["params"]["lr"] == 3e-5 and cfg.train.min_lr == 3e-7
        assert cfg.train.warmup_steps == 100 and cfg.moe.aux_loss_coef == 1e-2
        assert cfg.ds["bf16"]["enabled"] and cfg.model.dtype == "bf16"
