"""The training loop: dense checkpoint -> online upcycling on every rank -> DeepSpeed ZeRO + EP.

Two entry points:

- ``deepspeed [--hostfile F] [--num_gpus N] --module ds_upcycle.train CONFIG [--section.key=value ...]``
  runs one rank of the job (this module's ``worker_main``); ``... --module ds_upcycle.train
  --launch-file=FILE`` reads the resolved config from a launch file instead (what the front end starts).
- ``ds-upcycle train CONFIG [--hostfile F] [--num-gpus N] [overrides]`` validates the config
  first, then starts that launcher line for you (``main``).

One rank reads top to bottom in :func:`run`: :func:`build` (data, model, engine, logger), then
per step :func:`train_step` and :func:`log_step`, the eval and save hooks, and :func:`finish`.

Loss = LM loss + moe.aux_loss_coef x sum of the layers' balance losses + moe.z_loss_coef x sum
of their router z-losses. DeepSpeed computes the balance loss but never adds it for you.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ds_upcycle import checkpoint, layout_free, lifecycle
from ds_upcycle.config import RunConfig, load_run_config
from ds_upcycle.distributed import all_mean, any_rank
from ds_upcycle.errors import NonFiniteError, PreemptedError, RunError, run_guarded
from ds_upcycle.preflight import Derived, holds_run, move_aside, validate

log = logging.getLogger("ds_upcycle")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine to min_ratio x peak at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# --------------------------------------------------------------------------------------------
# One rank's state, and how it is built
# --------------------------------------------------------------------------------------------


@dataclass
class Counters:
    """Counts that span the whole run: saved in every checkpoint (ds_upcycle_state.json) and
    restored on resume, so a resumed run reports and decides what an uninterrupted one would."""

    skipped_microbatches: int = 0
    """Micro-batches dropped for a NaN/Inf loss (train.on_nonfinite=skip)."""
    skipped_steps: int = 0
    """Steps DeepSpeed skipped for a gradient overflow."""
    skip_streak: int = 0
    """Consecutive skipped steps up to now (train.max_skipped_steps)."""
    collapse_streak: int = 0
    """Consecutive logging steps above log.collapse_max_over_mean."""


@dataclass
class Trainer:
    """Everything one rank of a run holds."""

    cfg: RunConfig
    rank: int
    world: int
    device: torch.device
    engine: Any
    scheduler: Any
    tokenizer: Any
    blocks: list
    """(layer index, MoEBlock) of every MoE layer."""
    train_blocks: np.ndarray
    sampler: Any
    evals: list[torch.Tensor]
    logger: Any
    router: Any
    """RouterAccumulator: expert counts over the current logging window."""
    accum: int
    tokens_per_step: int
    flops_per_token: float
    peak_tflops: float
    summary: dict
    """Facts for summary.json, filled as the run goes."""
    counters: Counters = field(default_factory=Counters)
    window: Any = None
    """metrics.StepWindow: the steps since the last logging step."""
    train_mode_every_step: bool = True
    """False once a step ran with any module in eval mode (checked every step)."""
    step_seconds: list[float] = field(default_factory=list)
    optimizer_seconds: list[float] = field(default_factory=list)
    last_metrics: dict = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return Path(self.cfg.train.output_dir)

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def layers(self) -> list[int]:
        return [i for i, _ in self.blocks]


def load_data(cfg: RunConfig, derived: Derived, rank: int, world: int):
    """(tokenizer, train blocks, sampler, eval batches, data info). Every rank memory-maps the
    prepared blocks. Normally the front end prepared them before the launch; if not, local rank 0
    of each node prepares them while the node's other ranks poll for the finished cache file. No
    rank waits in a collective, so a long preparation cannot trip train.timeout_s."""
    import os

    from ds_upcycle.data import BlockSampler, eval_batches, open_blocks, run_cache_dir, run_sources, split_train_eval
    from ds_upcycle.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path)
    cache_dir = run_cache_dir(cfg)
    train_source, eval_source = run_sources(cfg, derived.global_batch)
    mode = "write" if int(os.environ.get("LOCAL_RANK", rank)) == 0 else "wait"
    missing = [s.field for s in (train_source, eval_source) if s and not s.prepared(tokenizer, cfg.data, cache_dir)]
    if missing and rank == 0:
        log.info(
            "data: %s not prepared in %s: local rank 0 prepares it while the other ranks wait for the file "
            "(outside any collective, so train.timeout_s does not apply)", ", ".join(missing), cache_dir,
        )  # fmt: skip
    blocks, info = open_blocks(train_source, tokenizer, cfg.data, cache_dir, mode, progress=rank == 0)
    if eval_source is not None:
        train_blocks = blocks
        held_out, _ = open_blocks(eval_source, tokenizer, cfg.data, cache_dir, mode, progress=rank == 0)
    else:
        train_blocks, held_out = split_train_eval(blocks, cfg.data.eval_fraction)
    if cfg.data.hub_dataset and not cfg.data.train:
        info.update(hub_dataset=cfg.data.hub_dataset, split=cfg.data.hub_split, streaming=cfg.data.streaming)
    if info.get("skipped") and rank == 0:
        log.warning("skipped %d malformed records (data.skip_bad_records=true)", info["skipped"])
    sampler = BlockSampler(len(train_blocks), derived.micro, derived.accum, world, rank, cfg.train.seed)
    evals = eval_batches(held_out, derived.micro, world, rank, cfg.data.eval_batches)
    return tokenizer, train_blocks, sampler, evals, info


def load_model(cfg: RunConfig, derived: Derived):
    """This rank's model: the dense checkpoint with only its own experts built (online upcycling),
    a Mixtral folder read the same way, or the dense model itself (the baseline)."""
    from ds_upcycle.loading import load_dense_model
    from ds_upcycle.mixtral import load_mixtral_as_moe
    from ds_upcycle.upcycle import upcycle

    if derived.hf_config.model_type == "mixtral":  # e.g. the output of `ds-upcycle upcycle`
        model = load_mixtral_as_moe(cfg.model.path, cfg.moe, cfg.model.dtype)
    elif cfg.model.upcycle:
        model = upcycle(load_dense_model(cfg.model.path, cfg.model.dtype), cfg.moe)
    else:
        model = load_dense_model(cfg.model.path, cfg.model.dtype)
    if cfg.model.activation_checkpointing:
        # Non-reentrant: the reentrant variant gives the captured aux loss no gradient, so
        # load balancing silently stops (README, "Loss").
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def make_engine(cfg: RunConfig, model, derived: Derived):
    """(engine, LR scheduler) over the optimizer groups of ``ds_upcycle.optim``."""
    import deepspeed

    from ds_upcycle.optim import param_groups

    groups = param_groups(model, cfg)
    schedule = lr_lambda(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr / derived.peak_lr)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config={k: v for k, v in cfg.ds.items() if v is not None},  # null: a section left out
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    checkpoint.attach(engine)  # each rank hashes what it writes and verifies what it reads
    return engine, scheduler


def _optimizer_info(engine) -> dict:
    """What DeepSpeed built: the ZeRO wrapper and the inner optimizer (e.g. torch AdamW, fused)."""
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    return {
        "wrapper": type(engine.optimizer).__name__,
        "optimizer": f"{type(inner).__module__}.{type(inner).__name__}",
        "fused": bool(getattr(inner, "defaults", {}).get("fused")),
        "zero_stage": engine.zero_optimization_stage(),
        "dtype": str(next(engine.module.parameters()).dtype).replace("torch.", ""),
    }


def build(cfg: RunConfig) -> Trainer:
    """Process group, checks, data, model, engine and logger of one rank."""
    import deepspeed

    from ds_upcycle.distributed import bound_all_groups, init_distributed
    from ds_upcycle.loading import DTYPES
    from ds_upcycle.metrics import RouterAccumulator, RunLogger, StepWindow, peak_tflops, wandb_mode
    from ds_upcycle.moe import moe_blocks
    from ds_upcycle.plan import make_plan

    rank, world = init_distributed(cfg.train.timeout_s)
    derived = validate(cfg, world)
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    out = Path(cfg.train.output_dir)
    if rank == 0:
        if cfg.train.overwrite and not cfg.train.resume and holds_run(out):
            log.info("moved the earlier run in %s aside to %s (train.overwrite)", out, move_aside(out))
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    torch.manual_seed(cfg.train.seed)
    tokenizer, train_blocks, sampler, evals, info = load_data(cfg, derived, rank, world)
    model = load_model(cfg, derived).to(device)
    blocks = moe_blocks(model)
    engine, scheduler = make_engine(cfg, model, derived)
    bound_all_groups(cfg.train.timeout_s)  # DeepSpeed's expert groups too, not only the world group

    plan = make_plan(derived.hf_config, cfg.moe, world, cfg.data.seq_len, cfg.model.dtype)
    zero_stage = (cfg.ds.get("zero_optimization") or {}).get("stage", 0)
    predicted = plan.peak_bytes_per_rank(zero_stage, derived.micro, cfg.model.activation_checkpointing, bool(blocks))
    peak, peak_source = peak_tflops(device, DTYPES[cfg.model.dtype], cfg.log.peak_tflops)
    config = {**cfg.to_dict(), "world_size": world, "peak_tflops": peak, "peak_source": peak_source}
    logger = RunLogger(out, rank, wandb_mode(cfg.log.wandb), cfg.log, config)
    tokens_per_step = derived.global_batch * cfg.data.seq_len
    summary = {
        "output_dir": str(out), "world_size": world, "moe_layers": [i for i, _ in blocks],
        "params_per_rank": sum(p.numel() for p in model.parameters()), "tokens_per_step": tokens_per_step,
        "peak_tflops": peak, "peak_source": peak_source, "data": info, "wandb": logger.url,
        "flops_per_token": plan.train_flops_per_token(moe=bool(blocks)), "predicted_peak_gib": predicted / 2**30,
        "optimizer": _optimizer_info(engine),
    }  # fmt: skip
    return Trainer(
        cfg=cfg, rank=rank, world=world, device=device, engine=engine, scheduler=scheduler, tokenizer=tokenizer,
        blocks=blocks, train_blocks=train_blocks, sampler=sampler, evals=evals, logger=logger,
        router=RouterAccumulator([i for i, _ in blocks], cfg.moe.num_experts), accum=derived.accum,
        tokens_per_step=tokens_per_step, flops_per_token=plan.train_flops_per_token(moe=bool(blocks)),
        peak_tflops=peak, summary=summary, window=StepWindow(),
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Evaluation (collective: every rank calls every MoE layer the same number of times)
# --------------------------------------------------------------------------------------------


def evaluate_loss(t: Trainer) -> float:
    """Mean held-out token loss over every rank's eval batches."""
    t.engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for ids in t.evals:
            ids = ids.to(t.device)
            loss = t.engine(input_ids=ids, labels=ids).loss
            n = ids.numel() - ids.shape[0]  # each sequence predicts L-1 tokens
            total += torch.tensor([loss.double().item() * n, n], dtype=torch.float64)
    t.engine.train()
    mean_loss, tokens = all_mean(total.tolist())
    return mean_loss / tokens


@torch.no_grad()
def greedy_sample(t: Trainer) -> str:
    """A greedy continuation of log.sample_prompt (every rank generates the same tokens)."""
    t.engine.eval()
    ids = t.tokenizer(t.cfg.log.sample_prompt, return_tensors="pt").input_ids.to(t.device)
    n = t.cfg.log.sample_tokens
    out = t.engine.module.generate(
        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=t.tokenizer.eos_token_id,
        use_cache=True,
    )  # fmt: skip
    t.engine.train()
    return t.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def log_eval(t: Trainer, step: int) -> float:
    loss = evaluate_loss(t)
    t.logger.log({"eval/loss": loss, "eval/ppl": math.exp(loss)}, step)
    return loss


# --------------------------------------------------------------------------------------------
# One optimizer step
# --------------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss_sums: list[float]
    """This rank's LM, aux and z loss summed over the step's micro-batches that counted."""
    microbatches: int
    """Micro-batches whose loss counted (not skipped for a NaN/Inf loss)."""
    lr: float
    """The learning rate of this step (DeepSpeed applies none on a skipped step)."""
    grad_norm: float
    applied: bool
    """False when DeepSpeed skipped the update (gradient overflow: engine.was_step_applied())."""
    seconds: float
    optimizer_seconds: float
    nonfinite: str = ""
    """Why the run must stop (NaN/Inf loss under on_nonfinite=stop, or NaN/Inf gradients that
    DeepSpeed applied), or empty."""


def _forward(t: Trainer, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(LM loss, summed balance loss, summed z-loss) of one micro-batch."""
    lm = t.engine(input_ids=ids, labels=ids).loss
    zero = torch.zeros((), device=t.device)
    aux = sum((b.aux_loss for _, b in t.blocks), zero)
    z = sum((b.z_loss for _, b in t.blocks), zero) if t.cfg.moe.z_loss_coef > 0 else zero
    return lm, aux, z


def in_train_mode(t: Trainer) -> bool:
    """True when every module is in train mode. It matters: HF runs activation checkpointing only
    in train mode (GradientCheckpointingLayer checks self.training) and DeepSpeed's gate uses
    capacity_factor in train mode, eval_capacity_factor otherwise (sharded_moe.py TopKGate.forward)."""
    return all(m.training for m in t.engine.module.modules())


@contextlib.contextmanager
def _inject_inf_grad(t: Trainer, on: bool):
    """debug.inject_inf_grad_at_steps: the first trainable parameter's gradient becomes Inf in this
    backward pass, as an overflow would make it."""
    if not on:
        yield
        return
    p = next(p for p in t.engine.module.parameters() if p.requires_grad)
    handle = p.register_hook(lambda g: torch.full_like(g, math.inf))
    try:
        yield
    finally:
        handle.remove()


def train_step(t: Trainer, step: int) -> StepResult:
    """Forward, backward and optimizer over the step's micro-batches (0-based ``step``)."""
    cfg = t.cfg
    t0 = time.perf_counter()
    t.train_mode_every_step &= in_train_mode(t)
    lr = t.scheduler.get_last_lr()[0]  # the LR this step applies (get_last_lr moves on after it)
    sums = torch.zeros(3, dtype=torch.float64)
    counted, opt_time = 0, 0.0
    for a in range(t.accum):
        ids = torch.from_numpy(t.train_blocks[t.sampler.indices(step, a)].astype(np.int64)).to(t.device)
        lm, aux, z = _forward(t, ids)
        loss = lm + cfg.moe.aux_loss_coef * aux + cfg.moe.z_loss_coef * z
        if step == cfg.debug.inject_nan_at_step:
            loss = loss * float("nan")
        t.router.add(t.blocks)
        if any_rank(not torch.isfinite(loss).item()):
            if cfg.train.on_nonfinite == "stop":
                why = f"loss is NaN/Inf at step {step + 1} (micro-batch {a})"
                return StepResult([], 0, lr, math.nan, False, 0.0, 0.0, why)
            # Drop this micro-batch: a zero loss over every parameter keeps the ranks' gradient
            # reductions in step and contributes nothing (the optimizer still steps, with
            # whatever the step's other micro-batches gave).
            t.counters.skipped_microbatches += 1
            loss = sum((p * 0).sum() for p in t.engine.module.parameters() if p.requires_grad)
        else:
            sums += torch.tensor([lm.item(), aux.item(), z.item()], dtype=torch.float64)
            counted += 1
        with _inject_inf_grad(t, step in cfg.debug.inject_inf_grad_at_steps and a == t.accum - 1):
            t.engine.backward(loss)
        t_opt = time.perf_counter()
        t.engine.step()  # the optimizer runs at the accumulation boundary; its cost grows with total params
        opt_time += time.perf_counter() - t_opt
    # Under ZeRO-1/2 a non-finite gradient is an overflow: DeepSpeed skips the update, reports an
    # infinite norm and leaves the LR scheduler where it was (stage_1_and_2.py step; engine.py
    # _take_model_step steps the scheduler only when the step was applied).
    applied = t.engine.was_step_applied()
    raw = t.engine.get_global_grad_norm()  # None: DeepSpeed computed none this step
    norm = math.nan if raw is None else float(raw)
    bad = ""
    if applied and raw is not None and not math.isfinite(norm):
        bad = f"gradient norm is NaN/Inf at step {step + 1} and DeepSpeed applied it (set bf16.check_grad_overflow to true)"
    return StepResult(sums.tolist(), counted, lr, norm, applied, time.perf_counter() - t0, opt_time, bad)


def count_skipped(t: Trainer, r: StepResult, step: int) -> str:
    """Count a step DeepSpeed skipped; returns why the run must stop (train.max_skipped_steps in a
    row under on_nonfinite=stop), or empty. A skipped step alone is no divergence: fp16's loss
    scale skips some routinely."""
    c = t.counters
    if r.applied:
        c.skip_streak = 0
        return ""
    c.skipped_steps += 1
    c.skip_streak += 1
    if t.rank == 0:
        log.warning("step %d: DeepSpeed skipped the update (gradient overflow); weights and LR unchanged", step + 1)
    limit = t.cfg.train.max_skipped_steps
    if t.cfg.train.on_nonfinite == "stop" and limit and c.skip_streak >= limit:
        return f"DeepSpeed skipped {c.skip_streak} steps in a row for a gradient overflow (up to step {step + 1})"
    return ""


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


def step_metrics(t: Trainer, done: int, r: StepResult) -> tuple[dict, torch.Tensor]:
    """(scalars, global router counts [layers, E]) of one logging step (collective: losses and
    router counts are all-reduced). Every value covers the logging window (t.window, the steps since
    the last logging step), except optim/lr (this step's), the cumulative counters and
    memory/peak_gib (the peak so far)."""
    from ds_upcycle.metrics import StepWindow, peak_memory_gib, router_metrics, window_metrics

    coef = t.cfg.moe
    lm, aux, z = all_mean(t.window.mean_losses())  # every rank counted the same micro-batches
    counts, dropped = t.router.reduce()
    metrics = {
        "loss/lm": lm, "loss/aux": aux, "loss/z": z,
        "loss/total": lm + coef.aux_loss_coef * aux + coef.z_loss_coef * z,
        "optim/lr": r.lr, "optim/skipped_steps": t.counters.skipped_steps,
        "optim/skipped_microbatches": t.counters.skipped_microbatches,
        **window_metrics(t.window, t.tokens_per_step, t.world, t.flops_per_token, t.peak_tflops),
        "memory/peak_gib": peak_memory_gib(t.device), "train/tokens_seen": done * t.tokens_per_step,
    }  # fmt: skip
    t.window = StepWindow()
    if t.layers:
        metrics.update(router_metrics(t.layers, counts, dropped, t.cfg.log.dead_expert_threshold))
        metrics.update(_collapse_alert(t, done, metrics["router/max_over_mean_worst"]))
    return metrics, counts


def _collapse_alert(t: Trainer, done: int, worst: float) -> dict:
    """Console warning and W&B alert once the worst layer's max/mean load stays above the
    threshold for log.collapse_patience logging steps."""
    threshold = t.cfg.log.collapse_max_over_mean
    if threshold <= 0:
        return {}
    c = t.counters
    c.collapse_streak = c.collapse_streak + 1 if worst > threshold else 0
    fired = c.collapse_streak >= t.cfg.log.collapse_patience
    if fired:
        t.logger.alert(
            "router collapse",
            f"max/mean expert load {worst:.2f} > {threshold} for {c.collapse_streak} logging steps (step {done})",
        )
    return {"alerts/router_collapse": float(fired)}


def health(t: Trainer, done: int) -> dict:
    """Upcycling-health metrics (ds_upcycle.metrics.health_metrics) when due: every
    log.health_every steps and at step 0. Collective."""
    every = t.cfg.log.health_every
    if not (t.layers and every and done % every == 0):
        return {}
    from ds_upcycle.metrics import health_metrics

    return health_metrics(t.blocks, t.cfg.moe, t.cfg.model.path)


def heatmap_due(done: int, last: bool, every: int) -> bool:
    """At a logging step: every log.heatmap_every steps and at step 1, always at the last step
    (-1: never)."""
    return every >= 0 and (last or (every > 0 and (done % every == 0 or done == 1)))


def log_step(t: Trainer, done: int, r: StepResult, last: bool) -> None:
    """Metrics to W&B, metrics.jsonl and the console; a load heatmap when due."""
    from ds_upcycle.metrics import heatmap_png

    metrics, counts = step_metrics(t, done, r)
    metrics.update(health(t, done))
    images = None
    if t.layers and heatmap_due(done, last, t.cfg.log.heatmap_every) and t.rank == 0:
        (t.out / "heatmaps").mkdir(exist_ok=True)
        png = heatmap_png(counts, t.layers, t.out / "heatmaps" / f"step_{done:06d}.png", f"step {done}")
        images = {"router/load_heatmap": str(png)}
    t.logger.log(metrics, done, images)
    t.last_metrics = metrics
    if t.rank == 0:
        log.info(
            "step %d/%d | loss %.4f | aux %.4f | lr %.2e | %.0f tok/s | MFU %.1f%% | max/mean %.2f",
            done, t.cfg.train.steps, metrics["loss/lm"], metrics["loss/aux"], metrics["optim/lr"],
            metrics["throughput/tokens_per_s"], 100 * metrics["throughput/mfu"],
            metrics.get("router/max_over_mean_worst", float("nan")),
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def layout(t: Trainer) -> dict:
    """How this run is laid out (checkpoint.LAYOUT_KEYS: what DeepSpeed's native files depend on)
    and how its global batch is split."""
    micro = t.cfg.ds["train_micro_batch_size_per_gpu"]
    return {
        "world_size": t.world, "ep_size": t.cfg.moe.ep_size, "dp_size": t.engine.dp_world_size,
        "expert_dp_size": t.world // t.cfg.moe.ep_size, "zero_stage": int(t.engine.zero_optimization_stage()),
        "micro_batch": micro, "grad_accum": t.accum, "global_batch": micro * t.accum * t.world,
    }  # fmt: skip


def save(t: Trainer, done: int) -> None:
    """A complete checkpoint after ``done`` steps: the data position is the step (the sampler is
    a pure function of it), plus the resolved config the export needs and the layout."""
    state = {
        "data_position": {"next_step": done}, "lr_schedule_step": t.scheduler.last_epoch,
        "counters": dataclasses.asdict(t.counters), "config": t.cfg.to_dict(), "layout": layout(t),
    }  # fmt: skip
    crash = done == t.cfg.debug.inject_crash_in_save_at_step
    crash_free = done == t.cfg.debug.inject_crash_in_layout_free_at_step
    saved = checkpoint.save(t.engine, t.ckpt_root, done, state, t.rank, crash, crash_free)
    size = sum(p.stat().st_size for p in saved["folder"].rglob("*") if p.is_file())
    free = sum(p.stat().st_size for p in (saved["folder"] / layout_free.FOLDER).rglob("*") if p.is_file())
    hash_s = [r["hash_s"] for r in saved["ranks"]]
    t.summary["last_commit"] = {"step": done, "checkpoint_bytes": size, "layout_free_bytes": free,
                                "native_s": saved["native_s"], "layout_free_s": saved["layout_free_s"],
                                "commit_s": saved["commit_s"], "ranks": saved["ranks"]}  # fmt: skip
    if t.rank == 0:
        log.info("saved %s (%.2f GB, of which the layout-free part %.2f GB): DeepSpeed's files %.2f s, the "
                 "layout-free part %.2f s on rank 0; committed %.2f s after rank 0's last write; the ranks hashed "
                 "their own files in %.2f-%.2f s", saved["folder"], size / 1e9, free / 1e9, saved["native_s"],
                 saved["layout_free_s"], saved["commit_s"], min(hash_s), max(hash_s))  # fmt: skip
        checkpoint.prune(t.ckpt_root, t.cfg.train.keep_last)


def resume(t: Trainer) -> int:
    """The step to start from: the latest complete checkpoint's, or 0 when there is none. The
    counters continue; the data position is the step and the LR schedule is DeepSpeed's saved one,
    which counts applied steps only (the two differ by the skipped steps). Under another layout
    (world size, ep_size, ZeRO stage) the state comes from the checkpoint's layout-free part."""
    state = checkpoint.load(t.engine, t.ckpt_root, t.rank, layout(t))
    if state is None:
        return 0
    t.counters = Counters(**state.get("counters", {}))
    if "lr_schedule_step" in state and t.scheduler.last_epoch != state["lr_schedule_step"]:
        raise ValueError(
            f"checkpoint step {state['step']}: DeepSpeed's LR scheduler is at step {t.scheduler.last_epoch} but "
            f"{checkpoint.STATE} says {state['lr_schedule_step']}; the checkpoint is inconsistent, resume from another"
        )
    t.summary["resumed_from"] = state["step"]
    t.summary["resume_mode"] = state["resume_mode"]
    t.summary["verified_files"] = state["verified_files"]  # rank 0's: what it read
    if t.rank == 0:
        log.info("resumed from %s at step %d (%s; verified the %d files this rank read)",
                 t.ckpt_root / checkpoint.tag_for(state["step"]), state["step"],
                 f"layout-free part, layout changed: {'; '.join(state['changed']) or 'native files gone'}"
                 if state["resume_mode"] == "layout_free" else "DeepSpeed's native files", len(state["verified_files"]))  # fmt: skip
        saved_micro = state.get("layout", {}).get("micro_batch", layout(t)["micro_batch"])
        if saved_micro != layout(t)["micro_batch"]:
            log.warning("train_micro_batch_size_per_gpu changed (%d -> %d): each step reads the same sequences, but "
                        "grouped into other micro-batches, so the per-micro-batch balance losses (and capacity, with "
                        "moe.drop_tokens) differ from an uninterrupted run's", saved_micro, layout(t)["micro_batch"])  # fmt: skip
    if t.cfg.debug.save_at_resume:
        save(t, state["step"])
    return state["step"]


def stop_nonfinite(t: Trainer, why: str, fix: str = "set train.on_nonfinite=skip") -> None:
    """Stop without saving: the last complete checkpoint stays the one to resume from."""
    t.logger.alert("non-finite loss", f"{why}; stopping. The last good checkpoint is kept, nothing is saved.")
    t.logger.finish()
    raise NonFiniteError(
        f"{why}; stopped without saving (last complete checkpoint: "
        f"{checkpoint.latest_tag(t.ckpt_root) or 'none'}). Lower the learning rate or {fix}"
    )


def stop_requested(t: Trainer, guard: lifecycle.RankGuard | None) -> bool:
    """Collective, after every step: True on every rank once any rank was asked to stop."""
    if guard is None or not any_rank(guard.requested):
        return False
    guard.request("another rank's stop request")
    return True


def preempt(t: Trainer, done: int, guard: lifecycle.RankGuard) -> None:
    """Save step ``done`` on every rank (a second signal during the save ends the rank at once),
    leave the marker the front end reports, and stop with EXIT_PREEMPTED."""
    if t.rank == 0:
        log.info("stopping after step %d (%s): saving a checkpoint", done, guard.reason)
    with guard.saving():
        time.sleep(t.cfg.debug.preempt_save_delay_s)
        save(t, done)
    tag = checkpoint.latest_tag(t.ckpt_root)
    where = t.ckpt_root / tag if tag else None
    if t.rank == 0:
        lifecycle.write_preempted(t.out, {"reason": guard.reason, "step": done, "checkpoint": str(where)})
    t.logger.finish()
    raise PreemptedError(
        f"stopped by {guard.reason} after step {done}/{t.cfg.train.steps}; checkpoint {where} is complete. "
        "Resume with --train.resume=true"
    )


def finish(t: Trainer, start: int, stop: int) -> dict:
    """Final save, held-out loss, sample and summary.json; returns the summary."""
    from ds_upcycle.metrics import mfu, peak_memory_gib

    done = max(stop, start)
    if stop > start and t.cfg.train.save_final:
        save(t, done)
    t.summary["eval_loss_end"] = log_eval(t, done)
    if t.cfg.log.sample_prompt:
        t.summary["sample_end"] = greedy_sample(t)
    if t.step_seconds:
        steady = t.step_seconds[1:] or t.step_seconds  # the first step includes warm-up
        steady_opt = t.optimizer_seconds[1:] or t.optimizer_seconds
        t.summary["tokens_per_s"] = t.tokens_per_step / (sum(steady) / len(steady))
        t.summary["mfu"] = mfu(t.flops_per_token, t.summary["tokens_per_s"] / t.world, t.peak_tflops)
        t.summary["step_time_s"] = sum(steady) / len(steady)
        t.summary["optimizer_s"] = sum(steady_opt) / len(steady_opt)
    m = t.last_metrics
    t.summary["peak_memory_gib"] = peak_memory_gib(t.device)
    t.summary.update(
        steps_done=done, final_train_loss=m.get("loss/lm"), max_over_mean=m.get("router/max_over_mean_worst"),
        counters=dataclasses.asdict(t.counters), train_mode_every_step=t.train_mode_every_step,
        checkpoint=str(t.ckpt_root / latest) if (latest := checkpoint.latest_tag(t.ckpt_root)) else None,
        router_final={k: v for k, v in m.items() if k.startswith("router/")},
    )  # fmt: skip
    if t.rank == 0:
        checkpoint.atomic_write_text(t.out / "summary.json", json.dumps(t.summary, indent=2))
    t.logger.finish()
    return t.summary


def run(cfg: RunConfig, guard: lifecycle.RankGuard | None = None) -> dict:
    """Train one rank. Returns the run summary (the same on every rank). With a ``guard``, a stop
    request ends the run after the current step with a checkpoint (PreemptedError)."""
    t = build(cfg)
    if t.rank == 0:
        (t.out / lifecycle.PREEMPTED).unlink(missing_ok=True)
    start = resume(t) if cfg.train.resume else 0
    stop = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    if start == 0:
        if cfg.log.sample_prompt:
            t.summary["sample_start"] = greedy_sample(t)
        t.summary["eval_loss_start"] = log_eval(t, 0)
        if step0_health := health(t, 0):
            t.logger.log(step0_health, 0)
    t.engine.train()  # from_pretrained returns eval-mode models; resume skips the evals above
    for step in range(start, stop):
        time.sleep(cfg.debug.step_delay_s)
        result = train_step(t, step)
        if result.nonfinite:
            stop_nonfinite(t, result.nonfinite)
        too_many_skips = count_skipped(t, result, step)
        if too_many_skips:
            stop_nonfinite(t, too_many_skips, "raise train.max_skipped_steps (0: never stop for skipped steps)")
        t.step_seconds.append(result.seconds)
        t.optimizer_seconds.append(result.optimizer_seconds)
        t.window.add(result.loss_sums, result.microbatches, result.grad_norm, result.applied, result.seconds,
                     result.optimizer_seconds)  # fmt: skip
        done = step + 1
        stopping = stop_requested(t, guard)
        if done % cfg.log.every == 0 or done == stop or stopping:
            log_step(t, done, result, last=done == stop or stopping)
        if stopping:
            preempt(t, done, guard)
        if cfg.log.eval_every and done % cfg.log.eval_every == 0 and done != stop:
            log_eval(t, done)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done != stop:
            save(t, done)
    return finish(t, start, stop)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[ds_upcycle] %(message)s", stream=sys.stdout, force=True)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _rank_config(argv: list[str]) -> RunConfig:
    """``--launch-file=FILE`` (what `ds-upcycle train` starts: the resolved config and forwarded
    environment in one file, since a multi-host launch passes arguments through a remote shell
    that strips quotes) or ``CONFIG [overrides]`` (what users type)."""
    from ds_upcycle.launch import apply_env, read_launch_file

    if not argv[0].startswith("--launch-file="):
        return load_run_config(argv[0], argv[1:])
    if len(argv) > 1:
        raise ValueError(f"--launch-file=FILE takes no overrides (got {argv[1]!r}); they are resolved into FILE")
    cfg, env = read_launch_file(argv[0].split("=", 1)[1])
    apply_env(env)
    return cfg


def _worker(argv: list[str]) -> int:
    import os

    from ds_upcycle.distributed import shutdown_distributed
    from ds_upcycle.errors import record_failure
    from ds_upcycle.launch import record_rank

    guard = lifecycle.RankGuard().install()  # first: a signal from here on stops after a step
    _setup_logging()
    try:
        cfg = _rank_config(argv)
        guard.deadline_s = cfg.train.preempt_save_timeout_s
        record_rank(cfg)
        try:
            run(cfg, guard)
        except BaseException as e:
            if not isinstance(e, PreemptedError):  # a stop that saved is not a failure
                record_failure(Path(cfg.train.output_dir), int(os.environ.get("RANK", "0")), e)
            if isinstance(e, RunError):  # every rank raises it at the same point: end the group cleanly
                shutdown_distributed()
            raise
        shutdown_distributed()
    finally:
        lifecycle.remove_own_shm_buffer()
    return 0


def worker_main(argv: list[str] | None = None) -> int:
    """One rank: `deepspeed ... --module ds_upcycle.train CONFIG [overrides]`."""
    from ds_upcycle.distributed import strip_local_rank

    argv = strip_local_rank(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    return run_guarded(_worker, argv)


def build_parser() -> argparse.ArgumentParser:
    from ds_upcycle.launch import add_world_arguments

    p = argparse.ArgumentParser(
        prog="ds-upcycle train",
        description="Validate a run config, then start it through the deepspeed launcher: every rank "
        "loads the dense checkpoint, builds its own experts (online upcycling) and trains with ZeRO + "
        "expert parallelism, logging router load and throughput to W&B. CONFIG is a JSON file or the name "
        "of a shipped config (`ds-upcycle configs` lists them). Extra --section.key=value arguments "
        "override the file (sections: model, moe, data, train, log, debug; --ds.KEY.PATH=V edits the "
        "DeepSpeed part).",
        epilog="examples: ds-upcycle train cpu_debug_zero2_ep2 --num-gpus 2 --train.steps=20; across hosts: "
        "ds-upcycle train CONFIG --hostfile hostfiles/two_nodes.example --master-addr node-1 (README, Multiple nodes). "
        "SIGTERM or Ctrl-C: every rank finishes its step, saves it and exits (exit 75; resume with "
        "--train.resume=true); a second one stops at once without saving (exit 128 + signal). Exit 124: the save "
        "did not finish within train.preempt_save_timeout_s. Exit 3: NaN/Inf loss. Exit 2: a user error. "
        "Exit 4: no space left or an unwritable path.",
    )
    p.add_argument("config", help="a run config file, or a shipped config's name (e.g. cpu_debug_zero2_ep2)")
    add_world_arguments(p)
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: the launcher's 29500)")
    p.add_argument(
        "--master-addr", default=None,
        help="address of the first host that every host can reach (multi-host hostfiles; without it DeepSpeed "
        "asks the first host for `hostname -I`)",
    )  # fmt: skip
    p.add_argument("--ssh-port", type=int, default=None, help="ssh port of the hosts (multi-host; default: ssh's)")
    return p


def main(argv: list[str] | None = None) -> int:
    """ds-upcycle train CONFIG [--num-gpus N | --hostfile F [--master-addr A] [--ssh-port P]] [--section.key=value ...]"""
    from ds_upcycle.launch import run_training

    argv = sys.argv[1:] if argv is None else list(argv)
    args, overrides = build_parser().parse_known_args(argv)
    result = run_training(
        args.config, overrides, num_gpus=args.num_gpus, hostfile=args.hostfile, master_port=args.master_port,
        master_addr=args.master_addr, ssh_port=args.ssh_port,
    )  # fmt: skip
    resume = shlex.join(["ds-upcycle", "train", *(a for a in argv if not a.startswith("--train.resume=")),
                         "--train.resume=true"])  # fmt: skip
    if result.preempted:
        p = result.preempted
        print(
            f"stopped by {p['reason']} after step {p['step']}; checkpoint {p['checkpoint']} is complete "
            f"(exit {result.returncode}). Resume with:\n  {resume}",
            file=sys.stderr,
        )
    elif result.returncode in (128 + signal.SIGTERM, 128 + signal.SIGINT):
        print(
            f"stopped at once by a second signal (exit {result.returncode}); nothing new was saved. Resume from the "
            f"last complete checkpoint with:\n  {resume}",
            file=sys.stderr,
        )
    elif result.returncode != 0:
        print(f"error: {failure_message(result, resume)}", file=sys.stderr)
    return result.returncode


def failure_message(result, resume: str = "ds-upcycle train ... --train.resume=true") -> str:
    """The front end's last line for a failed run: the rank that failed first and its own message,
    and the way on (resume only when there is a checkpoint and the cause was not the config)."""
    failure = result.failure
    latest = checkpoint.latest_tag(result.output_dir / "checkpoints")
    if result.note:  # multi-host: the supervisor saw which host failed first
        what = f"the training job failed (exit {result.returncode}): {result.note.strip().removeprefix('ds-upcycle: ')}"
    elif failure is None or failure["lost_peer"]:
        lost = f" (rank {failure['rank']} then lost its peer: {failure['message'][:200]})" if failure else ""
        what = (
            f"the training job failed (exit {result.returncode}): a rank was killed or hung without an error of its "
            f"own{lost}; the launcher's lines above name it ('--local_rank=N ... exits with return code')"
        )
    else:
        what = f"rank {failure['rank']} on {failure['host']} failed first: {failure['message']}"
    if failure is not None and failure["user_error"]:
        return what + ". Fix the configuration and start again"
    if latest:
        return what + f". Complete checkpoints are kept (latest: {latest}); resume with:\n  {resume}"
    return what + ". No complete checkpoint was written yet; start again once the cause is fixed"


if __name__ == "__main__":
    sys.exit(worker_main())
