"""Upcycling: turn a dense Llama-family causal LM into an MoE one, in place, on each rank.

Each selected decoder layer's MLP becomes an :class:`~ds_upcycle.moe.MoEBlock` whose experts are
copies of that MLP and whose router is new. Under expert parallelism each rank builds only its
``num_experts / ep_size`` experts straight from the dense weights it already holds; the full MoE
never exists anywhere ("online upcycling", arXiv 2412.09952 section 3).

Invariant (tests/test_upcycle.py): with top_k >= 2, dropless routing and copied experts, the
upcycled model computes exactly the dense model's function at step 0, because DeepSpeed's
top-k gates are renormalised to sum to 1 (deepspeed/moe/sharded_moe.py top2gating/topkgating).
"""

from __future__ import annotations

import torch
from torch import nn

from ds_upcycle.config import MoEConfig
from ds_upcycle.moe import MoEBlock, moe_blocks

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_dense_model(model: nn.Module) -> None:
    """Raise ValueError unless model is a dense causal LM with a SwiGLU gate/up/down MLP."""
    name = type(model).__name__
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if name in SUPPORTED_ARCHITECTURES and moe_blocks(model):
        raise ValueError(f"{name} is already upcycled to MoE; upcycle a dense model ({supported})")
    if name not in SUPPORTED_ARCHITECTURES:
        is_moe = any(word in name.lower() for word in ("moe", "mixtral"))
        hint = " It is already a Mixture-of-Experts model." if is_moe else ""
        raise ValueError(f"{name} is not supported.{hint} upcycle supports dense {supported}")
    act = getattr(model.config, "hidden_act", None)
    if act != "silu":
        raise ValueError(f"{name} has hidden_act={act!r}; upcycle supports SwiGLU MLPs with hidden_act='silu'")
    for i, layer in enumerate(model.model.layers):
        missing = [p for p in MLP_PROJECTIONS if not isinstance(getattr(layer.mlp, p, None), nn.Linear)]
        if missing:
            raise ValueError(
                f"{name} layer {i} MLP ({type(layer.mlp).__name__}) lacks {', '.join(missing)}; "
                f"upcycle needs a dense MLP with {', '.join(MLP_PROJECTIONS)} linear layers"
            )


def expert_parallel_rank(ep_size: int) -> int:
    """This process's rank inside its expert-parallel group.

    NOTE: DeepSpeed builds EP groups from contiguous ranks ([0..P-1], [P..2P-1], ...;
    deepspeed/utils/groups.py _create_expert_and_data_parallel), so the EP rank is rank % P.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() % ep_size
    return 0


ZEROS_JITTER_STD = 1e-6
"""Std of the seeded jitter of router_init "zeros". Exactly zero logits tie, and argmax breaks ties
towards the lowest index (deepspeed/moe/sharded_moe.py top2gating), so every token would go to
experts 0..k-1. With the jitter the choice depends on the token, spread over the experts, while the
router probabilities stay uniform to about 1e-6 x |x|."""


def router_init(cfg: MoEConfig, layer: int, hidden_size: int) -> torch.Tensor:
    """The router weight [E, D] for one layer: a pure function of (seed, layer), so it is
    identical on every rank without a broadcast."""
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + layer)
    std = ZEROS_JITTER_STD if cfg.router_init == "zeros" else cfg.router_init_std
    return torch.randn(cfg.num_experts, hidden_size, generator=gen) * std


def _add_expert_noise(expert: nn.Module, cfg: MoEConfig, layer: int, global_expert: int) -> None:
    """Perturb one expert copy; the noise depends only on (seed, layer, global expert id), so
    the model is the same whatever ep_size built it."""
    gen = torch.Generator().manual_seed((cfg.seed * 100_003 + layer) * 1_009 + global_expert + 1)
    with torch.no_grad():
        for _, p in sorted(expert.named_parameters()):
            p.add_((torch.randn(p.shape, generator=gen) * cfg.expert_noise_std).to(p.dtype).to(p.device))


def upcycle(model: nn.Module, cfg: MoEConfig, ep_rank: int | None = None) -> nn.Module:
    """Replace the selected dense MLPs of ``model`` by MoE blocks, in place; returns ``model``.

    ep_rank: this rank's index in its expert-parallel group (default: derived from the
    initialised process group, 0 when there is none). Expert-parallel process groups are
    attached later by ``deepspeed.initialize`` (or :func:`ds_upcycle.moe.attach_process_groups`).
    """
    check_dense_model(model)
    if ep_rank is None:
        ep_rank = expert_parallel_rank(cfg.ep_size)
    if not 0 <= ep_rank < cfg.ep_size:
        raise ValueError(f"ep_rank ({ep_rank}) must be in [0, moe.ep_size={cfg.ep_size})")
    hidden = model.config.hidden_size
    num_local = cfg.num_experts // cfg.ep_size
    for i in cfg.layer_indices(len(model.model.layers)):
        layer = model.model.layers[i]
        dense = layer.mlp
        ref = dense.gate_proj.weight
        block = MoEBlock(hidden, dense, cfg)
        gate = block.moe.deepspeed_moe.gate
        gate.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            block.gate_weight.copy_(router_init(cfg, i, hidden))
        if cfg.expert_init == "noise":
            for j, expert in enumerate(block.local_experts):
                _add_expert_noise(expert, cfg, i, ep_rank * num_local + j)
        block.train(dense.training)  # an eval()-mode model stays in eval mode (eval capacity, no jitter)
        layer.mlp = block  # the dense MLP is dropped here; only the local copies remain
    return model
