"""Optimizer groups: no weight decay on norms, biases and (by default) routers; experts inherit."""

import pytest
import torch
from conftest import DEBUG_CONFIG

from ds_upcycle.config import load_run_config
from ds_upcycle.moe import moe_blocks
from ds_upcycle.optim import param_groups, param_kind
from ds_upcycle.upcycle import upcycle


def _cfg(**extra):
    overrides = [f"--{k}={v}" for k, v in {"ds.optimizer.params.weight_decay": 0.1, "moe.ep_size": 1, **extra}.items()]
    return load_run_config(DEBUG_CONFIG, overrides)


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_each_parameter_lands_in_its_kind(tiny_llama):
    model = upcycle(tiny_llama(attention_bias=True), _cfg().moe, ep_rank=0)  # q/k/v/o biases, as Qwen2 has
    kinds = {n: param_kind(n, p) for n, p in model.named_parameters()}
    assert kinds["model.layers.0.mlp.moe.deepspeed_moe.gate.wg.weight"] == "router"
    assert kinds["model.norm.weight"] == kinds["model.layers.1.input_layernorm.weight"] == "no_decay"
    assert kinds["model.layers.0.self_attn.q_proj.bias"] == "no_decay"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == kinds["model.embed_tokens.weight"] == "decay"
    assert kinds["model.layers.0.mlp.moe.deepspeed_moe.experts.deepspeed_experts.3.down_proj.weight"] == "decay"


def test_groups_split_experts_and_keep_their_settings(dist_world, tiny_llama):
    """Expert parameters sit in DeepSpeed's expert groups, which inherit their kind's weight decay."""
    cfg = _cfg(**{"moe.router_weight_decay": 0.01})
    model = upcycle(tiny_llama(attention_bias=True), cfg.moe, ep_rank=0)
    groups = param_groups(model, cfg)
    by = {(g["kind"], g.get("moe", False)): g for g in groups}
    assert set(by) == {("decay", False), ("decay", True), ("no_decay", False), ("router", False)}
    assert "weight_decay" not in by["decay", False]  # the optimizer section's 0.1
    assert by["no_decay", False]["weight_decay"] == 0.0 and by["router", False]["weight_decay"] == 0.01
    assert by["decay", True]["name"] == "ep_size_1"  # DeepSpeed's expert group name
    experts = _names(model, by["decay", True])
    assert experts and all(".deepspeed_experts." in n for n in experts)
    assert _names(model, by["router", False]) == {
        f"model.layers.{i}.mlp.moe.deepspeed_moe.gate.wg.weight" for i in (0, 1)
    }
    assert all(n.endswith(("norm.weight", ".bias")) for n in _names(model, by["no_decay", False]))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


@pytest.mark.parametrize("router_weight_decay", [0.0, 0.05])
def test_a_real_engine_optimizes_those_groups(dist_world, tiny_setup, router_weight_decay):
    """The trainer's own path (load_model, make_engine: deepspeed.initialize, ZeRO-2) keeps every group
    with its weight decay."""
    from ds_upcycle.preflight import validate
    from ds_upcycle.train import load_model, make_engine

    cfg = _cfg(**{"moe.router_weight_decay": router_weight_decay, "ds.train_batch_size": 4,
                  "model.path": tiny_setup["model"], "data.train": f'["{tiny_setup["train"]}"]', "data.eval": "[]"})  # fmt: skip
    derived = validate(cfg, 1)
    model = load_model(cfg, derived)
    engine, _ = make_engine(cfg, model, derived)
    inner = engine.optimizer.optimizer  # the torch AdamW under DeepSpeed's ZeRO-2 wrapper
    decays = {(g["kind"], g.get("moe", False)): g["weight_decay"] for g in inner.param_groups}
    assert decays == {("decay", False): 0.1, ("decay", True): 0.1, ("no_decay", False): 0.0,
                      ("router", False): router_weight_decay}  # fmt: skip
    assert len(moe_blocks(engine.module)) == 2
    ids = torch.randint(0, model.config.vocab_size, (4, 16))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    assert engine.was_step_applied()
