"""Dense -> MoE arithmetic from a model config alone: parameters, FLOPs, per-rank memory.

Used by `ds-upcycle plan` (this module's ``main``) before any job is launched, and by the trainer
for MFU.

FLOPs follow Megatron-LM (Narayanan et al. 2021, eq. 3), as used for the 46.8% MFU of
arXiv 2412.09952: training FLOPs per token = 6 x (active matmul parameters, the LM head
included) + 12 x L x s x (n_heads x head_dim) for attention scores and values over a full (not
causally halved) s x s matrix. For Llama-3 shapes this equals the paper's
12 B s L h^2 [(1 + n_kv/n_h + s/h) + (F/h) k 1.5 + V/(2 L h)] / (B s), plus the router's 6 E h.

Granular upcycling (granularity G): E fine-grained experts of width F / G, top-k of them, so a
token touches k / G copies' worth of MLP (the same as top-(k/G) plain copies) and the router has E rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass

from ds_upcycle.config import MoEConfig, moe_from_overrides, moe_overrides_help

ADAM_BYTES = {"bf16": 12, "fp16": 12, "fp32": 8}
"""Adam state per parameter: fp32 m and v, plus an fp32 master copy under mixed precision."""
PARAM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf_config(cls, cfg) -> ModelShape:
        heads = cfg.num_attention_heads
        return cls(
            hidden=cfg.hidden_size,
            intermediate=cfg.intermediate_size,
            layers=cfg.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            vocab=cfg.vocab_size,
            tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        )

    @property
    def attn_params(self) -> int:
        q_o = 2 * self.hidden * self.heads * self.head_dim
        k_v = 2 * self.hidden * self.kv_heads * self.head_dim
        return q_o + k_v

    @property
    def mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class Plan:
    """Counts for one (shape, MoE config, parallel layout); dense figures alongside."""

    shape: ModelShape
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int
    ep_size: int
    world_size: int
    seq_len: int
    dtype: str
    granularity: int = 1

    @property
    def expert_mlp_params(self) -> int:
        """One expert: gate, up and down of width intermediate / granularity."""
        return self.shape.mlp_params // self.granularity

    @property
    def _non_mlp(self) -> int:
        s = self.shape
        embed = s.vocab * s.hidden * (1 if s.tied else 2)
        return embed + s.layers * (s.attn_params + 2 * s.hidden) + s.hidden

    @property
    def router_params(self) -> int:
        return len(self.moe_layers) * self.num_experts * self.shape.hidden

    @property
    def expert_params(self) -> int:
        """All experts of all MoE layers (global)."""
        return len(self.moe_layers) * self.num_experts * self.expert_mlp_params

    @property
    def dense_total(self) -> int:
        return self._non_mlp + self.shape.layers * self.shape.mlp_params

    @property
    def moe_total(self) -> int:
        dense_mlps = (self.shape.layers - len(self.moe_layers)) * self.shape.mlp_params
        return self._non_mlp + dense_mlps + self.expert_params + self.router_params

    @property
    def moe_active(self) -> int:
        """Parameters one token touches: k experts per MoE layer plus the router."""
        return self.moe_total - len(self.moe_layers) * (self.num_experts - self.top_k) * self.expert_mlp_params

    def train_flops_per_token(self, moe: bool) -> float:
        """Megatron's training FLOPs per token (forward + backward), see module docstring."""
        s = self.shape
        matmul = s.layers * s.attn_params + s.vocab * s.hidden  # LM head counts even when tied
        if moe:
            k_mlps = len(self.moe_layers) * (self.top_k * self.expert_mlp_params + self.num_experts * s.hidden)
            matmul += k_mlps + (s.layers - len(self.moe_layers)) * s.mlp_params
        else:
            matmul += s.layers * s.mlp_params
        return 6.0 * matmul + 12.0 * s.layers * self.seq_len * s.heads * s.head_dim

    @property
    def params_per_rank(self) -> int:
        """Parameters one rank holds: everything but the experts, plus its share of experts."""
        return self.moe_total - self.expert_params + self.expert_params // self.ep_size

    def adam_bytes_per_rank(self, zero_stage: int, moe: bool = True) -> float:
        """Adam state per rank. ZeRO-1/2 partition it over the data-parallel ranks: non-expert
        state over world_size, expert state over the expert-data-parallel size world/ep."""
        return ADAM_BYTES[self.dtype] * sum(self._partition(zero_stage, moe))

    def _partition(self, zero_stage: int, moe: bool) -> tuple[float, float]:
        """(non-expert, expert) parameters a rank keeps per-parameter state for under ZeRO: the
        whole model at stage 0, else non-expert state over world_size and the local experts' over
        the expert-data-parallel size world/ep."""
        if not moe:
            return self.dense_total / (1 if zero_stage == 0 else self.world_size), 0.0
        non_expert, local_expert = self.moe_total - self.expert_params, self.expert_params / self.ep_size
        if zero_stage == 0:
            return non_expert, local_expert
        return non_expert / self.world_size, local_expert / (self.world_size // self.ep_size)

    def grad_bytes_per_rank(self, zero_stage: int, moe: bool = True) -> float:
        """Gradients: in the training dtype for every local parameter (ZeRO-0/1) or the rank's
        partition (ZeRO-2), plus the fp32 gradient of the rank's partition under mixed precision."""
        local = self.params_per_rank if moe else self.dense_total
        half = PARAM_BYTES[self.dtype] * (sum(self._partition(zero_stage, moe)) if zero_stage == 2 else local)
        master = 0.0 if self.dtype == "fp32" else 4.0 * sum(self._partition(max(zero_stage, 1), moe))
        return half + master

    def activation_bytes(self, micro_batch: int, checkpointing: bool, moe: bool = True) -> float:
        """Activation memory of one micro-batch: an estimate (about +-25%), for planning.

        Per token and layer a SwiGLU decoder layer keeps about 10 x hidden values for attention,
        norms and residuals (memory-efficient attention: no s x s term) and 4 x intermediate for
        the MLP; an MoE layer keeps that MLP term for each of its top_k routes plus 2 x hidden for
        dispatch and combine (cf. Korthikanti et al. 2022, "Reducing Activation Recomputation").
        With (non-reentrant, per-layer) checkpointing only each layer's input is kept, plus one
        layer recomputed at a time. The LM head adds the logits in the training dtype plus their fp32
        copy and gradient (HF's loss upcasts).
        """
        s, tokens, p = self.shape, micro_batch * self.seq_len, PARAM_BYTES[self.dtype]
        dense_layer = 10 * s.hidden + 4 * s.intermediate
        moe_layer = 10 * s.hidden + self.top_k * (4 * s.intermediate // self.granularity + 2 * s.hidden)
        n_moe = len(self.moe_layers) if moe else 0
        layers = [moe_layer] * n_moe + [dense_layer] * (s.layers - n_moe)
        kept = s.layers * s.hidden + max(layers) if checkpointing else sum(layers)
        return tokens * (p * kept + (p + 8) * s.vocab)

    def peak_bytes_per_rank(self, zero_stage: int, micro_batch: int, checkpointing: bool, moe: bool = True) -> float:
        """Parameters + gradients + Adam state + activations of one rank: the plan's peak estimate
        (no allocator fragmentation, no communication buckets)."""
        params = PARAM_BYTES[self.dtype] * (self.params_per_rank if moe else self.dense_total)
        adam = self.adam_bytes_per_rank(zero_stage, moe)
        grads = self.grad_bytes_per_rank(zero_stage, moe)
        return params + grads + adam + self.activation_bytes(micro_batch, checkpointing, moe)

    def to_dict(self, zero_stage: int, micro_batch: int = 1, checkpointing: bool = True) -> dict:
        return {
            "shape": dataclasses.asdict(self.shape),
            "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "granularity": self.granularity,
            "ep_size": self.ep_size,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "dtype": self.dtype,
            "zero_stage": zero_stage,
            "dense_total_params": self.dense_total,
            "moe_total_params": self.moe_total,
            "moe_active_params": self.moe_active,
            "dense_train_flops_per_token": self.train_flops_per_token(moe=False),
            "moe_train_flops_per_token": self.train_flops_per_token(moe=True),
            "params_per_rank": self.params_per_rank,
            "param_bytes_per_rank": self.params_per_rank * PARAM_BYTES[self.dtype],
            "adam_bytes_per_rank": self.adam_bytes_per_rank(zero_stage),
            "dense_param_bytes_per_rank": self.dense_total * PARAM_BYTES[self.dtype],
            "dense_adam_bytes_per_rank": self.adam_bytes_per_rank(zero_stage, moe=False),
            "micro_batch": micro_batch,
            "activation_checkpointing": checkpointing,
            **{
                f"{prefix}{name}": fn(moe)
                for prefix, moe in (("", True), ("dense_", False))
                for name, fn in (
                    ("grad_bytes_per_rank", lambda m: self.grad_bytes_per_rank(zero_stage, m)),
                    ("activation_bytes_per_rank", lambda m: self.activation_bytes(micro_batch, checkpointing, m)),
                    (
                        "peak_bytes_per_rank",
                        lambda m: self.peak_bytes_per_rank(zero_stage, micro_batch, checkpointing, m),
                    ),
                )
            },
        }


def make_plan(hf_config, moe: MoEConfig, world_size: int, seq_len: int, dtype: str = "bf16") -> Plan:
    """Validate the combination and return its Plan; ValueError names what is wrong."""
    if world_size < 1:
        raise ValueError(f"world_size ({world_size}) must be >= 1")
    if world_size % moe.ep_size != 0:
        raise ValueError(
            f"world_size ({world_size}) must be divisible by moe.ep_size ({moe.ep_size}); "
            "expert-parallel groups tile the world"
        )
    if seq_len < 1:
        raise ValueError(f"seq_len ({seq_len}) must be >= 1")
    if dtype not in ADAM_BYTES:
        raise ValueError(f"dtype ({dtype!r}) must be one of {', '.join(ADAM_BYTES)}")
    shape = ModelShape.from_hf_config(hf_config)
    moe.check_intermediate(shape.intermediate)
    return Plan(
        shape=shape,
        moe_layers=tuple(moe.layer_indices(shape.layers)),
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        ep_size=moe.ep_size,
        world_size=world_size,
        seq_len=seq_len,
        dtype=dtype,
        granularity=moe.granularity,
    )


# --------------------------------------------------------------------------------------------
# `ds-upcycle plan`
# --------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _count(n: float) -> str:
    return f"{n / 1e9:,.3f} B" if n >= 1e8 else f"{n / 1e6:,.3f} M"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ds-upcycle plan",
        description="Read a dense checkpoint's config.json (no weights) and print the dense -> MoE "
        "table: total and active parameters, training FLOPs per token (Megatron's formula), and "
        "per-rank parameter and Adam-state memory under ZeRO at the given layout. Validates the "
        "combination before anyone launches a job.",
        epilog="example: ds-upcycle plan path/to/Meta-Llama-3-8B --moe.ep_size=8 --world-size 8 --seq-len 8192",
    )
    p.add_argument("model", help="dense HF checkpoint folder, or a config.json file")
    p.add_argument("--world-size", type=int, default=None, help="total ranks (default: moe.ep_size)")
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for FLOPs (default 4096)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training dtype (default bf16)")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2], help="ZeRO stage (default 1)")
    p.add_argument("--micro-batch", type=int, default=1, help="sequences per rank per micro-batch (default 1)")
    p.add_argument(
        "--no-activation-checkpointing", action="store_true", help="estimate activations without checkpointing"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument_group("MoE settings", moe_overrides_help())
    args, overrides = p.parse_known_args(argv)

    from ds_upcycle.loading import check_sizes, load_hf_config

    moe = moe_from_overrides(overrides)
    hf = load_hf_config(args.model, field="model")
    check_sizes(hf, "model")
    world = args.world_size if args.world_size is not None else moe.ep_size
    plan = make_plan(hf, moe, world, args.seq_len, args.dtype)
    if args.micro_batch < 1:
        raise ValueError(f"--micro-batch ({args.micro_batch}) must be >= 1")
    d = plan.to_dict(args.zero_stage, args.micro_batch, not args.no_activation_checkpointing)
    print(json.dumps(d, indent=2) if args.json else format_table(plan, d, args.model))
    return 0


def _granular_note(plan: Plan) -> str:
    g = plan.granularity
    if g == 1:
        return ""
    width = plan.shape.intermediate // g
    return f" (granularity {g}: {plan.num_experts // g} copies x {g} experts of width {width}, top-{plan.top_k // g} copies)"


def format_table(plan: Plan, d: dict, source: str) -> str:
    """The dense vs MoE table `ds-upcycle plan` prints."""
    s = plan.shape
    dense = d["dense_total_params"]
    lines = [
        f"{source}: hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers, "
        f"{s.heads} heads ({s.kv_heads} KV, head_dim {s.head_dim}), vocab {s.vocab}, tied {s.tied}",
        f"MoE: {plan.num_experts} experts, top-{plan.top_k}{_granular_note(plan)}, on {len(plan.moe_layers)}/{s.layers} "
        f"layers; ep {plan.ep_size}, world {plan.world_size}, ZeRO-{d['zero_stage']}, {plan.dtype}, seq {plan.seq_len}, "
        f"micro-batch {d['micro_batch']}, activation checkpointing {'on' if d['activation_checkpointing'] else 'off'}\n",
    ]
    rows = [
        ("total parameters", _count(dense), _count(d["moe_total_params"])),
        ("active parameters / token", _count(dense), _count(d["moe_active_params"])),
        (
            "training FLOPs / token",
            f"{d['dense_train_flops_per_token'] / 1e9:,.2f} GFLOP",
            f"{d['moe_train_flops_per_token'] / 1e9:,.2f} GFLOP",
        ),
        ("parameters per rank", _count(dense), _count(d["params_per_rank"])),
        ("parameter memory per rank", _gib(d["dense_param_bytes_per_rank"]), _gib(d["param_bytes_per_rank"])),
        ("Adam state per rank", _gib(d["dense_adam_bytes_per_rank"]), _gib(d["adam_bytes_per_rank"])),
        ("gradients per rank", _gib(d["dense_grad_bytes_per_rank"]), _gib(d["grad_bytes_per_rank"])),
        ("activations per rank", _gib(d["dense_activation_bytes_per_rank"]), _gib(d["activation_bytes_per_rank"])),
        ("peak memory per rank (est.)", _gib(d["dense_peak_bytes_per_rank"]), _gib(d["peak_bytes_per_rank"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    lines.append(f"| {'':{w0}} | {'dense':>14} | {'MoE':>14} |")
    lines.append(f"|{'-' * (w0 + 2)}|{'-' * 16}|{'-' * 16}|")
    lines += [f"| {name:{w0}} | {a:>14} | {b:>14} |" for name, a, b in rows]
    ratio = d["moe_train_flops_per_token"] / d["dense_train_flops_per_token"]
    lines.append(
        f"\nMoE/dense FLOPs per token: {ratio:.2f}x; total/active parameters: "
        f"{d['moe_total_params'] / d['moe_active_params']:.2f}x"
    )
    return "\n".join(lines)
