"""The upcycling invariant: at step 0 the MoE computes the dense model's function, exactly.

Real deepspeed.moe layers on tiny random Llama configs (fp32, eval, dropless routing).
"""

import pytest
import torch
from torch import nn

from ds_upcycle.config import MoEConfig
from ds_upcycle.moe import MoEBlock, attach_process_groups, moe_blocks
from ds_upcycle.plan import make_plan
from ds_upcycle.tools.tiny import VARIANTS
from ds_upcycle.upcycle import router_init, upcycle


def _probe(model, seed=0, batch=2, seq=24):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen)


def _upcycled_logit_diff(model, cfg):
    ids = _probe(model)
    with torch.no_grad():
        dense = model(ids).logits
        upcycle(model, cfg)
        attach_process_groups(model)
        moe = model.eval()(ids).logits
    return (moe - dense).abs().max().item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("top_k", [2, 4])
def test_upcycled_model_reproduces_dense_logits(dist_world, tiny_llama, variant, top_k):
    diff = _upcycled_logit_diff(tiny_llama(variant), MoEConfig(num_experts=8, top_k=top_k))
    assert diff <= 1e-5, f"{variant} top-{top_k}: max |delta logits| = {diff:.3e}"


def test_zero_router_init_is_also_exact(dist_world, tiny_llama):
    assert _upcycled_logit_diff(tiny_llama(), MoEConfig(router_init="zeros")) <= 1e-5


@pytest.mark.parametrize(
    "cfg",
    [
        MoEConfig(top_k=1),  # DeepSpeed scales the single expert by its gate probability
        MoEConfig(drop_tokens=True, eval_capacity_factor=0.25, min_capacity=1),  # tokens dropped
        MoEConfig(expert_init="noise", expert_noise_std=1e-2),
    ],
    ids=["top1", "dropping", "noisy_experts"],
)
def test_negative_controls_differ(dist_world, tiny_llama, cfg):
    """Settings that are not function-preserving must fail the same check: it can fail."""
    assert _upcycled_logit_diff(tiny_llama(), cfg) > 1e-3


def test_second_expert_sampling_is_off_so_eval_is_deterministic(dist_world, tiny_llama):
    model = tiny_llama()
    upcycle(model, MoEConfig())
    attach_process_groups(model)
    for _, block in moe_blocks(model):
        assert block.moe.deepspeed_moe.gate.top2_2nd_expert_sampling is False
    ids = _probe(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)


def test_only_selected_layers_are_replaced(tiny_llama):
    model = tiny_llama(num_hidden_layers=4)
    untouched = model.model.layers[1].mlp
    upcycle(model, MoEConfig(moe_layers="every_2"), ep_rank=0)
    assert [i for i, _ in moe_blocks(model)] == [0, 2]
    assert model.model.layers[1].mlp is untouched
    assert type(model.model.layers[3].mlp).__name__ == "LlamaMLP"


def test_experts_are_copies_and_router_is_seeded(tiny_llama):
    model = tiny_llama()
    dense = {k: v.clone() for k, v in model.model.layers[1].mlp.state_dict().items()}
    cfg = MoEConfig(num_experts=4)
    upcycle(model, cfg, ep_rank=0)
    block = model.model.layers[1].mlp
    assert len(block.local_experts) == 4
    for expert in block.local_experts:
        for k, v in expert.state_dict().items():
            assert torch.equal(v, dense[k])
    assert torch.equal(block.gate_weight, router_init(cfg, 1, model.config.hidden_size))
    assert not torch.equal(block.gate_weight, model.model.layers[0].mlp.gate_weight)  # per-layer seed


@pytest.mark.parametrize("expert_init", ["copy", "noise"])
def test_each_rank_builds_only_its_shard_of_the_same_moe(tiny_llama, expert_init):
    """Online upcycling: ep ranks 0 and 1 of ep_size 2 hold exactly the two halves of the experts
    that ep_size 1 builds, and the same router: whatever the layout, the model is the same."""
    full = upcycle(tiny_llama(), MoEConfig(expert_init=expert_init), ep_rank=0)
    halves = [upcycle(tiny_llama(), MoEConfig(ep_size=2, expert_init=expert_init), ep_rank=r) for r in (0, 1)]
    for (i, block), h0, h1 in zip(moe_blocks(full), *(moe_blocks(h) for h in halves), strict=True):
        assert len(h0[1].local_experts) == len(h1[1].local_experts) == 4
        assert torch.equal(block.gate_weight, h0[1].gate_weight) and torch.equal(block.gate_weight, h1[1].gate_weight)
        sharded = list(h0[1].local_experts) + list(h1[1].local_experts)
        for e, (a, b) in enumerate(zip(block.local_experts, sharded, strict=True)):
            for (ka, va), (kb, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items()), strict=True):
                assert ka == kb and torch.equal(va, vb), f"layer {i} expert {e} {ka}"


def test_noisy_experts_differ_from_each_other(tiny_llama):
    model = upcycle(tiny_llama(), MoEConfig(expert_init="noise"), ep_rank=0)
    experts = model.model.layers[0].mlp.local_experts
    assert not torch.equal(experts[0].gate_proj.weight, experts[1].gate_proj.weight)


@pytest.mark.parametrize("variant", ["gqa", "tied", "head_dim"])
@pytest.mark.parametrize("moe_layers", ["all", "every_2"])
def test_parameter_counts_match_plan(tiny_llama, variant, moe_layers):
    model = tiny_llama(variant, num_hidden_layers=3)
    cfg = MoEConfig(moe_layers=moe_layers)
    plan = make_plan(model.config, cfg, world_size=1, seq_len=16)
    assert sum(p.numel() for p in model.parameters()) == plan.dense_total
    upcycle(model, cfg, ep_rank=0)
    assert sum(p.numel() for p in model.parameters()) == plan.moe_total
    expert = model.model.layers[0].mlp.local_experts[0]
    per_expert = sum(p.numel() for p in expert.parameters())
    inactive = len(moe_blocks(model)) * (cfg.num_experts - cfg.top_k) * per_expert
    assert plan.moe_active == plan.moe_total - inactive


def test_unknown_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel is not supported. upcycle supports dense LlamaForCausalLM"):
        upcycle(model, MoEConfig())


def test_moe_model_is_refused():
    from transformers import MixtralConfig, MixtralForCausalLM

    model = MixtralForCausalLM(
        MixtralConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(ValueError, match=r"MixtralForCausalLM is not supported. It is already a Mixture-of-Experts"):
        upcycle(model, MoEConfig())


def test_upcycling_twice_is_refused(tiny_llama):
    model = upcycle(tiny_llama(), MoEConfig(), ep_rank=0)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM is already upcycled to MoE"):
        upcycle(model, MoEConfig(), ep_rank=0)


def test_mlp_without_projections_is_refused(tiny_llama):
    model = tiny_llama()
    model.model.layers[1].mlp = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(ValueError, match=r"layer 1 MLP \(Sequential\) lacks gate_proj, up_proj, down_proj"):
        upcycle(model, MoEConfig())


def test_non_silu_activation_is_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"hidden_act='gelu'; upcycle supports SwiGLU MLPs with hidden_act='silu'"):
        upcycle(tiny_llama(hidden_act="gelu"), MoEConfig())


def test_layer_index_out_of_range_is_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"moe.moe_layers \(\[5\]\) has indices \[5\] out of range"):
        upcycle(tiny_llama(), MoEConfig(moe_layers=[5]))


def test_block_records_router_statistics(dist_world, tiny_llama):
    model = upcycle(tiny_llama(), MoEConfig(z_loss_coef=1e-3, balance="global_batch"))
    attach_process_groups(model)
    model.train()
    ids = _probe(model, batch=2, seq=24)
    model(ids)
    for _, block in moe_blocks(model):
        assert isinstance(block, MoEBlock)
        assert block.num_tokens == 48
        assert int(block.exp_counts.sum()) == 2 * 48  # top-2: every token routed twice, none dropped
        assert block.aux_loss.requires_grad and block.aux_loss.item() >= 1.0 - 1e-6  # 1 = perfect balance
        assert block.z_loss is not None and block.z_loss.item() >= 0


def test_upcycled_blocks_keep_the_models_mode(tiny_llama):
    model = upcycle(tiny_llama(), MoEConfig(), ep_rank=0)  # tiny_llama() is in eval mode
    assert all(not block.training for _, block in moe_blocks(model))
    model.train()
    assert all(block.training for _, block in moe_blocks(model))


def test_zero_router_init_spreads_step0_routes(dist_world, tiny_llama):
    """All-zero logits would tie and argmax would send every token to experts 0 and 1; the seeded
    jitter spreads the first step's routes over all experts (and parity holds, above)."""
    model = upcycle(tiny_llama(), MoEConfig(router_init="zeros"))
    attach_process_groups(model)
    with torch.no_grad():
        model.train()(_probe(model, batch=4, seq=64))
    for i, block in moe_blocks(model):
        counts = block.exp_counts.double()
        assert counts.sum() == 2 * 256 and (counts > 0).all(), f"layer {i}: {counts.tolist()}"
        assert counts.max() / counts.mean() < 1.5, f"layer {i}: {counts.tolist()}"
        assert block.gate_weight.abs().max() < 1e-5  # still "zeros": near-uniform probabilities
