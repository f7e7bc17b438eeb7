"""MoEConfig and the run-config loader: every invalid value is refused with a precise message."""

import json

import pytest

from ds_upcycle.config import MoEConfig, load_run_config, parse_overrides


def test_defaults_follow_the_paper():
    cfg = MoEConfig()
    assert (cfg.num_experts, cfg.top_k, cfg.ep_size, cfg.drop_tokens, cfg.aux_loss_coef) == (8, 2, 1, False, 1e-2)
    assert cfg.exact


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=9), r"moe.top_k \(9\) must be <= moe.num_experts \(8\)"),
        (dict(ep_size=3), r"moe.num_experts \(8\) must be divisible by moe.ep_size \(3\)"),
        (dict(num_experts=0), r"moe.num_experts \(0\) must be > 0"),
        (dict(ep_size=-1), r"moe.ep_size \(-1\) must be > 0"),
        (dict(capacity_factor=0.0), r"moe.capacity_factor \(0.0\) must be > 0"),
        (dict(eval_capacity_factor=-1.0), r"moe.eval_capacity_factor \(-1.0\) must be > 0"),
        (dict(min_capacity=0), r"moe.min_capacity \(0\) must be > 0"),
        (dict(aux_loss_coef=-0.1), r"moe.aux_loss_coef \(-0.1\) must be >= 0"),
        (dict(router_init="xavier"), r"moe.router_init \('xavier'\) must be one of 'normal', 'zeros'"),
        (dict(expert_init="granular"), r"moe.expert_init \('granular'\) must be one of 'copy', 'noise'"),
        (dict(balance="global"), r"moe.balance \('global'\) must be one of 'micro_batch', 'global_batch'"),
        (dict(balance_statistic="top1"), r"moe.balance_statistic \('top1'\) must be one of 'deepspeed', 'all_routes'"),
        (dict(router_weight_decay=-0.1), r"moe.router_weight_decay \(-0.1\) must be >= 0"),
        (dict(router_init_std=0.0), r"moe.router_init_std \(0.0\) must be > 0"),
        (dict(moe_layers="odd"), r"moe.moe_layers \('odd'\) must be \"all\", \"every_K\""),
        (dict(moe_layers=[]), r"moe.moe_layers \(\[\]\) must name at least one layer"),
        (dict(moe_layers=[1, 1]), r"moe.moe_layers \(\[1, 1\]\) has duplicate indices"),
    ],
)
def test_invalid_moe_config_is_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_layer_selection():
    assert MoEConfig().layer_indices(4) == [0, 1, 2, 3]
    assert MoEConfig(moe_layers="every_2").layer_indices(5) == [0, 2, 4]
    assert MoEConfig(moe_layers=[3, 1]).layer_indices(4) == [1, 3]
    with pytest.raises(
        ValueError, match=r"moe.moe_layers \(\[0, 7\]\) has indices \[7\] out of range .* 4 layers; use 0..3"
    ):
        MoEConfig(moe_layers=[0, 7]).layer_indices(4)


def test_exactness_flag():
    assert not MoEConfig(top_k=1).exact
    assert not MoEConfig(drop_tokens=True).exact
    assert not MoEConfig(expert_init="noise").exact


def _write(tmp_path, obj):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(obj))
    return p


def test_load_file_and_overrides(tmp_path):
    p = _write(tmp_path, {"train_micro_batch_size_per_gpu": 1, "ds_upcycle": {"moe": {"num_experts": 4}}})
    cfg = load_run_config(
        p, ["--moe.top_k=1", "--train.steps", "7", "--ds.zero_optimization.stage=2", "--moe.moe_layers=[0,2]"]
    )
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 1 and cfg.train.steps == 7
    assert cfg.moe.moe_layers == [0, 2]
    assert cfg.ds["zero_optimization"]["stage"] == 2
    resolved = cfg.to_dict()
    assert resolved["ds_upcycle"]["moe"]["num_experts"] == 4 and resolved["train_micro_batch_size_per_gpu"] == 1


@pytest.mark.parametrize(
    "obj, overrides, message",
    [
        (
            {"ds_upcycle": {"moe": {"num_expert": 4}}},
            [],
            r"moe.num_expert is not a known setting; known moe settings: num_experts",
        ),
        ({"ds_upcycle": {"moee": {}}}, [], r"ds_upcycle.moee is not a known section"),
        ({"ds_upcycle": {"moe": {"top_k": "two"}}}, [], r"moe.top_k \('two'\) must be an integer"),
        ({"ds_upcycle": {"moe": {"drop_tokens": 1}}}, [], r"moe.drop_tokens \(1\) must be true or false"),
        ({"ds_upcycle": {}}, ["--moe.top_k=1.5"], r"moe.top_k \(1.5\) must be an integer"),
        ({"ds_upcycle": {}}, ["moe.top_k=1"], r"override 'moe.top_k=1' is not of the form --section.key=value"),
        ({"ds_upcycle": {}}, ["--foo.bar=1"], r"override --foo.bar names no setting"),
        ({"expert_parallel": {"enabled": True}}, [], r"'expert_parallel' key, which switches on DeepSpeed's AutoEP"),
        ({"train_micro_batch_size_per_gpu": 1}, [], r"has no 'ds_upcycle' section .* plain DeepSpeed config"),
        (
            {"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}, "ds_upcycle": {}},
            [],
            r"DeepSpeed key zero_optimization.reduce_bucket_size is \"auto\"",
        ),
        ({"ds_upcycle": {"train": {"steps": 0}}}, [], r"train.steps \(0\) must be > 0"),
        ({"ds_upcycle": {"data": {"seq_len": -4}}}, [], r"data.seq_len \(-4\) must be > 0"),
        ({"ds_upcycle": {"log": {"wandb": "maybe"}}}, [], r"log.wandb \('maybe'\) must be one of 'auto'"),
    ],
)
def test_invalid_run_config_is_refused_by_name(tmp_path, obj, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(_write(tmp_path, obj), overrides)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match=r"config file '.*nope.json' does not exist"):
        load_run_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"config file '.*bad.json' is not valid JSON"):
        load_run_config(bad)


def test_override_values_parse_as_json_else_string():
    assert parse_overrides(["--a.b=3", "--a.c=true", "--a.d=x/y", "--a.e=[1,2]"]) == [
        (["a", "b"], 3),
        (["a", "c"], True),
        (["a", "d"], "x/y"),
        (["a", "e"], [1, 2]),
    ]


def test_skipped_step_limit_is_validated():
    from ds_upcycle.config import TrainConfig

    with pytest.raises(ValueError, match=r"train.max_skipped_steps \(-1\) must be >= 0"):
        TrainConfig(max_skipped_steps=-1)
    assert TrainConfig().max_skipped_steps == 10
