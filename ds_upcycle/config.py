"""Run configuration: typed, frozen dataclasses loaded from a ds_configs JSON file plus overrides.

A ds_configs file is a complete DeepSpeed config with concrete values, plus one project section
named ``"ds_upcycle"`` (DeepSpeed ignores unknown top-level keys). The section has one sub-table
per concern: ``model``, ``moe``, ``data``, ``train``, ``log``, ``debug``, and an optional
one-line ``description``. The shipped configs live in the package (``ds_upcycle/ds_configs``,
also at the repository's top level) and can be named instead of given as a path.

Precedence: command-line overrides > file > dataclass defaults. Overrides look like
``--moe.num_experts=4`` or ``--ds.zero_optimization.stage=1`` (the latter edits the DeepSpeed part).
Every value is type-checked and validated on construction; mistakes raise ``ValueError`` naming
the field, the value and what is allowed.

NOTE: the section is deliberately not called ``expert_parallel``: that key switches on DeepSpeed's
own AutoEP path (deepspeed/runtime/config.py), which is a different feature.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

PROJECT_KEY = "ds_upcycle"

ROUTER_INITS = ("normal", "zeros", "uniform")
EXPERT_INITS = ("copy", "noise", "drop")
BALANCE_MODES = ("micro_batch", "global_batch")
BALANCE_STATISTICS = ("deepspeed", "all_routes")
WANDB_MODES = ("auto", "online", "offline", "disabled")
MAX_EXPERTS = 4096
"""Far beyond any published MoE; a bound that catches typos before they exhaust memory."""


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} ({value!r}) must be > 0")


def _non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} ({value!r}) must be >= 0")


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} ({value!r}) must be one of {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class MoEConfig:
    """How each dense MLP becomes a Mixture-of-Experts layer (defaults follow arXiv 2412.09952)."""

    num_experts: int = 8
    """Experts per MoE layer (global, across all expert-parallel ranks), as DeepSpeed and the exported
    Mixtral see them: with granularity G, the fine-grained experts (num_experts / G copies of the
    dense MLP, each split into G). Paper: 8."""
    top_k: int = 2
    """Experts each token is routed to (fine-grained ones with granularity G: top_k / G copies). 2
    (recommended) renormalises the gates, so copies of the dense MLP reproduce it exactly; 1 scales by
    the gate probability and is not function-preserving."""
    ep_size: int = 1
    """Expert-parallel group size: each rank holds num_experts / ep_size experts."""
    capacity_factor: float = 1.0
    """Training capacity per expert = ceil(tokens / num_experts * capacity_factor * top_k). Only
    used when drop_tokens is true. Paper main run: 4."""
    eval_capacity_factor: float = 1.0
    """Capacity factor in eval mode (only used when drop_tokens is true)."""
    min_capacity: int = 4
    """Lower bound on the per-expert capacity (only used when drop_tokens is true)."""
    drop_tokens: bool = False
    """False = dropless (capacity grows to the busiest expert); exact and the default. True drops
    tokens past capacity and needs every rank to see the same token count."""
    aux_loss_coef: float = 1e-2
    """Weight of the load-balancing loss (arXiv 2410.07524: 1e-2 to 1e-3 work best)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss (mean logsumexp(logits)^2). 0 disables it (2410.07524: no gain)."""
    balance: str = "micro_batch"
    """Scope of the balance loss's expert fractions: "micro_batch" (this rank's tokens of the
    micro-batch, as DeepSpeed computes it) or "global_batch" (the expert counts are all-reduced over
    every rank of the world before the product, once per micro-batch: no accumulation across the
    micro-batches of a step). The statistic is balance_statistic either way, so an ablation of the
    two differs in scope only."""
    balance_statistic: str = "deepspeed"
    """Which routes the balance loss's expert fractions count: "deepspeed" (DeepSpeed's own: the
    first choice of each token for top_k <= 2, all top_k routes for top_k > 2;
    deepspeed/moe/sharded_moe.py top1gating/top2gating/topkgating) or "all_routes" (all top_k routes
    of each token, at every k)."""
    router_init: str = "normal"
    """Router weight init: "normal" (N(0, router_init_std)), "uniform" (centred uniform with the same
    std, Drop-Upcycling's reference recipe) or "zeros" (near-uniform routing at step 0: zeros plus a
    seeded N(0, 1e-6) jitter, so argmax ties do not send every token to experts 0..k-1)."""
    router_init_std: float = 0.02
    """Standard deviation of the "normal" and "uniform" router inits."""
    expert_init: str = "copy"
    """Expert init: "copy" (exact copies of the dense MLP), "noise" (copies plus N(0, expert_noise_std))
    or "drop" (Drop-Upcycling, arXiv 2502.19261: drop_ratio of each expert's neurons re-initialised)."""
    expert_noise_std: float = 1e-3
    """Std of the Gaussian noise added to each expert weight when expert_init is "noise"."""
    drop_ratio: float = 0.5
    """expert_init "drop": the share of each expert's intermediate neurons whose gate/up rows and down
    columns are re-drawn from N(mean, std) of the dense matrix (per expert, seeded). Paper's best: 0.5."""
    granularity: int = 1
    """Granular upcycling (arXiv 2410.07524): each of the num_experts / G copies of the dense MLP is cut
    into G experts of width intermediate / G, its router row repeated for its G segments and every
    down projection scaled by G, so renormalised top_k routing (top_k / G copies) is exact at step 0.
    num_experts and top_k must be multiples of G. 1: plain copies."""
    freeze_router: bool = False
    """Train with the router weights frozen at their init (they get no updates)."""
    router_lr_scale: float = 1.0
    """The router's learning rate as a multiple of the model's (schedule included)."""
    router_weight_decay: float = 0.0
    """Weight decay of the router weights (the optimizer's weight_decay applies to the other 2-D
    weights; norms and biases get none). 0 (default): routers are not pulled towards zero logits."""
    seed: int = 1234
    """Seed for the router and expert-noise init; the same on every rank, so every rank agrees."""
    moe_layers: str | list[int] = "all"
    """Which decoder layers become MoE: "all", "every_K" (layers 0, K, 2K, ...) or a list of indices."""

    def __post_init__(self) -> None:
        _positive("moe.num_experts", self.num_experts)
        if self.num_experts > MAX_EXPERTS:
            raise ValueError(f"moe.num_experts ({self.num_experts}) must be <= {MAX_EXPERTS}")
        _positive("moe.top_k", self.top_k)
        _positive("moe.ep_size", self.ep_size)
        if self.top_k > self.num_experts:
            raise ValueError(f"moe.top_k ({self.top_k}) must be <= moe.num_experts ({self.num_experts})")
        if self.num_experts % self.ep_size != 0:
            raise ValueError(
                f"moe.num_experts ({self.num_experts}) must be divisible by moe.ep_size "
                f"({self.ep_size}); choose an ep_size that divides {self.num_experts}"
            )
        _positive("moe.capacity_factor", self.capacity_factor)
        _positive("moe.eval_capacity_factor", self.eval_capacity_factor)
        _positive("moe.min_capacity", self.min_capacity)
        _non_negative("moe.aux_loss_coef", self.aux_loss_coef)
        _non_negative("moe.z_loss_coef", self.z_loss_coef)
        _one_of("moe.balance", self.balance, BALANCE_MODES)
        _one_of("moe.balance_statistic", self.balance_statistic, BALANCE_STATISTICS)
        _non_negative("moe.router_weight_decay", self.router_weight_decay)
        _one_of("moe.router_init", self.router_init, ROUTER_INITS)
        _positive("moe.router_init_std", self.router_init_std)
        _one_of("moe.expert_init", self.expert_init, EXPERT_INITS)
        _positive("moe.expert_noise_std", self.expert_noise_std)
        self._check_recipes()
        if isinstance(self.moe_layers, str):
            if self.moe_layers != "all" and not _parse_every(self.moe_layers):
                raise ValueError(
                    f'moe.moe_layers ({self.moe_layers!r}) must be "all", "every_K" with K >= 1, '
                    "or a list of layer indices"
                )
        elif not self.moe_layers:
            raise ValueError("moe.moe_layers ([]) must name at least one layer")
        elif not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in self.moe_layers):
            raise ValueError(f"moe.moe_layers ({self.moe_layers}) must be layer indices: integers >= 0")
        elif len(set(self.moe_layers)) != len(self.moe_layers):
            raise ValueError(f"moe.moe_layers ({self.moe_layers}) has duplicate indices")

    def _check_recipes(self) -> None:
        """Drop-Upcycling, granular upcycling and the router controls."""
        if not 0 < self.drop_ratio <= 1:
            raise ValueError(f"moe.drop_ratio ({self.drop_ratio}) must be in (0, 1] (paper: 0.5)")
        _positive("moe.granularity", self.granularity)
        g = self.granularity
        for name, value in (("num_experts", self.num_experts), ("top_k", self.top_k)):
            if value % g:
                raise ValueError(
                    f"moe.{name} ({value}) must be a multiple of moe.granularity ({g}): it counts the fine-grained "
                    f"experts, G per copy of the dense MLP (e.g. {g * max(1, value // g)})"
                )
        if g > 1 and self.router_init == "zeros":
            # The copies would be only a 1e-6 jitter apart: near-ties that rounding can turn into
            # ties, which torch.topk (deepspeed/moe/sharded_moe.py topkgating) breaks in no fixed
            # order, so top_k could take part of one copy and part of another.
            raise ValueError(
                f"moe.router_init ('zeros') nearly ties all {self.num_experts // g} copies when moe.granularity is "
                f"{g}, and top-k would split copies; use router_init 'normal' or 'uniform'"
            )
        _positive("moe.router_lr_scale", self.router_lr_scale)
        if self.freeze_router and self.router_lr_scale != 1.0:
            raise ValueError(
                f"moe.router_lr_scale ({self.router_lr_scale}) has no effect with moe.freeze_router true; "
                "set one of them"
            )

    @property
    def exact(self) -> bool:
        """True when the upcycled model reproduces the dense model exactly at step 0 (copies, or
        granular segments of copies, with renormalised top-k >= 2 and no token dropping)."""
        return self.top_k >= 2 and not self.drop_tokens and self.expert_init == "copy"

    @property
    def num_copies(self) -> int:
        """Copies of the dense MLP per MoE layer (num_experts / granularity)."""
        return self.num_experts // self.granularity

    def check_intermediate(self, intermediate: int) -> None:
        """The model's MLP width must split into granularity equal segments."""
        if intermediate % self.granularity:
            raise ValueError(
                f"moe.granularity ({self.granularity}) must divide the model's intermediate_size ({intermediate}); "
                "choose a divisor of it"
            )

    def layer_indices(self, num_layers: int) -> list[int]:
        """The decoder-layer indices that become MoE, validated against the model's depth."""
        if self.moe_layers == "all":
            return list(range(num_layers))
        if isinstance(self.moe_layers, str):
            every = _parse_every(self.moe_layers)
            return list(range(0, num_layers, every))
        bad = [i for i in self.moe_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(
                f"moe.moe_layers ({self.moe_layers}) has indices {bad} out of range for a model "
                f"with {num_layers} layers; use 0..{num_layers - 1}"
            )
        return sorted(self.moe_layers)


def _parse_every(spec: str) -> int:
    if spec.startswith("every_") and spec[6:].isdigit() and int(spec[6:]) >= 1:
        return int(spec[6:])
    return 0


@dataclass(frozen=True)
class ModelConfig:
    """Where the model comes from."""

    path: str = ""
    """Dense HF checkpoint folder (safetensors) to upcycle online, or an HF Mixtral folder from
    `ds-upcycle upcycle`."""
    upcycle: bool = True
    """False trains the dense model as it is, through the same loop: the dense baseline."""
    dtype: str = "fp32"
    """Weights dtype for training: "fp32" (CPU) or "bf16" (GPU; must match the DeepSpeed bf16 section)."""
    activation_checkpointing: bool = False
    """Non-reentrant activation checkpointing of each decoder layer. (The reentrant kind silently
    cuts the aux loss's gradient.)"""

    def __post_init__(self) -> None:
        _one_of("model.dtype", self.dtype, ("fp32", "bf16", "fp16"))


@dataclass(frozen=True)
class DataConfig:
    """Training text: prepared once into a cache of packed token blocks, read memory-mapped."""

    train: list[str] = field(default_factory=list)
    """Local files (.txt, .jsonl/.json, .parquet; globs allowed) for training."""
    eval: list[str] = field(default_factory=list)
    """Held-out files. If empty, the last eval_fraction of the packed training blocks is held out."""
    hub_dataset: str = ""
    """A hub dataset name (e.g. "allenai/c4:en"), used instead of train when set and reachable."""
    hub_split: str = "train"
    """Split of hub_dataset to read."""
    streaming: bool = False
    """Stream hub_dataset instead of downloading it (for corpora larger than disk)."""
    text_field: str = "text"
    """Column/key holding the text in .jsonl/.json/.parquet files and hub datasets."""
    seq_len: int = 256
    """Tokens per packed training block (documents joined with EOS)."""
    eval_fraction: float = 0.05
    """Fraction of blocks held out when no eval files are given."""
    eval_batches: int = 4
    """Micro-batches used for each held-out perplexity measurement."""
    cache_dir: str = ""
    """Where tokenised blocks are cached (default: <output_dir>/../.cache/tokens)."""
    skip_bad_records: bool = False
    """Skip malformed JSON lines / non-UTF-8 lines (counted and reported) instead of failing."""
    num_proc: int = 0
    """Processes that tokenise in parallel while the data is prepared (0: min(8, CPU count)). The
    blocks are the same for any value; 1 tokenises in the preparing process alone."""

    def __post_init__(self) -> None:
        _positive("data.seq_len", self.seq_len)
        if self.num_proc < 0:
            raise ValueError(
                f"data.num_proc ({self.num_proc}) must be >= 0 (0: min(8, CPU count), 1: no worker processes)"
            )
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"data.eval_fraction ({self.eval_fraction}) must be in [0, 1)")
        _positive("data.eval_batches", self.eval_batches)


@dataclass(frozen=True)
class TrainConfig:
    """The loop: schedule, checkpoints, resume. Optimizer type and peak LR live in the DeepSpeed
    "optimizer" section; the schedule shape lives here."""

    steps: int = 100
    """Optimizer steps to train for."""
    warmup_steps: int = 10
    """Linear warm-up steps to the optimizer's peak lr (paper: 100)."""
    min_lr: float = 0.0
    """Cosine decays from the peak lr to this value at `steps` (paper: 3e-7 from 3e-5)."""
    seed: int = 0
    """Data order and dropout seed, the same on every rank."""
    output_dir: str = "runs/debug"
    """Run folder: resolved config, checkpoints, metrics."""
    save_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    save_final: bool = True
    """Save a checkpoint at the end. Benchmarks pass false: an upcycled 8B-class checkpoint is tens of
    GB, more than a benchmark machine's disk."""
    resume: bool = False
    """Continue from the latest complete checkpoint in output_dir."""
    overwrite: bool = False
    """Start a new run in an output_dir that already holds one: the old run is moved aside to
    <output_dir>.old-<time> (never deleted). Without it (or resume), such a folder is refused."""
    stop_after: int = 0
    """Stop after this step (with a checkpoint), to resume later on the same schedule (0: run to steps)."""
    timeout_s: float = 300.0
    """Collective timeout: a dead or stuck rank fails the job after this long instead of hanging it."""
    on_nonfinite: str = "stop"
    """What to do when a micro-batch's loss is NaN/Inf: "stop" (exit code 3, keep the last good
    checkpoint) or "skip" (that micro-batch contributes nothing). A step DeepSpeed skipped because of
    a gradient overflow (non-finite gradients; ZeRO-1/2 then leaves the weights and the LR schedule
    untouched) is counted either way; "stop" also stops after max_skipped_steps of them in a row."""
    max_skipped_steps: int = 10
    """With on_nonfinite="stop": stop after this many consecutive steps DeepSpeed skipped for a
    gradient overflow (fp16's dynamic loss scale skips a few while it calibrates). 0: never."""
    keep_last: int = 3
    """After each complete save, delete older complete checkpoints beyond the newest N (0: keep all).
    latest_complete and a checkpoint still being written are never deleted."""
    preempt_save_timeout_s: float = 120.0
    """On SIGTERM/SIGINT (or when the launcher is gone) every rank finishes its step and saves; a rank
    still alive this long after the request exits anyway (exit 124, nothing new saved). Set it a little
    below the scheduler's grace period (Slurm KillWait, Kubernetes terminationGracePeriodSeconds)."""

    def __post_init__(self) -> None:
        _positive("train.steps", self.steps)
        _non_negative("train.warmup_steps", self.warmup_steps)
        _non_negative("train.min_lr", self.min_lr)
        _non_negative("train.save_every", self.save_every)
        _non_negative("train.stop_after", self.stop_after)
        _positive("train.timeout_s", self.timeout_s)
        _one_of("train.on_nonfinite", self.on_nonfinite, ("stop", "skip"))
        _non_negative("train.keep_last", self.keep_last)
        _positive("train.preempt_save_timeout_s", self.preempt_save_timeout_s)
        _non_negative("train.max_skipped_steps", self.max_skipped_steps)


@dataclass(frozen=True)
class LogConfig:
    """Console and Weights & Biases logging."""

    wandb: str = "auto"
    """"auto" (online if logged in, else offline), "online", "offline" or "disabled"."""
    project: str = "ds_upcycle"
    """W&B project."""
    group: str = ""
    """W&B group (ablations share one)."""
    name: str = ""
    """W&B run name (default: the output folder's name)."""
    notes: str = ""
    """W&B run notes (ablate records each run's config difference from the first here)."""
    every: int = 1
    """Log scalars every N steps."""
    eval_every: int = 0
    """Held-out perplexity every N steps (0: only at the start and the end)."""
    heatmap_every: int = 0
    """Draw a layer x expert load heatmap (the logging window's routes) every N steps, a multiple of
    `every`, and at the first logged step; always at the last step (0: only at the last step; -1:
    never, e.g. to keep matplotlib off rank 0)."""
    dead_expert_threshold: float = 0.1
    """An expert is dead when its load is below this fraction of the mean load."""
    collapse_max_over_mean: float = 0.0
    """Warn (console + W&B alert) when a layer's max/mean load stays above this (0: off)."""
    collapse_patience: int = 3
    """Logging steps the collapse condition must hold before the warning fires."""
    peak_tflops: float = 0.0
    """Peak FLOP/s per device, in TFLOP/s, for MFU (0: look the device up in a table)."""
    health_every: int = 10
    """Upcycling-health metrics (expert-dense and expert-expert similarity, router margin) every N
    steps and at step 0 (0: off). Costs about one pass over the expert weights plus one read of the
    dense MLPs of the MoE layers."""
    sample_prompt: str = ""
    """If set, a greedy continuation of this prompt is generated at the start and the end (summary.json)."""
    sample_tokens: int = 24
    """New tokens in each greedy sample."""

    def __post_init__(self) -> None:
        _one_of("log.wandb", self.wandb, WANDB_MODES)
        _positive("log.every", self.every)
        _non_negative("log.eval_every", self.eval_every)
        if self.heatmap_every < -1:
            raise ValueError(f"log.heatmap_every ({self.heatmap_every}) must be >= 0, or -1 for no heatmaps")
        if self.heatmap_every > 0 and self.heatmap_every % self.every != 0:
            raise ValueError(
                f"log.heatmap_every ({self.heatmap_every}) must be a multiple of log.every ({self.every}): a heatmap "
                "shows a logging step's router counts"
            )
        _non_negative("log.dead_expert_threshold", self.dead_expert_threshold)
        _non_negative("log.collapse_max_over_mean", self.collapse_max_over_mean)
        _positive("log.collapse_patience", self.collapse_patience)
        _non_negative("log.peak_tflops", self.peak_tflops)
        _non_negative("log.health_every", self.health_every)


@dataclass(frozen=True)
class DebugConfig:
    """Fault injection for tests: real failures at chosen points. Never needed for real runs."""

    inject_nan_at_step: int = -1
    """Make the loss NaN at this 0-based step (tests the non-finite guard). -1 disables."""
    inject_crash_in_save_at_step: int = -1
    """Kill rank 0 midway through the save at this step (tests atomic saves). -1 disables."""
    report_env: list[str] = field(default_factory=list)
    """Environment variables each rank records in <output_dir>/ranks/ (tests: what reached the
    ranks of remote hosts). Never list secrets."""
    inject_inf_grad_at_steps: list[int] = field(default_factory=list)
    """Make a gradient Inf in the backward pass of these 0-based steps, so DeepSpeed skips them as
    overflowed (tests the skipped-step handling). Empty disables."""
    preempt_save_delay_s: float = 0.0
    """Sleep this long at the start of a preemption save (tests a second signal during the save)."""
    step_delay_s: float = 0.0
    """Sleep this long before every step (lets a test signal a run between two known steps)."""
    inject_crash_in_layout_free_at_step: int = -1
    """Kill rank 0 midway through writing the layout-free part of the save at this step (tests that
    such a save never becomes latest_complete). -1 disables."""
    save_at_resume: bool = False
    """Save again right after resuming, before any step (tests: the state a resume under another
    layout restored, written back from the new layout, equals the checkpoint it read)."""

    def __post_init__(self) -> None:
        _non_negative("debug.preempt_save_delay_s", self.preempt_save_delay_s)
        _non_negative("debug.step_delay_s", self.step_delay_s)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "log": LogConfig,
    "debug": DebugConfig,
}
DESCRIPTION = "description"
"""An optional one-line description in the project section (shown by `ds-upcycle configs`)."""


@dataclass(frozen=True)
class RunConfig:
    """One run: the project sections plus the DeepSpeed config they travel with."""

    model: ModelConfig
    moe: MoEConfig
    data: DataConfig
    train: TrainConfig
    log: LogConfig
    debug: DebugConfig
    ds: dict
    """The DeepSpeed config (everything in the file except the project section)."""
    source: str = ""
    """The file this was loaded from."""
    description: str = ""

    def to_dict(self) -> dict:
        """The resolved config as one JSON-able dict, in the same shape as a ds_configs file."""
        out = copy.deepcopy(self.ds)
        out[PROJECT_KEY] = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        if self.description:
            out[PROJECT_KEY][DESCRIPTION] = self.description
        return out


# --------------------------------------------------------------------------------------------
# Loading: a tiny typed loader (no pydantic needed) and the override syntax.
# --------------------------------------------------------------------------------------------


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Return value coerced to tp (int -> float only), or raise a ValueError naming the field."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _check_type(name, value, arm)
            except ValueError:
                pass
        raise ValueError(f"{name} ({value!r}) must be one of: {_type_name(tp)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            hint = ""
            if isinstance(value, str) and value.startswith("["):
                hint = (
                    "; its quotes look lost, e.g. to the remote shell of a multi-host `deepspeed` launch: put the "
                    "list in the config file, or start the run with `ds-upcycle train`, which passes it in a file"
                )
            raise ValueError(f"{name} ({value!r}) must be a list of {_type_name(item)}{hint}")
        return [_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is Literal:
        _one_of(name, value, typing.get_args(tp))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} ({value!r}) must be a number")
        if not math.isfinite(value):
            raise ValueError(f"{name} ({value!r}) must be finite")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} ({value!r}) must be an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} ({value!r}) must be true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} ({value!r}) must be a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # internal: a new field type


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def build_section(cls: type, section: str, values: dict) -> Any:
    """Construct dataclass cls from a dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ValueError(f"{section} ({values!r}) must be a JSON object")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f"{section}.{unknown[0]} is not a known setting; known {section} settings: " + ", ".join(names)
        )
    kwargs = {k: _check_type(f"{section}.{k}", v, hints[k]) for k, v in values.items()}
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """Override values are JSON where they parse as JSON (numbers, true, lists), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(args: list[str]) -> list[tuple[list[str], Any]]:
    """Parse ``--a.b.c=value`` (or ``--a.b.c value``) into (path, value) pairs."""
    out: list[tuple[list[str], Any]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ValueError(
                f"override {arg!r} is not of the form --section.key=value "
                f"(sections: {', '.join(SECTIONS)}, or ds.<deepspeed key>)"
            )
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, raw = arg[2:], args[i + 1]
            i += 1
        else:
            raise ValueError(f"override {arg!r} has no value; write {arg}=VALUE")
        out.append((key.split("."), _parse_value(raw)))
        i += 1
    return out


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a ds_configs JSON file (or a shipped config by name), apply overrides, and validate
    every section."""
    path = resolve_config(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config file {str(path)!r} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {str(path)!r} must hold a JSON object")
    if "expert_parallel" in raw:
        raise ValueError(
            f"config file {str(path)!r} has a top-level 'expert_parallel' key, which switches on "
            f"DeepSpeed's AutoEP; put MoE settings under '{PROJECT_KEY}.moe' instead"
        )
    if PROJECT_KEY not in raw:
        raise ValueError(
            f"config file {str(path)!r} has no {PROJECT_KEY!r} section (model, moe, data, train, log): it looks like a "
            f"plain DeepSpeed config. Add the section; `ds-upcycle configs --path cpu_debug_zero2_ep2` shows one"
        )
    return run_config_from_dict(raw, overrides, str(path))


def run_config_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "") -> RunConfig:
    """Build and validate a RunConfig from a ds_configs-shaped dict (e.g. one saved in a checkpoint)."""
    ds = copy.deepcopy({k: v for k, v in raw.items() if k != PROJECT_KEY})
    project = raw.get(PROJECT_KEY, {})
    if not isinstance(project, dict):
        raise ValueError(f"{PROJECT_KEY} ({project!r}) must be a JSON object")
    project = copy.deepcopy(project)
    description = project.pop(DESCRIPTION, "")
    if not isinstance(description, str):
        raise ValueError(f"{PROJECT_KEY}.{DESCRIPTION} ({description!r}) must be a string")
    unknown = sorted(set(project) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{PROJECT_KEY}.{unknown[0]} is not a known section; sections: {', '.join(SECTIONS)}")
    for keys, value in parse_overrides(overrides or []):
        if keys[0] == "ds":
            target, keys = ds, keys[1:]
        elif keys[0] in SECTIONS and len(keys) == 2:
            target = project.setdefault(keys[0], {})
            keys = keys[1:]
        else:
            raise ValueError(
                f"override --{'.'.join(keys)} names no setting; use --SECTION.KEY=VALUE with "
                f"SECTION one of {', '.join(SECTIONS)}, or --ds.<deepspeed key path>=VALUE"
            )
        for k in keys[:-1]:
            target = target.setdefault(k, {})
        target[keys[-1]] = value
    _check_no_auto(ds)
    sections = {name: build_section(cls, name, project.get(name, {})) for name, cls in SECTIONS.items()}
    return RunConfig(**sections, ds=ds, source=source, description=description)


def _check_no_auto(ds: dict, prefix: str = "") -> None:
    """``"auto"`` is only resolved by the HF Trainer integration; elsewhere DeepSpeed silently
    turns it into a default. Refuse it so what runs is what the file says."""
    for k, v in ds.items():
        name = f"{prefix}{k}"
        if v == "auto":
            raise ValueError(
                f'DeepSpeed key {name} is "auto", which only the HF Trainer resolves; give a concrete value'
            )
        if isinstance(v, dict):
            _check_no_auto(v, name + ".")


def to_overrides(values: dict[str, Any]) -> list[str]:
    """``{"train.steps": 20, "data.train": ["a.txt"]}`` -> ``["--train.steps=20", '--data.train=["a.txt"]']``:
    strings as they are, everything else as JSON (the inverse of :func:`parse_overrides`)."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()]


# --------------------------------------------------------------------------------------------
# MoE settings as overrides, for the commands that take only the moe section
# --------------------------------------------------------------------------------------------


def moe_overrides_help() -> str:
    """Help text listing every MoEConfig field with its default, for `--moe.KEY=VALUE` flags."""
    fields = ", ".join(f"{f.name}={json.dumps(f.default)}" for f in dataclasses.fields(MoEConfig))
    return f"MoE settings as --moe.KEY=VALUE, as `ds-upcycle train` takes them (defaults: {fields})"


def moe_from_overrides(args: list[str], base: MoEConfig | None = None) -> MoEConfig:
    """A validated MoEConfig from ``--moe.KEY=VALUE`` arguments (any other argument is an error)."""
    values = dataclasses.asdict(base) if base is not None else {}
    for keys, value in parse_overrides(args):
        if keys[0] != "moe" or len(keys) != 2:
            raise ValueError(
                f"--{'.'.join(keys)} is not a MoE setting; this command takes --moe.KEY=VALUE with KEY one of "
                + ", ".join(f.name for f in dataclasses.fields(MoEConfig))
            )
        values[keys[1]] = value
    return build_section(MoEConfig, "moe", values)


# --------------------------------------------------------------------------------------------
# The shipped configs: package data, addressable by name
# --------------------------------------------------------------------------------------------

CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"
"""The shipped configs (package data; the repository's top-level ds_configs/ links here)."""


def shipped_configs() -> dict[str, Path]:
    """{name: path} of every shipped config, e.g. ``cpu_debug_zero2_ep2`` or ``ablations/drop``."""
    return {str(p.relative_to(CONFIG_DIR).with_suffix("")): p for p in sorted(CONFIG_DIR.rglob("*.json"))}


def resolve_config(name_or_path: str | Path) -> Path:
    """A config file path, or the path of the shipped config of that name (``.json`` optional)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_configs()
    name = str(name_or_path).removesuffix(".json")
    if name in shipped:
        return shipped[name]
    if path.is_dir():
        raise ValueError(f"config ({str(name_or_path)!r}) is a folder; give a .json file or a shipped config name")
    raise ValueError(
        f"config file {str(name_or_path)!r} does not exist and is not a shipped config's name; give a file or "
        "one of: " + ", ".join(shipped) + " (`ds-upcycle configs` describes them)"
    )


def configs_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="ds-upcycle configs",
        description="List the configs shipped with the package, by the name `ds-upcycle train NAME` takes, "
        "with a line on each. --path prints a config's file path instead (to copy and edit it).",
    )
    p.add_argument("--path", metavar="NAME", default=None, help="print the path of this shipped config")
    args = p.parse_args(argv)
    if args.path:
        print(resolve_config(args.path))
        return 0
    shipped = shipped_configs()
    width = max(map(len, shipped))
    for name, path in shipped.items():
        section = json.loads(path.read_text()).get(PROJECT_KEY, {})
        print(f"{name.ljust(width)}  {section.get(DESCRIPTION, '')}")
    return 0
