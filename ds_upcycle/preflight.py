"""Checks a run against the world it will run in, before any engine (or process) starts.

`ds-upcycle train` runs them in the front end, so a bad config fails in a second with one
message instead of after every rank has started; every rank runs them again (cheap), since a
rank may be started by the `deepspeed` launcher directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ds_upcycle.config import RunConfig
from ds_upcycle.data import expand_paths
from ds_upcycle.loading import load_hf_config
from ds_upcycle.mixtral import check_mixtral_start


@dataclass(frozen=True)
class Derived:
    """Sizes that follow from a valid run config and its world size."""

    micro: int
    """Sequences per rank per micro-batch."""
    accum: int
    """Micro-batches per optimizer step."""
    global_batch: int
    """Sequences per optimizer step over all ranks."""
    peak_lr: float
    hf_config: Any
    """The model's HF config (dense Llama-family, or Mixtral)."""


def validate(cfg: RunConfig, world_size: int) -> Derived:
    """Check the run against the world it will run in; returns derived sizes. Every problem is a
    ValueError naming the field, the value and the fix."""
    if world_size % cfg.moe.ep_size != 0:
        raise ValueError(
            f"world size ({world_size}) must be divisible by moe.ep_size ({cfg.moe.ep_size}); "
            f"launch a multiple of {cfg.moe.ep_size} ranks or change moe.ep_size"
        )
    check_zero(cfg.ds)
    micro, accum, global_batch = check_batch(cfg.ds, world_size)
    lr = check_optimizer(cfg)
    hf = check_model(cfg)
    if cfg.model.upcycle or hf.model_type == "mixtral":
        check_moe_layout(cfg)
    check_data(cfg)
    return Derived(micro=micro, accum=accum, global_batch=global_batch, peak_lr=lr, hf_config=hf)


def check_zero(ds: dict) -> None:
    """The ZeRO stages and settings DeepSpeed's native MoE works with."""
    zero = ds.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if stage == 3:
        raise ValueError(
            "zero_optimization.stage (3) is not supported: DeepSpeed rejects native MoE layers under "
            "ZeRO-3 (deepspeed/runtime/engine.py); use stage 1 or 2"
        )
    if stage in (1, 2) and zero.get("reduce_scatter", True) is False:
        raise ValueError(f"zero_optimization.reduce_scatter (false) must be true for MoE under ZeRO-{stage}")
    if stage == 2 and zero.get("contiguous_gradients", True) is False:
        raise ValueError("zero_optimization.contiguous_gradients (false) must be true for MoE under ZeRO-2")


def check_moe_layout(cfg: RunConfig) -> None:
    """Layouts DeepSpeed gets wrong with MoE layers, refused with the reason."""
    zero = cfg.ds.get("zero_optimization") or {}
    stage = zero.get("stage", 0)
    if stage == 0:
        what = "zero_optimization.stage (0)" if "stage" in zero else "zero_optimization (absent: ZeRO stage 0)"
        raise ValueError(
            f"{what} is refused with MoE layers: without ZeRO-1/2 DeepSpeed clips gradients by a wrong norm under "
            "expert parallelism (fp32 averages the ranks' norms, deepspeed issue #8475; bf16/fp16 with an unfused "
            "optimizer leave the expert gradients out, PR #8613). Set zero_optimization.stage to 1 or 2"
        )
    if cfg.ds.get("use_data_before_expert_parallelism", False):
        raise ValueError(
            "use_data_before_expert_parallelism (true) is not supported: it puts expert-parallel groups on strided "
            "ranks (deepspeed/utils/groups.py _create_expert_and_data_parallel), while online upcycling builds each "
            "rank's experts for DeepSpeed's default contiguous groups (EP rank = rank % moe.ep_size); remove the key"
        )
    if cfg.moe.top_k == 1 and cfg.log.sample_prompt and cfg.moe.min_capacity > 1:
        raise ValueError(
            f"log.sample_prompt ({cfg.log.sample_prompt!r}) cannot be sampled with moe.top_k 1 and moe.min_capacity "
            f"{cfg.moe.min_capacity}: DeepSpeed's top-1 gate asserts at least min_capacity tokens per forward "
            "(deepspeed/moe/sharded_moe.py top1gating), and greedy decoding feeds one token at a time. Unset "
            "log.sample_prompt or set moe.min_capacity=1"
        )


def check_batch(ds: dict, world_size: int) -> tuple[int, int, int]:
    """(micro, accumulation, global batch): the batch triangle."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or micro < 1:
        raise ValueError(
            f"train_micro_batch_size_per_gpu ({micro!r}) must be a positive integer in the DeepSpeed config"
        )
    accum = ds.get("gradient_accumulation_steps", 1)
    if not isinstance(accum, int) or accum < 1:
        raise ValueError(f"gradient_accumulation_steps ({accum!r}) must be a positive integer")
    global_batch = micro * accum * world_size
    if "train_batch_size" in ds and ds["train_batch_size"] != global_batch:
        raise ValueError(
            f"train_batch_size ({ds['train_batch_size']}) must equal train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accum}) x data-parallel size ({world_size}) = {global_batch}; "
            "fix one of them or drop train_batch_size"
        )
    return micro, accum, global_batch


def check_optimizer(cfg: RunConfig) -> float:
    """The peak LR, the schedule and the precision sections; returns the peak LR."""
    ds = cfg.ds
    lr = (ds.get("optimizer") or {}).get("params", {}).get("lr")
    if not isinstance(lr, (int, float)) or lr <= 0:
        raise ValueError(f"optimizer.params.lr ({lr!r}) must be a positive number: the peak learning rate")
    if cfg.train.min_lr > lr:
        raise ValueError(
            f"train.min_lr ({cfg.train.min_lr}) is above the peak optimizer.params.lr ({lr}); the cosine would "
            "rise instead of decay. Set train.min_lr <= the peak"
        )
    if "scheduler" in ds:
        raise ValueError(
            "the DeepSpeed 'scheduler' section is not used: the schedule is train.warmup_steps, train.steps "
            "and train.min_lr (linear warm-up, then cosine); remove 'scheduler'"
        )
    bf16 = (ds.get("bf16") or {}).get("enabled", False)
    fp16 = (ds.get("fp16") or {}).get("enabled", False)
    wanted = "bf16" if bf16 else "fp16" if fp16 else "fp32"
    if cfg.model.dtype != wanted:
        raise ValueError(
            f"model.dtype ({cfg.model.dtype!r}) disagrees with the DeepSpeed config ({wanted}); set model.dtype "
            f"to {wanted!r} or change the bf16/fp16 sections"
        )
    return float(lr)


def check_model(cfg: RunConfig):
    """The model folder against the MoE layout and sequence length; returns its HF config."""
    hf = load_hf_config(cfg.model.path, field="model.path")
    max_pos = getattr(hf, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) is larger than the model's max_position_embeddings ({max_pos}); "
            f"use data.seq_len <= {max_pos}"
        )
    cfg.moe.layer_indices(hf.num_hidden_layers)
    if hf.model_type == "mixtral":
        check_mixtral_start(hf, cfg.moe)
    return hf


def check_data(cfg: RunConfig) -> None:
    if not cfg.data.train and not cfg.data.hub_dataset:
        raise ValueError("data.train is empty; give training files (globs allowed) or data.hub_dataset")
    if cfg.data.train:
        expand_paths(cfg.data.train, "data.train")
    if cfg.data.eval:
        expand_paths(cfg.data.eval, "data.eval")
