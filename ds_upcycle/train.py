"""The training loop: dense checkpoint -> online upcycling on every rank -> DeepSpeed ZeRO + EP.

Two entry points:

- ``deepspeed [--hostfile F] [--num_gpus N] --module ds_upcycle.train CONFIG [--section.key=value ...]``
  runs one rank of the job (this module's ``worker_main``).
- ``ds-upcycle train CONFIG [--hostfile F] [--num-gpus N] [overrides]`` validates the config
  first, then starts that launcher line for you (``main``).

Loss = LM loss + moe.aux_loss_coef x sum of the layers' balance losses + moe.z_loss_coef x sum
of their router z-losses. DeepSpeed computes the balance loss but never adds it for you.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from ds_upcycle.config import RunConfig, load_run_config

log = logging.getLogger("ds_upcycle")


# --------------------------------------------------------------------------------------------
# Validation, before any engine (or process) starts
# --------------------------------------------------------------------------------------------


def validate(cfg: RunConfig, world_size: int) -> dict:
    """Check the run against the world it will run in; returns derived sizes. Every problem is a
    ValueError naming the field, the value and the fix."""
    from ds_upcycle.data import expand_paths
    from ds_upcycle.loading import load_hf_config

    ds, moe = cfg.ds, cfg.moe
    if world_size % moe.ep_size != 0:
        raise ValueError(
            f"world size ({world_size}) must be divisible by moe.ep_size ({moe.ep_size}); "
            f"launch a multiple of {moe.ep_size} ranks or change moe.ep_size"
        )
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
    hf = load_hf_config(cfg.model.path, field="model.path")
    max_pos = getattr(hf, "max_position_embeddings", None)
    if max_pos is not None and cfg.data.seq_len > max_pos:
        raise ValueError(
            f"data.seq_len ({cfg.data.seq_len}) is larger than the model's max_position_embeddings ({max_pos}); "
            f"use data.seq_len <= {max_pos}"
        )
    moe.layer_indices(hf.num_hidden_layers)
    if hf.model_type == "mixtral":
        from ds_upcycle.export import check_mixtral_start

        check_mixtral_start(hf, moe)
    if not cfg.data.train and not cfg.data.hub_dataset:
        raise ValueError("data.train is empty; give training files (globs allowed) or data.hub_dataset")
    if cfg.data.train:
        expand_paths(cfg.data.train, "data.train")
    if cfg.data.eval:
        expand_paths(cfg.data.eval, "data.eval")
    return {"micro": micro, "accum": accum, "global_batch": global_batch, "peak_lr": float(lr), "hf_config": hf}


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to the peak, then cosine to min_ratio x peak at `total` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# --------------------------------------------------------------------------------------------
# One rank of the job
# --------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    pass


def _all_mean(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.tolist()


def _any_rank(flag: bool, device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def evaluate_loss(engine, batches: list[torch.Tensor], device) -> float:
    """Mean held-out token loss over every rank's eval batches (collective)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for ids in batches:
            ids = ids.to(device)
            loss = engine(input_ids=ids, labels=ids).loss
            n = ids.numel() - ids.shape[0]  # each sequence predicts L-1 tokens
            total += torch.tensor([loss.double().item() * n, n], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(total)
    engine.train()
    return float(total[0] / total[1])


@torch.no_grad()
def greedy_sample(engine, tokenizer, prompt: str, new_tokens: int, device) -> str:
    """A greedy continuation (collective: every rank generates the same tokens, so every rank
    calls each MoE layer the same number of times)."""
    engine.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
    out = engine.module.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        pad_token_id=tokenizer.eos_token_id, use_cache=True,
    )  # fmt: skip
    engine.train()
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def run(cfg: RunConfig) -> dict:
    """Train one rank. Returns the run summary (the same on every rank)."""
    import deepspeed
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from ds_upcycle import checkpoint
    from ds_upcycle.data import BlockSampler, batch_of, eval_batches, load_blocks, load_hub_blocks, split_train_eval
    from ds_upcycle.distributed import init_distributed
    from ds_upcycle.loading import DTYPES, load_dense_model, load_tokenizer
    from ds_upcycle.metrics import (
        RouterAccumulator,
        RunLogger,
        heatmap_png,
        mfu,
        peak_memory_gib,
        peak_tflops,
        router_metrics,
        wandb_mode,
    )
    from ds_upcycle.moe import moe_blocks
    from ds_upcycle.plan import make_plan
    from ds_upcycle.upcycle import upcycle

    rank, world = init_distributed(cfg.train.timeout_s)
    derived = validate(cfg, world)
    micro, accum = derived["micro"], derived["accum"]
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    torch.manual_seed(cfg.train.seed)

    # Data: rank 0 tokenises and caches; the others read the cache.
    tokenizer = load_tokenizer(cfg.model.path)
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out.parent / ".cache" / "tokens"
    # Enough blocks that a streamed corpus never wraps: the run's batches plus the held-out share.
    needed = math.ceil(cfg.train.steps * derived["global_batch"] / (1 - cfg.data.eval_fraction)) + 1
    blocks = info = None
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            if cfg.data.train:
                blocks, info = load_blocks(cfg.data.train, "data.train", tokenizer, cfg.data, cache_dir, rank == 0)
            else:
                blocks, info = load_hub_blocks(cfg.data, tokenizer, needed, cache_dir, rank == 0)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    if cfg.data.eval:
        train_blocks = blocks
        held_out, _ = load_blocks(cfg.data.eval, "data.eval", tokenizer, cfg.data, cache_dir, rank == 0)
    else:
        train_blocks, held_out = split_train_eval(blocks, cfg.data.eval_fraction)
    if info.get("skipped") and rank == 0:
        log.warning("skipped %d malformed records (data.skip_bad_records=true)", info["skipped"])
    sampler = BlockSampler(len(train_blocks), micro, accum, world, rank, cfg.train.seed)
    evals = eval_batches(held_out, micro, world, rank, cfg.data.eval_batches)

    # Model: every rank loads the dense weights and builds only its own experts.
    if derived["hf_config"].model_type == "mixtral":  # e.g. the output of `ds-upcycle upcycle`
        from ds_upcycle.export import load_mixtral_as_moe

        model = load_mixtral_as_moe(cfg.model.path, cfg.moe, cfg.model.dtype)
    elif cfg.model.upcycle:
        model = upcycle(load_dense_model(cfg.model.path, cfg.model.dtype), cfg.moe)
    else:
        model = load_dense_model(cfg.model.path, cfg.model.dtype)  # the dense baseline
    hf_config = derived["hf_config"]
    model.to(device)
    if cfg.model.activation_checkpointing:
        # Non-reentrant: the reentrant variant gives the captured aux loss no gradient, so
        # load balancing silently stops (../shared/NOTES.md).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    blocks_moe = moe_blocks(model)
    layers = [i for i, _ in blocks_moe]

    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"}]
    if blocks_moe:  # expert parameters get their own groups (reduced over expert-data-parallel ranks)
        groups = split_params_into_different_moe_groups_for_optimizer(groups[0])
    schedule = lr_lambda(cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr / derived["peak_lr"])
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=cfg.ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )

    start = 0
    if cfg.train.resume:
        state = checkpoint.load(engine, ckpt_root, rank)
        if state is not None:
            start = state["step"]
            if rank == 0:
                log.info("resumed from %s at step %d", ckpt_root / checkpoint.tag_for(start), start)

    plan = make_plan(hf_config, cfg.moe, world, cfg.data.seq_len, cfg.model.dtype)
    flops_per_token = plan.train_flops_per_token(moe=bool(blocks_moe))
    peak, peak_source = peak_tflops(device, DTYPES[cfg.model.dtype], cfg.log.peak_tflops)
    logger = RunLogger(
        out,
        rank,
        wandb_mode(cfg.log.wandb),
        cfg.log,
        {**cfg.to_dict(), "world_size": world, "peak_tflops": peak, "peak_source": peak_source},
    )
    acc = RouterAccumulator(layers, cfg.moe.num_experts)
    tokens_per_step = derived["global_batch"] * cfg.data.seq_len
    stop = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    summary: dict = {
        "output_dir": str(out),
        "world_size": world,
        "moe_layers": layers,
        "params_per_rank": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens_per_step,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "data": info,
        "wandb": logger.url,
    }
    if cfg.log.sample_prompt and start == 0:
        summary["sample_start"] = greedy_sample(engine, tokenizer, cfg.log.sample_prompt, cfg.log.sample_tokens, device)
    if start == 0:
        summary["eval_loss_start"] = evaluate_loss(engine, evals, device)
        logger.log({"eval/loss": summary["eval_loss_start"], "eval/ppl": math.exp(summary["eval_loss_start"])}, 0)

    collapse_streak, skipped, step_times, opt_times = 0, 0, [], []
    last_metrics: dict = {}
    nonfinite = None
    step = start
    for step in range(start, stop):
        t0 = time.perf_counter()
        lr_used = scheduler.get_last_lr()[0]  # the LR this step applies (get_last_lr moves on after it)
        sums = torch.zeros(3, dtype=torch.float64)
        opt_time = 0.0
        for a in range(accum):
            ids = batch_of(train_blocks, sampler.indices(step, a)).to(device)
            lm = engine(input_ids=ids, labels=ids).loss
            zero = torch.zeros((), device=device)
            aux = sum((b.aux_loss for _, b in blocks_moe), zero)
            loss = lm + cfg.moe.aux_loss_coef * aux
            z = sum((b.z_loss for _, b in blocks_moe), zero) if cfg.moe.z_loss_coef > 0 else zero
            if cfg.moe.z_loss_coef > 0:
                loss = loss + cfg.moe.z_loss_coef * z
            if step == cfg.train.inject_nan_at_step:
                loss = loss * float("nan")
            acc.add(blocks_moe)
            if _any_rank(not torch.isfinite(loss).item(), device):
                if cfg.train.on_nonfinite == "stop":
                    nonfinite = f"loss is NaN/Inf at step {step + 1} (micro-batch {a})"
                    break
                # Drop this micro-batch: a zero loss over every parameter keeps the ranks' gradient
                # reductions in step and contributes nothing (the optimizer still steps, with
                # whatever the step's other micro-batches gave).
                skipped += 1
                loss = sum((p * 0).sum() for p in engine.module.parameters() if p.requires_grad)
                lm = torch.zeros(())
            engine.backward(loss)
            t_opt = time.perf_counter()
            engine.step()  # the optimizer runs at the accumulation boundary; its cost grows with total params
            opt_time += time.perf_counter() - t_opt
            sums += torch.tensor([lm.item(), aux.item(), z.item()], dtype=torch.float64)
        if nonfinite:
            break
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None and not math.isfinite(float(grad_norm)):
            nonfinite = f"gradient norm is NaN/Inf at step {step + 1}"
            break
        step_times.append(time.perf_counter() - t0)
        opt_times.append(opt_time)
        done = step + 1
        if done % cfg.log.every == 0 or done == stop:
            lm_mean, aux_mean, z_mean = _all_mean((sums / accum).tolist(), device)
            counts, dropped = acc.reduce()
            dt = step_times[-1]
            tps = tokens_per_step / dt
            metrics = {
                "loss/lm": lm_mean,
                "loss/aux": aux_mean,
                "loss/z": z_mean,
                "loss/total": lm_mean + cfg.moe.aux_loss_coef * aux_mean + cfg.moe.z_loss_coef * z_mean,
                "optim/lr": lr_used,
                "optim/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "optim/skipped_microbatches": skipped,
                "throughput/step_time_s": dt,
                "throughput/optimizer_s": opt_time,
                "throughput/tokens_per_s": tps,
                "throughput/tokens_per_s_per_device": tps / world,
                "throughput/tflops_per_device": flops_per_token * tps / world / 1e12,
                "throughput/mfu": mfu(flops_per_token, tps / world, peak),
                "memory/peak_gib": peak_memory_gib(device),
                "train/tokens_seen": done * tokens_per_step,
            }
            if layers:
                metrics.update(router_metrics(layers, counts, dropped, cfg.log.dead_expert_threshold))
            images = None
            if layers and cfg.log.heatmap_every and (done % cfg.log.heatmap_every == 0 or done == 1):
                if rank == 0:
                    (out / "heatmaps").mkdir(exist_ok=True)
                    png = heatmap_png(counts, layers, out / "heatmaps" / f"step_{done:06d}.png", f"step {done}")
                    images = {"router/load_heatmap": str(png)}
            if layers and cfg.log.collapse_max_over_mean > 0:
                collapsed = metrics["router/max_over_mean_worst"] > cfg.log.collapse_max_over_mean
                collapse_streak = collapse_streak + 1 if collapsed else 0
                metrics["alerts/router_collapse"] = float(collapse_streak >= cfg.log.collapse_patience)
                if collapse_streak >= cfg.log.collapse_patience:
                    logger.alert(
                        "router collapse",
                        f"max/mean expert load {metrics['router/max_over_mean_worst']:.2f} > "
                        f"{cfg.log.collapse_max_over_mean} for {collapse_streak} logging steps (step {done})",
                    )
            logger.log(metrics, done, images)
            last_metrics = metrics
            if rank == 0:
                log.info(
                    "step %d/%d | loss %.4f | aux %.4f | lr %.2e | %.0f tok/s | MFU %.1f%% | max/mean %.2f",
                    done, cfg.train.steps, lm_mean, aux_mean, metrics["optim/lr"], tps,
                    100 * metrics["throughput/mfu"], metrics.get("router/max_over_mean_worst", float("nan")),
                )  # fmt: skip
        if cfg.log.eval_every and done % cfg.log.eval_every == 0 and done != stop:
            ev = evaluate_loss(engine, evals, device)
            logger.log({"eval/loss": ev, "eval/ppl": math.exp(ev)}, done)
        if cfg.train.save_every and done % cfg.train.save_every == 0 and done != stop:
            checkpoint.save(
                engine, ckpt_root, done, _state(cfg, done), rank, done == cfg.train.inject_crash_in_save_at_step
            )

    if nonfinite:
        logger.alert("non-finite loss", f"{nonfinite}; stopping. The last good checkpoint is kept, nothing is saved.")
        logger.finish()
        raise NonFiniteError(
            f"{nonfinite}; stopped without saving (last complete checkpoint: "
            f"{checkpoint.latest_tag(ckpt_root) or 'none'}). Lower the learning rate or set "
            "train.on_nonfinite=skip"
        )
    done = stop if stop > start else start
    if stop > start:
        checkpoint.save(
            engine, ckpt_root, done, _state(cfg, done), rank, done == cfg.train.inject_crash_in_save_at_step
        )
    summary["eval_loss_end"] = evaluate_loss(engine, evals, device)
    if cfg.log.sample_prompt:
        summary["sample_end"] = greedy_sample(engine, tokenizer, cfg.log.sample_prompt, cfg.log.sample_tokens, device)
    logger.log({"eval/loss": summary["eval_loss_end"], "eval/ppl": math.exp(summary["eval_loss_end"])}, done)
    if step_times:
        steady = step_times[1:] or step_times  # the first step includes warm-up
        summary["tokens_per_s"] = tokens_per_step / (sum(steady) / len(steady))
        summary["mfu"] = mfu(flops_per_token, summary["tokens_per_s"] / world, peak)
        steady_opt = opt_times[1:] or opt_times
        summary["step_time_s"] = sum(steady) / len(steady)
        summary["optimizer_s"] = sum(steady_opt) / len(steady_opt)
    summary.update(
        steps_done=done,
        final_train_loss=last_metrics.get("loss/lm"),
        max_over_mean=last_metrics.get("router/max_over_mean_worst"),
        checkpoint=str(ckpt_root / checkpoint.tag_for(done)),
        router_final={k: v for k, v in last_metrics.items() if k.startswith("router/")},
    )
    if rank == 0:
        checkpoint.atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    logger.finish()
    return summary


def _state(cfg: RunConfig, step: int) -> dict:
    """Our part of a checkpoint: the data position is the step (the sampler is a pure function
    of it), plus the resolved config the export needs."""
    return {"data_position": {"next_step": step}, "config": cfg.to_dict()}


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[ds_upcycle] %(message)s", stream=sys.stdout, force=True)
    for noisy in ("DeepSpeed", "deepspeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_main(argv: list[str] | None = None) -> int:
    """One rank: `deepspeed ... --module ds_upcycle.train CONFIG [overrides]`."""
    from ds_upcycle.distributed import strip_local_rank

    argv = strip_local_rank(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    _setup_logging()
    from ds_upcycle.distributed import shutdown_distributed

    try:
        cfg = load_run_config(argv[0], argv[1:])
        run(cfg)
        shutdown_distributed()
    except (ValueError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ValueError) else 3
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds-upcycle train",
        description="Validate a ds_configs run, then start it through the deepspeed launcher: every rank "
        "loads the dense checkpoint, builds its own experts (online upcycling) and trains with ZeRO + "
        "expert parallelism, logging router load and throughput to W&B. Extra --section.key=value "
        "arguments override the file (sections: model, moe, data, train, log; --ds.KEY.PATH=V edits "
        "the DeepSpeed part).",
        epilog="example: ds-upcycle train ds_configs/cpu_debug_zero2_ep2.json --num-gpus 2 --train.steps=20",
    )
    p.add_argument("config", help="a ds_configs/*.json file")
    p.add_argument(
        "--num-gpus", type=int, default=None, help="ranks on this machine (CPU ranks without GPUs; default 1)"
    )
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (see hostfiles/); world size = its slots")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: the launcher's 29500)")
    return p


def main(argv: list[str] | None = None) -> int:
    """ds-upcycle train CONFIG [--num-gpus N | --hostfile F] [--section.key=value ...]"""
    from ds_upcycle.launch import launcher_cmd, run_launcher, world_size

    args, overrides = build_parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_run_config(args.config, overrides)
        world = world_size(args.num_gpus, args.hostfile)
        validate(cfg, world)
        cmd = launcher_cmd(
            "ds_upcycle.train",
            [args.config, *overrides],
            num_gpus=args.num_gpus,
            hostfile=args.hostfile,
            master_port=args.master_port,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = run_launcher(cmd).returncode
    if rc != 0:
        print(
            f"error: the training job failed (exit {rc}); the launcher's last lines above name the rank "
            "(--local_rank=N) that exited first. Complete checkpoints are kept; resume with --train.resume=true",
            file=sys.stderr,
        )
    return rc


if __name__ == "__main__":
    sys.exit(worker_main())
