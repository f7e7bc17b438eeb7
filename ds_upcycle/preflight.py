"""Checks a run against the world it will run in, before any engine (or process) starts.

`ds-upcycle train` runs them in the front end, so a bad config fails in a second with one
message instead of after every rank has started; every rank runs them again (cheap), since a
rank may be started by the `deepspeed` launcher directly.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ds_upcycle.config import PROJECT_KEY, RunConfig
from ds_upcycle.data import expand_paths
from ds_upcycle.loading import check_safetensors_headers, check_sizes, check_tokenizer, load_hf_config
from ds_upcycle.mixtral import check_mixtral_start
from ds_upcycle.paths import check_disjoint


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


DEEPSPEED_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients", "fp16", "bf16", "bfloat16", "amp",
    "torch_autocast", "gradient_clipping", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "aio", "activation_checkpointing", "sparse_attention", "flops_profiler", "wandb",
    "tensorboard", "csv_monitor", "comet", "comms_logger", "monitor_config", "elasticity", "autotuning",
    "data_efficiency", "curriculum_learning", "compression_training", "checkpoint", "data_types",
    "dataloader_drop_last", "disable_allgather", "dump_state", "steps_per_print", "wall_clock_breakdown",
    "memory_breakdown", "timers", "hybrid_engine", "pipeline", "nebula", "compile", "weight_quantization",
    "tensor_parallel", "disable_python_gc", "log_level", "managed_gradient_accumulation",
    "use_data_before_expert_parallelism", "vocabulary_size", "eigenvalue", "progressive_layer_drop",
    "quantize_training", "graph_harvesting", "use_node_local_storage", "zenflow", "expert_parallel",
})  # fmt: skip
"""Top-level keys DeepSpeed 0.19's config reads (deepspeed/runtime/config.py, DeepSpeedConfig and the
get_*_config helpers it calls; its documentation's config-json page). DeepSpeed silently ignores any
other key, so a typo such as "zero_optimisation" would run without ZeRO: we refuse it instead."""
DEEPSPEED_SECTIONS = ("optimizer", "scheduler", "zero_optimization", "fp16", "bf16", "amp", "activation_checkpointing",
                      "flops_profiler", "wandb", "tensorboard", "csv_monitor", "comet", "comms_logger", "aio",
                      "checkpoint", "data_types", "pipeline", "torch_autocast", "compile", "timers")  # fmt: skip
"""Keys whose value must be a JSON object."""


def validate(cfg: RunConfig, world_size: int) -> Derived:
    """Check the run against the world it will run in; returns derived sizes. Every problem is a
    ValueError naming the field, the value and the fix."""
    check_deepspeed_keys(cfg.ds)
    if world_size % cfg.moe.ep_size != 0:
        raise ValueError(
            f"world size ({world_size}) must be divisible by moe.ep_size ({cfg.moe.ep_size}); "
            f"launch a multiple of {cfg.moe.ep_size} ranks or change moe.ep_size"
        )
    check_zero(cfg.ds)
    micro, accum, global_batch = check_batch(cfg.ds, world_size)
    check_resume_batch(cfg, world_size, micro, accum)
    lr = check_optimizer(cfg)
    hf = check_model(cfg)
    if cfg.model.upcycle or hf.model_type == "mixtral":
        check_moe_layout(cfg)
    check_data(cfg)
    check_output(cfg)
    check_logging(cfg)
    return Derived(micro=micro, accum=accum, global_batch=global_batch, peak_lr=lr, hf_config=hf)


def check_deepspeed_keys(ds: dict) -> None:
    """Every top-level DeepSpeed key known, every section an object, the numbers numbers."""
    import difflib

    for key, value in ds.items():
        if key not in DEEPSPEED_KEYS:
            close = difflib.get_close_matches(key, DEEPSPEED_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"DeepSpeed key {key!r} is not one DeepSpeed reads ({hint}DeepSpeed would ignore it silently); fix or "
                f"remove it (project settings go under {PROJECT_KEY!r})"
            )
        if key in DEEPSPEED_SECTIONS and not isinstance(value, dict) and value is not None:
            raise ValueError(f"DeepSpeed section {key} ({value!r}) must be a JSON object (or null: left out)")
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print"):
        if key in ds and (isinstance(ds[key], bool) or not isinstance(ds[key], int) or ds[key] < 1):
            raise ValueError(f"{key} ({ds[key]!r}) must be a positive integer")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not math.isfinite(clip) or clip < 0:
        raise ValueError(f"gradient_clipping ({clip!r}) must be a finite number >= 0 (0: no clipping)")
    for section in ("bf16", "fp16"):
        enabled = (ds.get(section) or {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ValueError(f"{section}.enabled ({enabled!r}) must be true or false")
    check_optimizer_section(ds.get("optimizer") or {})


def check_optimizer_section(opt: dict) -> None:
    """optimizer.type is one DeepSpeed builds (its own or a torch.optim class) and the numbers are finite."""
    import torch
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    kind = opt.get("type")
    if not isinstance(kind, str) or not (kind.lower() in DEEPSPEED_OPTIMIZERS or hasattr(torch.optim, kind)):
        raise ValueError(
            f"optimizer.type ({kind!r}) is not an optimizer DeepSpeed builds; use AdamW (or one of "
            f"{', '.join(DEEPSPEED_OPTIMIZERS)}, or a torch.optim class name)"
        )
    params = opt.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"optimizer.params ({params!r}) must be a JSON object")
    for key in ("lr", "eps", "weight_decay"):
        v = params.get(key, 0.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"optimizer.params.{key} ({v!r}) must be a finite number >= 0")
    betas = params.get("betas", [0.9, 0.999])
    if not (
        isinstance(betas, list) and len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"optimizer.params.betas ({betas!r}) must be two numbers in [0, 1), e.g. [0.9, 0.95]")


def check_zero(ds: dict) -> None:
    """The ZeRO stages and settings DeepSpeed's native MoE works with."""
    zero = ds.get("zero_optimization", {}) or {}
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage ({stage!r}) must be 1 or 2 (an integer) for MoE")
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
    micro = ds.get("train_micro_batch_size_per_gpu")  # types checked by check_deepspeed_keys
    if micro is None:
        raise ValueError("train_micro_batch_size_per_gpu is missing from the DeepSpeed config; set it (e.g. 1)")
    accum = ds.get("gradient_accumulation_steps", 1)
    global_batch = micro * accum * world_size
    if "train_batch_size" in ds and ds["train_batch_size"] != global_batch:
        raise ValueError(
            f"train_batch_size ({ds['train_batch_size']}) must equal train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({accum}) x data-parallel size ({world_size}) = {global_batch}; "
            "fix one of them or drop train_batch_size"
        )
    return micro, accum, global_batch


def check_resume_batch(cfg: RunConfig, world: int, micro: int, accum: int) -> None:
    """train.resume on another number of ranks keeps the checkpoint's global batch: the data
    position (a step reads sequences [step x G, (step + 1) x G) of the sample stream) and the loss
    scale depend on it."""
    from ds_upcycle.checkpoint import saved_layout

    saved = saved_layout(Path(cfg.train.output_dir) / "checkpoints") if cfg.train.resume else None
    if saved is None or "global_batch" not in saved[1]:
        return
    tag, layout = saved
    want, ranks = layout["global_batch"], layout["world_size"]
    if micro * accum * world == want:
        return
    if want % (micro * world) == 0:
        a = want // (micro * world)
        fix = f"set gradient_accumulation_steps to {a} (--ds.gradient_accumulation_steps={a})"
    elif want % world == 0:
        fix = f"make train_micro_batch_size_per_gpu x gradient_accumulation_steps {want // world} per rank"
    else:
        fix = f"launch a number of ranks that divides {want}"
    raise ValueError(
        f"train.resume: checkpoint {tag} trained with a global batch of {want} sequences per step "
        f"(train_micro_batch_size_per_gpu {layout['micro_batch']} x gradient_accumulation_steps {layout['grad_accum']} x "
        f"{ranks} ranks) but this run's is {micro * accum * world} ({micro} x {accum} x {world} ranks); the data position "
        f"and the loss need the same global batch. {ranks} -> {world} ranks: {fix}"
    )


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
    """The model folder (config, sizes, weights' headers, tokenizer) against the MoE layout and the
    sequence length; returns its HF config."""
    hf = load_hf_config(cfg.model.path, field="model.path")
    supported = ("llama", "mistral", "qwen2", "mixtral")
    if hf.model_type not in supported:
        raise ValueError(
            f"model.path ({cfg.model.path!r}) is a {hf.model_type!r} model; training supports {', '.join(supported)} "
            "(dense Llama-family checkpoints, or a Mixtral from `ds-upcycle upcycle`)"
        )
    check_sizes(hf, "model.path")
    check_safetensors_headers(Path(cfg.model.path), "model.path")
    check_tokenizer(Path(cfg.model.path), hf.vocab_size, "model.path")
    max_pos = getattr(hf, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) is larger than the model's max_position_embeddings ({max_pos}); "
            f"use data.seq_len <= {max_pos}"
        )
    cfg.moe.layer_indices(hf.num_hidden_layers)
    if hf.model_type == "mixtral":
        check_mixtral_start(hf, cfg.moe)
    else:
        cfg.moe.check_intermediate(hf.intermediate_size)
    return hf


def check_data(cfg: RunConfig) -> None:
    if not cfg.data.train and not cfg.data.hub_dataset:
        raise ValueError("data.train is empty; give training files (globs allowed) or data.hub_dataset")
    if cfg.data.train:
        expand_paths(cfg.data.train, "data.train")
    if cfg.data.eval:
        expand_paths(cfg.data.eval, "data.eval")


RUN_MARKERS = ("checkpoints", "metrics.jsonl", "summary.json")
"""What makes a folder hold a run (beside its config.json)."""


def holds_run(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any((folder / m).exists() for m in RUN_MARKERS)


def check_output(cfg: RunConfig) -> None:
    """train.output_dir: creatable and writable, not a file, not inside the model folder, and not
    an earlier run unless resuming it (or moving it aside with train.overwrite)."""
    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"train.output_dir ({str(out)!r}) is a file; give a folder")
    check_disjoint(out, "train.output_dir", Path(cfg.model.path), "model.path", containing=False)
    existing = next(p for p in (out, *out.resolve().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"train.output_dir ({str(out)!r}) cannot be created: {existing} is not writable")
    if holds_run(out) and not (cfg.train.resume or cfg.train.overwrite):
        raise ValueError(
            f"train.output_dir ({str(out)!r}) already holds a run; continue it with --train.resume=true, choose a "
            "fresh folder, or pass --train.overwrite=true to move the old run aside (it is never deleted)"
        )


def move_aside(out: Path) -> Path:
    """Rename an earlier run out of the way of a new one (train.overwrite); returns where it went."""
    aside = out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(aside)
    return aside


def check_logging(cfg: RunConfig) -> None:
    """W&B online needs a login, known before any rank starts (not after they all did)."""
    from ds_upcycle.metrics import wandb_logged_in

    if cfg.log.wandb == "online" and not wandb_logged_in():
        raise ValueError(
            "log.wandb ('online') needs a W&B login and none is configured (no WANDB_API_KEY, no netrc entry); run "
            "`wandb login`, or use --log.wandb=offline (sync later with `wandb sync`) or auto"
        )
