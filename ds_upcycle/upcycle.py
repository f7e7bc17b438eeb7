"""Upcycling: turn a dense Llama-family causal LM into an MoE one, in place, on each rank.

Each selected decoder layer's MLP becomes an :class:`~ds_upcycle.moe.MoEBlock` whose experts are
copies of that MLP and whose router is new. Under expert parallelism each rank builds only its
``num_experts / ep_size`` experts straight from the dense weights it already holds; the full MoE
never exists anywhere ("online upcycling", arXiv 2412.09952 section 3).

Invariant (tests/test_upcycle.py): with top_k >= 2, dropless routing and copied experts, the
upcycled model computes exactly the dense model's function at step 0, because DeepSpeed's
top-k gates are renormalised to sum to 1 (deepspeed/moe/sharded_moe.py top2gating/topkgating).

Recipes (MoEConfig): ``expert_init`` "copy", "noise" or "drop" (Drop-Upcycling, arXiv 2502.19261),
``granularity`` G (granular upcycling with virtual-group router init, arXiv 2410.07524; exact at
step 0 like copies), ``router_init`` "normal", "uniform" or "zeros". Every expert's init is a pure
function of the dense weights and (seed, layer, global expert id): :func:`expert_weights`.
"""

from __future__ import annotations

import copy
import math

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
    """The router weight [num_experts, D] for one layer: a pure function of (seed, layer), so it is
    identical on every rank without a broadcast.

    One row per copy of the dense MLP, repeated for the copy's granularity segments ("virtual
    groups", arXiv 2410.07524): the G experts of a copy get equal logits, so renormalised top-k
    takes or leaves whole copies. Copies must not tie with each other (torch.topk breaks ties in no
    fixed order and could split them): "zeros" is therefore zeros plus a seeded jitter per copy.
    """
    copies = cfg.num_copies
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + layer)
    if cfg.router_init == "uniform":
        # U(-a, a) has std a / sqrt(3): the same std as the normal init.
        half_width = cfg.router_init_std * math.sqrt(3.0)
        rows = (torch.rand(copies, hidden_size, generator=gen) * 2 - 1) * half_width
    else:
        std = ZEROS_JITTER_STD if cfg.router_init == "zeros" else cfg.router_init_std
        rows = torch.randn(copies, hidden_size, generator=gen) * std
    return rows.repeat_interleave(cfg.granularity, dim=0)


# --------------------------------------------------------------------------------------------
# Expert init: one pure function of the dense weights and (seed, layer, global expert id), shared
# by online upcycling (each rank, its own experts) and the offline conversion (export.py).
# Shape legend: F intermediate (dense), W = F / G expert width, D hidden.
# --------------------------------------------------------------------------------------------


def dense_segment(dense: dict[str, torch.Tensor], granularity: int, segment: int) -> dict[str, torch.Tensor]:
    """Segment ``segment`` of G of a dense MLP: gate/up rows and down columns of its W neurons, the
    down projection scaled by G. The G segments, each weighted 1/G by renormalised top-k over a
    whole copy, sum to the dense MLP: sum_s (1/G) G down_s(act(gate_s x) up_s x) = down(...)."""
    if granularity == 1:
        return dict(dense)
    width = dense["gate_proj"].shape[0] // granularity
    rows = slice(segment * width, (segment + 1) * width)
    return {
        "gate_proj": dense["gate_proj"][rows].clone(),
        "up_proj": dense["up_proj"][rows].clone(),
        "down_proj": dense["down_proj"][:, rows] * granularity,
    }


def _expert_seed(cfg: MoEConfig, layer: int, expert: int) -> int:
    return (cfg.seed * 100_003 + layer) * 1_009 + expert + 1


def _add_noise(w: dict[str, torch.Tensor], cfg: MoEConfig, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """Copies plus N(0, expert_noise_std), drawn in the order down, gate, up (sorted names)."""
    gen = torch.Generator().manual_seed(_expert_seed(cfg, layer, expert))
    out = {}
    for proj in sorted(w):
        noise = torch.randn(w[proj].shape, generator=gen) * cfg.expert_noise_std
        out[proj] = w[proj] + noise.to(w[proj].dtype).to(w[proj].device)
    return out


def drop_neurons(cfg: MoEConfig, layer: int, expert: int, width: int) -> torch.Tensor:
    """The intermediate neurons Drop-Upcycling re-initialises in one expert: round(drop_ratio x W)
    of them, a pure function of (seed, layer, global expert id)."""
    gen = torch.Generator().manual_seed(_expert_seed(cfg, layer, expert) + 7_919 * 1_000_003)
    return torch.randperm(width, generator=gen)[: round(cfg.drop_ratio * width)]


def _drop_upcycle(
    w: dict[str, torch.Tensor], stats: dict[str, tuple[float, float]], cfg: MoEConfig, layer: int, expert: int
) -> dict[str, torch.Tensor]:
    """Drop-Upcycling (arXiv 2502.19261, section 3): the chosen neurons' gate/up rows and down columns
    are drawn from N(mean, std) of the dense matrix they come from; the rest stay copies."""
    width = w["gate_proj"].shape[0]
    idx = drop_neurons(cfg, layer, expert, width)
    gen = torch.Generator().manual_seed(_expert_seed(cfg, layer, expert) + 2 * 7_919 * 1_000_003)
    out = {proj: t.clone() for proj, t in w.items()}
    for proj in MLP_PROJECTIONS:
        mean, std = stats[proj]
        t = out[proj]
        shape = (len(idx), t.shape[1]) if proj != "down_proj" else (t.shape[0], len(idx))
        fresh = (torch.randn(shape, generator=gen) * std + mean).to(t.dtype).to(t.device)
        if proj == "down_proj":
            t[:, idx] = fresh
        else:
            t[idx] = fresh
    return out


def matrix_stats(dense: dict[str, torch.Tensor], granularity: int) -> dict[str, tuple[float, float]]:
    """(mean, std) of each dense matrix as its experts hold it (down scaled by G), in float64 so the
    result does not depend on the reduction order (threads)."""
    scale = {"down_proj": float(granularity)}
    return {p: (float(t.double().mean()) * scale.get(p, 1.0), float(t.double().std()) * scale.get(p, 1.0))
            for p, t in dense.items()}  # fmt: skip


def expert_weights(dense: dict[str, torch.Tensor], cfg: MoEConfig, layer: int, expert: int) -> dict[str, torch.Tensor]:
    """The init of global expert ``expert`` of MoE layer ``layer`` from the dense MLP's weights
    ({gate_proj, up_proj, down_proj}: [F, D], [F, D], [D, F]): its granularity segment, then the
    expert_init recipe. The same whatever ep_size builds it, online or offline."""
    w = dense_segment(dense, cfg.granularity, expert % cfg.granularity)
    if cfg.expert_init == "noise":
        return _add_noise(w, cfg, layer, expert)
    if cfg.expert_init == "drop":
        return _drop_upcycle(w, matrix_stats(dense, cfg.granularity), cfg, layer, expert)
    return w


def _expert_template(dense: nn.Module, granularity: int) -> nn.Module:
    """The module DeepSpeed's Experts deep-copies: the dense MLP itself, or (G > 1) a copy of it
    with W-wide projections (segment 0)."""
    if granularity == 1:
        return dense
    template = copy.deepcopy(dense)
    trainable = dense.gate_proj.weight.requires_grad
    for proj, t in dense_segment(_dense_weights(dense), granularity, 0).items():
        linear = nn.Linear(t.shape[1], t.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(t.clone(), requires_grad=trainable)
        setattr(template, proj, linear)
    if hasattr(template, "intermediate_size"):
        template.intermediate_size = dense.gate_proj.weight.shape[0] // granularity
    return template


def _dense_weights(mlp: nn.Module) -> dict[str, torch.Tensor]:
    return {p: getattr(mlp, p).weight.detach() for p in MLP_PROJECTIONS}


def load_expert(expert: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy one expert's init into its (already built) parameters, keeping DeepSpeed's attributes."""
    with torch.no_grad():
        for proj, t in weights.items():
            getattr(expert, proj).weight.copy_(t)


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
    cfg.check_intermediate(model.config.intermediate_size)
    num_local = cfg.num_experts // cfg.ep_size
    for i in cfg.layer_indices(len(model.model.layers)):
        layer = model.model.layers[i]
        dense = layer.mlp
        ref = dense.gate_proj.weight
        block = MoEBlock(hidden, _expert_template(dense, cfg.granularity), cfg)
        gate = block.moe.deepspeed_moe.gate
        gate.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            block.gate_weight.copy_(router_init(cfg, i, hidden))
        if cfg.granularity > 1 or cfg.expert_init != "copy":
            weights = _dense_weights(dense)
            for j, expert in enumerate(block.local_experts):
                load_expert(expert, expert_weights(weights, cfg, i, ep_rank * num_local + j))
        block.train(dense.training)  # an eval()-mode model stays in eval mode (eval capacity, no jitter)
        layer.mlp = block  # the dense MLP is dropped here; only the local copies remain
    return model
