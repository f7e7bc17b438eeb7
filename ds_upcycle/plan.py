"""Dense -> MoE arithmetic from a model config alone: parameters, FLOPs, per-rank memory.

Used by `ds-upcycle plan` before any job is launched, and by the trainer for MFU.

FLOPs follow Megatron-LM (Narayanan et al. 2021, eq. 3), as used for the 46.8% MFU of
arXiv 2412.09952: training FLOPs per token = 6 x (active matmul parameters, the LM head
included) + 12 x L x s x (n_heads x head_dim) for attention scores and values over a full (not
causally halved) s x s matrix. For Llama-3 shapes this equals the paper's
12 B s L h^2 [(1 + n_kv/n_h + s/h) + (F/h) k 1.5 + V/(2 L h)] / (B s), plus the router's 6 E h.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ds_upcycle.config import MoEConfig

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
        return len(self.moe_layers) * self.num_experts * self.shape.mlp_params

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
        return self.moe_total - len(self.moe_layers) * (self.num_experts - self.top_k) * self.shape.mlp_params

    def train_flops_per_token(self, moe: bool) -> float:
        """Megatron's training FLOPs per token (forward + backward), see module docstring."""
        s = self.shape
        matmul = s.layers * s.attn_params + s.vocab * s.hidden  # LM head counts even when tied
        if moe:
            k_mlps = len(self.moe_layers) * (self.top_k * s.mlp_params + self.num_experts * s.hidden)
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
        per = ADAM_BYTES[self.dtype]
        if not moe:
            return per * self.dense_total / (1 if zero_stage == 0 else self.world_size)
        non_expert = self.moe_total - self.expert_params
        local_expert = self.expert_params / self.ep_size
        if zero_stage == 0:
            return per * (non_expert + local_expert)
        return per * (non_expert / self.world_size + local_expert / (self.world_size // self.ep_size))

    def to_dict(self, zero_stage: int) -> dict:
        return {
            "shape": dataclasses.asdict(self.shape),
            "moe_layers": list(self.moe_layers),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
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
    return Plan(
        shape=shape,
        moe_layers=tuple(moe.layer_indices(shape.layers)),
        num_experts=moe.num_experts,
        top_k=moe.top_k,
        ep_size=moe.ep_size,
        world_size=world_size,
        seq_len=seq_len,
        dtype=dtype,
    )
