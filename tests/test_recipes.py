"""Upcycling recipes, each with its invariant: Drop-Upcycling, granular upcycling (virtual groups),
the uniform router init, router freezing and LR scaling on a real DeepSpeed engine, and the
upcycling-health metrics. Multi-rank versions live in tests/test_recipes_multiproc.py."""

import dataclasses
import itertools

import pytest
import torch
from transformers import LlamaForCausalLM, MixtralForCausalLM

from ds_upcycle.cli import main as cli
from ds_upcycle.config import MoEConfig, moe_from_overrides
from ds_upcycle.export import upcycle_offline
from ds_upcycle.metrics import health_metrics, layer_health
from ds_upcycle.mixtral import load_mixtral_as_moe
from ds_upcycle.moe import attach_process_groups, moe_blocks
from ds_upcycle.plan import make_plan
from ds_upcycle.tools.tiny import tiny_llama_config
from ds_upcycle.upcycle import drop_neurons, router_init, upcycle

PROJ = ("gate_proj", "up_proj", "down_proj")


def _dense_mlp(model, layer):
    return {p: getattr(model.model.layers[layer].mlp, p).weight.detach().clone() for p in PROJ}


def _expert(block, j):
    return {p: getattr(block.local_experts[j], p).weight.detach() for p in PROJ}


def _state_equal(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- Drop-Upcycling ---------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_drop_reinitialises_exactly_drop_ratio_of_each_experts_neurons(tiny_llama, ratio):
    model = tiny_llama()
    dense = {i: _dense_mlp(model, i) for i in (0, 1)}
    cfg = MoEConfig(expert_init="drop", drop_ratio=ratio)
    upcycle(model, cfg, ep_rank=0)
    width = dense[0]["gate_proj"].shape[0]
    subsets = []
    for layer, block in moe_blocks(model):
        d = dense[layer]
        for e in range(cfg.num_experts):
            w = _expert(block, e)
            changed = {
                "gate_proj": (w["gate_proj"] != d["gate_proj"]).any(dim=1),
                "up_proj": (w["up_proj"] != d["up_proj"]).any(dim=1),
                "down_proj": (w["down_proj"] != d["down_proj"]).any(dim=0),
            }
            # the same neurons in all three matrices; every other neuron an exact copy
            assert torch.equal(changed["gate_proj"], changed["up_proj"])
            assert torch.equal(changed["gate_proj"], changed["down_proj"])
            assert changed["gate_proj"].sum().item() / width == ratio
            idx = drop_neurons(cfg, layer, e, width)
            assert torch.equal(changed["gate_proj"].nonzero().flatten(), idx.sort().values)
            subsets.append(tuple(idx.sort().values.tolist()))
            # re-drawn values follow the dense matrix's own statistics
            fresh = w["up_proj"][idx]
            assert fresh.mean().item() == pytest.approx(d["up_proj"].mean().item(), abs=0.01)
            assert fresh.std().item() == pytest.approx(d["up_proj"].std().item(), rel=0.1)
    assert len(set(subsets)) == len(subsets)  # a different subset per (layer, expert)


RECIPES = {
    "drop": MoEConfig(expert_init="drop", router_init="uniform"),
    "granular2": MoEConfig(num_experts=16, top_k=4, granularity=2),
    "granular4_drop": MoEConfig(num_experts=16, top_k=8, granularity=4, expert_init="drop"),
    "noise": MoEConfig(expert_init="noise"),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_ep_size_builds_the_same_model(tiny_llama, name):
    """Ranks 0 and 1 of ep 2 (and 0..3 of ep 4) hold exactly the shards of the ep-1 model."""
    cfg = RECIPES[name]
    full = upcycle(tiny_llama(), cfg, ep_rank=0)
    for ep in (2, 4):
        shards = [upcycle(tiny_llama(), dataclasses.replace(cfg, ep_size=ep), ep_rank=r) for r in range(ep)]
        for (layer, block), *parts in zip(moe_blocks(full), *(moe_blocks(s) for s in shards), strict=True):
            assert all(torch.equal(block.gate_weight, p[1].gate_weight) for p in parts)
            sharded = [e for p in parts for e in p[1].local_experts]
            for e, (a, b) in enumerate(zip(block.local_experts, sharded, strict=True)):
                assert _state_equal(a, b), f"{name} ep {ep} layer {layer} expert {e}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_offline_upcycle_is_bit_identical_to_online(tmp_path, tiny_llama, name):
    """`ds-upcycle upcycle --moe.KEY=VALUE` writes what online upcycling builds, bit for bit, on every rank."""
    cfg = dataclasses.replace(RECIPES[name], ep_size=2)
    tiny_llama("tied").save_pretrained(tmp_path / "dense", safe_serialization=True)
    flags = [f"--moe.{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v != getattr(MoEConfig(), k)]
    assert moe_from_overrides(flags) == cfg
    assert cli(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--no-progress", *flags]) == 0
    for rank in (0, 1):
        offline = load_mixtral_as_moe(tmp_path / "moe", cfg, ep_rank=rank)
        online = upcycle(tiny_llama("tied"), cfg, ep_rank=rank)
        assert _state_equal(offline, online), f"{name} rank {rank}"


# -- granular upcycling -----------------------------------------------------------------------


def _logit_diff(model, cfg):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(ids).logits
        upcycle(model, cfg)
        attach_process_groups(model)
        return (model.eval()(ids).logits - dense).abs().max().item()


@pytest.mark.parametrize("variant", ["gqa_tied_rope", "head_dim"])  # GQA + tied + rope scaling at once
@pytest.mark.parametrize("experts, top_k, g", [(16, 4, 2), (32, 8, 4), (8, 4, 4), (12, 6, 3)])
def test_granular_upcycling_reproduces_dense_logits(dist_world, tiny_llama, variant, experts, top_k, g):
    cfg = MoEConfig(num_experts=experts, top_k=top_k, granularity=g, router_init="uniform")
    diff = _logit_diff(tiny_llama(variant, intermediate_size=96 if g == 3 else 128), cfg)
    assert diff <= 1e-5, f"{variant} E{experts} top-{top_k} G{g}: max |delta logits| = {diff:.3e}"


def _selected(gate, x_TD):
    """[T, E] mask of the experts DeepSpeed's own gate picks for each token (eval, dropless)."""
    _, combine_TEC, _, _ = gate(x_TD)
    return combine_TEC.sum(dim=-1) > 0


@pytest.mark.parametrize("experts, top_k, g", [(16, 4, 2), (32, 8, 4), (6, 3, 3), (12, 6, 3), (18, 6, 3)])
def test_top_k_selects_whole_copies(dist_world, tiny_llama, experts, top_k, g):
    """DeepSpeed's top-k (deepspeed/moe/sharded_moe.py) takes or leaves each copy's G segments
    together, for 2048 tokens, also where G does not divide the GEMM's vector width (G = 3: the
    repeated router rows' logits may differ in the last bit there)."""
    model = upcycle(tiny_llama(intermediate_size=96 if g == 3 else 128), MoEConfig(experts, top_k, granularity=g))
    attach_process_groups(model)
    gate = moe_blocks(model)[0][1].moe.deepspeed_moe.gate.eval()
    x_TD = torch.randn(2048, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        picked_TCG = _selected(gate, x_TD).view(len(x_TD), experts // g, g)
    assert (picked_TCG.all(dim=-1) | ~picked_TCG.any(dim=-1)).all(), "a copy was split"
    assert (picked_TCG.all(dim=-1).sum(dim=-1) == top_k // g).all()


def test_tied_copies_would_be_split_so_zeros_router_is_refused(dist_world, tiny_llama):
    """Why copies must not tie: with equal logits everywhere, torch.topk picks an arbitrary subset
    that splits copies, so the config refuses the tie-making router init."""
    with pytest.raises(
        ValueError, match=r"moe.router_init \('zeros'\) nearly ties all 8 copies when moe.granularity is 2"
    ):
        MoEConfig(num_experts=16, top_k=4, granularity=2, router_init="zeros")
    model = upcycle(tiny_llama(), MoEConfig(num_experts=16, top_k=4, granularity=2))
    attach_process_groups(model)
    block = moe_blocks(model)[0][1]
    with torch.no_grad():
        block.gate_weight.zero_()  # what a zero router would be
        picked_TCG = _selected(block.moe.deepspeed_moe.gate.eval(), torch.randn(64, 64)).view(64, 8, 2)
    assert (picked_TCG.any(dim=-1) & ~picked_TCG.all(dim=-1)).any(), "expected torch.topk to split a tied copy"


def test_granular_router_rows_repeat_per_copy_and_experts_are_scaled_segments(tiny_llama):
    model = tiny_llama()
    dense = _dense_mlp(model, 1)
    cfg = MoEConfig(num_experts=8, top_k=4, granularity=4, router_init="uniform")
    upcycle(model, cfg, ep_rank=0)
    block = moe_blocks(model)[1][1]
    rows = router_init(cfg, 1, 64)
    assert torch.equal(block.gate_weight, rows) and torch.equal(rows, rows[::4].repeat_interleave(4, dim=0))
    assert len(set(map(tuple, rows[::4].tolist()))) == 2  # distinct copies: no ties between them
    for e in range(8):
        s = slice(32 * (e % 4), 32 * (e % 4 + 1))
        w = _expert(block, e)
        assert torch.equal(w["gate_proj"], dense["gate_proj"][s]) and torch.equal(w["up_proj"], dense["up_proj"][s])
        assert torch.equal(w["down_proj"], dense["down_proj"][:, s] * 4)


def test_granular_offline_export_reproduces_the_dense_model(tmp_path, tiny_llama):
    """The step-0 export is a standard Mixtral: E x G experts of width F / G, top-(k x G)."""
    dense = tiny_llama("gqa_tied_rope", bos_token_id=1, eos_token_id=2)
    dense.save_pretrained(tmp_path / "dense", safe_serialization=True)
    upcycle_offline(tmp_path / "dense", tmp_path / "moe", MoEConfig(num_experts=16, top_k=8, granularity=4),
                    progress=False)  # fmt: skip
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    assert (moe.config.num_local_experts, moe.config.num_experts_per_tok, moe.config.intermediate_size) == (16, 8, 32)
    ids = torch.randint(0, dense.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("g", [1, 2, 4])
def test_granular_parameter_counts_match_plan(tiny_llama, g):
    model = tiny_llama("tied", num_hidden_layers=3)
    cfg = MoEConfig(num_experts=8 * g, top_k=2 * g, granularity=g, moe_layers="every_2")
    plan = make_plan(model.config, cfg, world_size=1, seq_len=16)
    dense_plan = make_plan(model.config, MoEConfig(moe_layers="every_2"), world_size=1, seq_len=16)
    upcycle(model, cfg, ep_rank=0)
    assert sum(p.numel() for p in model.parameters()) == plan.moe_total
    # same experts' worth of weights and the same active MLP as 8 copies top-2; only the router grows
    router_growth = 2 * (cfg.num_experts - 8) * 64
    assert plan.moe_total - dense_plan.moe_total == router_growth
    assert plan.moe_active - dense_plan.moe_active == router_growth
    per_token = plan.train_flops_per_token(moe=True) - dense_plan.train_flops_per_token(moe=True)
    assert per_token == 6 * router_growth


def test_plan_command_shows_granularity(tmp_path, capsys):
    tiny_llama_config("gqa").save_pretrained(tmp_path)
    assert cli(["plan", str(tmp_path), "--moe.num_experts=16", "--moe.top_k=4", "--moe.granularity=2"]) == 0
    assert "granularity 2: 8 copies x 2 experts of width 64, top-2 copies" in capsys.readouterr().out


# -- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(num_experts=8, top_k=2, granularity=3),
            r"moe.num_experts \(8\) must be a multiple of moe.granularity \(3\)",
        ),
        (dict(num_experts=16, top_k=2, granularity=4), r"moe.top_k \(2\) must be a multiple of moe.granularity \(4\)"),
        (dict(drop_ratio=0.0), r"moe.drop_ratio \(0.0\) must be in \(0, 1\]"),
        (dict(freeze_router=True, router_lr_scale=0.1), r"moe.router_lr_scale \(0.1\) has no effect with moe.freeze"),
        (dict(router_lr_scale=0.0), r"moe.router_lr_scale \(0.0\) must be > 0"),
        (dict(expert_init="dropout"), r"moe.expert_init \('dropout'\) must be one of 'copy', 'noise', 'drop'"),
    ],
)
def test_bad_recipe_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**kwargs)


def test_granularity_must_divide_the_mlp_width(tiny_llama):
    with pytest.raises(ValueError, match=r"moe.granularity \(3\) must divide the model's intermediate_size \(128\)"):
        upcycle(tiny_llama(), MoEConfig(num_experts=12, top_k=6, granularity=3), ep_rank=0)


def test_uniform_router_init_is_centred_with_the_normal_std():
    w = router_init(MoEConfig(router_init="uniform", router_init_std=0.02, num_experts=64), 0, 512)
    assert w.abs().max().item() <= 0.02 * 3**0.5
    assert w.mean().item() == pytest.approx(0.0, abs=1e-3) and w.std().item() == pytest.approx(0.02, rel=0.02)


# -- router controls on a real DeepSpeed engine (one rank, ZeRO-2) ----------------------------


def _engine(tiny_setup, tmp_path, **moe):
    from conftest import DEBUG_CONFIG, debug_overrides

    from ds_upcycle.config import load_run_config
    from ds_upcycle.preflight import validate
    from ds_upcycle.train import load_model, make_engine

    overrides = {"moe.ep_size": 1, "train.warmup_steps": 2, "train.steps": 6, **{f"moe.{k}": v for k, v in moe.items()}}
    cfg = load_run_config(DEBUG_CONFIG, debug_overrides(tiny_setup, tmp_path, **overrides))
    derived = validate(cfg, 1)
    torch.manual_seed(0)
    return make_engine(cfg, load_model(cfg, derived), derived)


def _steps(engine, n):
    ids = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(0))
    engine.train()
    for _ in range(n):
        engine.backward(engine(input_ids=ids, labels=ids).loss + sum(b.aux_loss for _, b in moe_blocks(engine.module)))
        engine.step()


def _routers(engine):
    return [b.gate_weight.detach().clone() for _, b in moe_blocks(engine.module)]


def _experts(engine):
    return [p.detach().clone() for n, p in engine.module.named_parameters() if "deepspeed_experts" in n]


def test_router_lr_scale_survives_deepspeed_and_the_schedule(dist_world, tiny_setup, tmp_path):
    """The router group's effective lr is scale x the others' at every step (warm-up and cosine),
    and its first update is exactly scale x the unscaled run's."""
    scaled, sched = _engine(tiny_setup, tmp_path / "a", router_lr_scale=0.25)
    plain, _ = _engine(tiny_setup, tmp_path / "b")
    r0 = _routers(scaled)
    assert torch.equal(torch.stack(r0), torch.stack(_routers(plain)))
    for step in range(5):
        lrs = {g["name"]: g["lr"] for g in scaled.optimizer.param_groups}
        assert lrs["router"] == pytest.approx(0.25 * lrs["decay"], rel=1e-12), (step, lrs)
        assert lrs["ep_size_1"] == lrs["decay"] == pytest.approx(sched.get_last_lr()[0])
        _steps(scaled, 1)
        if step == 0:
            _steps(plain, 1)
            for a, b, r in zip(_routers(scaled), _routers(plain), r0, strict=True):
                torch.testing.assert_close(a - r, 0.25 * (b - r), rtol=1e-4, atol=1e-12)


def test_frozen_router_is_bit_identical_while_experts_train(dist_world, tiny_setup, tmp_path):
    engine, _ = _engine(tiny_setup, tmp_path, freeze_router=True)
    assert all(g["name"] != "router" for g in engine.optimizer.param_groups)
    routers, experts = _routers(engine), _experts(engine)
    _steps(engine, 3)
    assert all(torch.equal(a, b) for a, b in zip(routers, _routers(engine), strict=True))
    assert all(not torch.equal(a, b) for a, b in zip(experts, _experts(engine), strict=True))


# -- upcycling-health metrics -----------------------------------------------------------------


def test_health_metrics_are_one_for_copies_at_step_0_and_drop_after_training(dist_world, tiny_setup, tmp_path):
    engine, _ = _engine(tiny_setup, tmp_path, num_experts=8, top_k=4, granularity=2)
    cfg, blocks = MoEConfig(num_experts=8, top_k=4, granularity=2), moe_blocks(engine.module)
    start = health_metrics(blocks, cfg, tiny_setup["model"])
    for layer in (0, 1):
        for key in ("dense_sim_mean", "dense_sim_min", "expert_sim_mean"):
            assert start[f"health/layer_{layer:02d}/{key}"] == pytest.approx(1.0, abs=1e-6)
    assert "health/router_margin" not in start  # no training forward yet
    _steps(engine, 3)
    after = health_metrics(blocks, cfg, tiny_setup["model"])
    for layer in (0, 1):
        assert after[f"health/layer_{layer:02d}/dense_sim_min"] < after[f"health/layer_{layer:02d}/dense_sim_mean"] < 1
        assert after[f"health/layer_{layer:02d}/expert_sim_mean"] < 1
        assert 0 < after[f"health/layer_{layer:02d}/router_margin"] < 1
    assert after["health/dense_sim_min"] == min(after[f"health/layer_{i:02d}/dense_sim_min"] for i in (0, 1))


def test_pairwise_similarity_equals_the_brute_force_mean(dist_world, tiny_llama, tmp_path):
    """The |sum of unit vectors|^2 identity gives the mean over every pair of experts (of the same segment)."""
    model = tiny_llama()
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = MoEConfig(num_experts=8, top_k=4, granularity=2, expert_init="drop")
    upcycle(model, cfg, ep_rank=0)
    attach_process_groups(model)
    from ds_upcycle.metrics import DenseReference

    block = moe_blocks(model)[0][1]
    got = layer_health(block, 0, DenseReference(tmp_path, 2), ep_rank=0)
    vec = [torch.cat([w.flatten() for w in _expert(block, e).values()]).double() for e in range(8)]
    pairs = [(i, j) for i, j in itertools.permutations(range(8), 2) if i % 2 == j % 2]
    brute = sum(torch.nn.functional.cosine_similarity(vec[i], vec[j], dim=0) for i, j in pairs) / len(pairs)
    assert got["expert_sim_mean"] == pytest.approx(brute.item(), abs=1e-6)
    ref = DenseReference(tmp_path, 2)
    cos = [
        torch.nn.functional.cosine_similarity(
            vec[e], torch.cat([t.flatten() for t in ref.expert(0, e).values()]).double(), dim=0
        )
        for e in range(8)
    ]
    assert got["dense_sim_min"] == pytest.approx(min(cos).item(), abs=1e-6)
    assert got["dense_sim_mean"] == pytest.approx((sum(cos) / 8).item(), abs=1e-6)


def _check(argv):
    from ds_upcycle.tools.check import build_parser, run_check

    args, overrides = build_parser().parse_known_args(argv)
    return run_check(args, overrides)  # main() would also tear the process group down


def test_check_states_whether_parity_is_expected(dist_world):
    drop = _check(["--moe.expert_init=drop"])
    assert drop["passed"] and not drop["parity_asserted"] and drop["max_abs_diff"] > 1e-3  # measured, not failed
    assert drop["parity_expectation"].startswith("not expected: expert_init 'drop' re-initialises 50%")
    granular = _check(["--tiny", "gqa_tied_rope", "--moe.num_experts=16", "--moe.top_k=4", "--moe.granularity=2"])
    assert granular["passed"] and granular["parity_asserted"] and granular["max_abs_diff"] <= 1e-5
    assert granular["parity_expectation"].startswith("exact: top-4 takes 2 whole copies of 2 segments")
    top1 = _check(["--moe.top_k=1"])
    assert top1["parity_asserted"] and not top1["passed"]


def test_mixtral_start_of_a_granular_model_keeps_its_layout(tmp_path, tiny_llama):
    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense", safe_serialization=True)
    cfg = MoEConfig(num_experts=8, top_k=4, granularity=2)
    upcycle_offline(tmp_path / "dense", tmp_path / "moe", cfg, progress=False)
    model = load_mixtral_as_moe(tmp_path / "moe", cfg)
    assert isinstance(model, LlamaForCausalLM)
    assert moe_blocks(model)[0][1].local_experts[0].gate_proj.weight.shape == (64, 64)
