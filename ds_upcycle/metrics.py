"""Router statistics, throughput and MFU, and the logger that sends them to W&B and the console.

Keys are namespaced: ``loss/*``, ``optim/*``, ``throughput/*``, ``memory/*``, ``eval/*`` and
``router/layer_LL/*`` (see the README's metrics glossary). A logged value covers the logging window
(:class:`StepWindow`: the steps since the previous logging step), as the router counts do. Only
rank 0 writes; every rank must take part in the all-reduces that feed it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_upcycle.distributed import comm_device

log = logging.getLogger("ds_upcycle")

# Dense bf16 peak FLOP/s per device (vendor spec sheets, no sparsity).
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,  # SXM; PCIe is 756
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "MI300X": 1307.0,
}


# --------------------------------------------------------------------------------------------
# Router statistics
# --------------------------------------------------------------------------------------------


def router_stats(counts_E: torch.Tensor, dead_threshold: float) -> dict[str, float]:
    """Load statistics of one MoE layer from its global routed-token counts [E].

    frac_e: share of routes to expert e (sums to 1). max_over_mean = max(frac) * E (1 = perfect
    balance, E = collapse). cv = std/mean. entropy: routing entropy / log E (1 = uniform).
    dead_frac: share of experts whose load is below dead_threshold x the mean load.
    """
    counts = counts_E.double()
    num_experts = counts.numel()
    frac = counts / counts.sum().clamp(min=1)
    mean = 1.0 / num_experts
    nz = frac[frac > 0]
    out = {f"expert_{e:02d}": float(frac[e]) for e in range(num_experts)}
    out["max_over_mean"] = float(frac.max() / mean)
    out["cv"] = float(frac.std(unbiased=False) / mean)
    out["entropy"] = float(-(nz * nz.log()).sum() / math.log(num_experts)) if num_experts > 1 else 1.0
    out["dead_frac"] = float((frac < dead_threshold * mean).double().mean())
    return out


class RouterAccumulator:
    """Sums each MoE layer's local expert counts (and dropped tokens) over a step's micro-batches,
    then all-reduces them over the whole world: every rank routes its own tokens."""

    def __init__(self, layers: list[int], num_experts: int) -> None:
        self.layers = layers
        self.counts = torch.zeros(len(layers), num_experts, dtype=torch.float64)
        self.dropped = torch.zeros(len(layers), dtype=torch.float64)

    def add(self, blocks) -> None:
        for j, (_, block) in enumerate(blocks):
            self.counts[j] += block.exp_counts.detach().double().cpu()
            self.dropped[j] += float(block.dropped_tokens)

    def reduce(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Global (counts [layers, E], dropped [layers]); resets the accumulator."""
        packed = torch.cat([self.counts.flatten(), self.dropped])
        if torch.distributed.is_initialized():
            packed = packed.to(comm_device())
            torch.distributed.all_reduce(packed)
            packed = packed.cpu()
        n = self.counts.numel()
        counts, dropped = packed[:n].view_as(self.counts).clone(), packed[n:].clone()
        self.counts.zero_()
        self.dropped.zero_()
        return counts, dropped


def router_metrics(layers: list[int], counts: torch.Tensor, dropped: torch.Tensor, dead: float) -> dict:
    out: dict[str, float] = {}
    for j, layer in enumerate(layers):
        stats = router_stats(counts[j], dead)
        routed = float(counts[j].sum())
        stats["drop_frac"] = float(dropped[j]) / routed if routed else 0.0
        out.update({f"router/layer_{layer:02d}/{k}": v for k, v in stats.items()})
    loads = [out[f"router/layer_{layer:02d}/max_over_mean"] for layer in layers]
    out["router/max_over_mean_worst"] = max(loads)
    out["router/entropy_mean"] = sum(out[f"router/layer_{layer:02d}/entropy"] for layer in layers) / len(layers)
    out["router/dead_frac_mean"] = sum(out[f"router/layer_{layer:02d}/dead_frac"] for layer in layers) / len(layers)
    return out


# --------------------------------------------------------------------------------------------
# The logging window: every logged value covers the steps since the previous logging step
# --------------------------------------------------------------------------------------------


@dataclass
class StepWindow:
    """This rank's sums over the steps of one logging window (``log.every`` steps, fewer at the end)."""

    steps: int = 0
    loss_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])
    """LM, aux and z loss summed over the micro-batches that counted."""
    microbatches: int = 0
    """Micro-batches whose loss counted (those skipped for a NaN/Inf loss do not)."""
    grad_norm_sum: float = 0.0
    applied: int = 0
    """Steps DeepSpeed applied (not skipped for a gradient overflow): the grad norm's count."""
    seconds: float = 0.0
    optimizer_seconds: float = 0.0

    def add(self, loss_sums: list[float], microbatches: int, grad_norm: float, applied: bool, seconds: float,
            optimizer_seconds: float) -> None:  # fmt: skip
        self.steps += 1
        self.loss_sums = [a + b for a, b in zip(self.loss_sums, loss_sums, strict=True)]
        self.microbatches += microbatches
        if applied and math.isfinite(grad_norm):
            self.grad_norm_sum += grad_norm
            self.applied += 1
        self.seconds += seconds
        self.optimizer_seconds += optimizer_seconds

    def mean_losses(self) -> list[float]:
        """This rank's mean LM, aux and z loss per counted micro-batch (NaN when none counted)."""
        return [x / self.microbatches if self.microbatches else math.nan for x in self.loss_sums]


def window_metrics(w: StepWindow, tokens_per_step: int, world: int, flops_per_token: float, peak: float) -> dict:
    """Grad norm, throughput and MFU over a window: means over its steps (the grad norm over its
    applied steps; NaN when DeepSpeed skipped them all), tokens/s = the window's tokens / its time."""
    tps = w.steps * tokens_per_step / w.seconds
    return {
        "optim/grad_norm": w.grad_norm_sum / w.applied if w.applied else math.nan,
        "throughput/step_time_s": w.seconds / w.steps, "throughput/optimizer_s": w.optimizer_seconds / w.steps,
        "throughput/tokens_per_s": tps, "throughput/tokens_per_s_per_device": tps / world,
        "throughput/tflops_per_device": flops_per_token * tps / world / 1e12,
        "throughput/mfu": mfu(flops_per_token, tps / world, peak), "train/window_steps": w.steps,
    }  # fmt: skip


# --------------------------------------------------------------------------------------------
# Throughput and MFU
# --------------------------------------------------------------------------------------------


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """Achieved dense matmul rate, TFLOP/s: the peak used for MFU where no table entry fits
    (CPUs). Square matmuls of size 1024 (CPU) or 8192 (GPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, configured: float) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from): config > accelerator table > measured."""
    if configured > 0:
        return configured, "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value, f"table:{key}"
    return measured_matmul_tflops(device, dtype), "measured"


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float) -> float:
    """Model FLOPs utilisation = achieved model FLOP/s / peak FLOP/s.

    flops_per_token is Megatron's training count over *active* parameters (ds_upcycle/plan.py,
    Narayanan et al. 2021 eq. 3; the formula behind the 46.8% of arXiv 2412.09952): dropped tokens
    and padding to capacity are not subtracted, recomputation is not added.
    """
    return flops_per_token * tokens_per_s_per_device / (peak * 1e12)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# --------------------------------------------------------------------------------------------
# The logger: console + metrics.jsonl + W&B, rank 0 only
# --------------------------------------------------------------------------------------------


def wandb_mode(setting: str) -> str:
    """ "auto" -> online when an API key is configured (env or netrc), else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


class RunLogger:
    """One ``log(metrics, step)`` per logging step, to every sink. No-op on ranks other than 0."""

    def __init__(self, out_dir: Path, rank: int, mode: str, cfg_log, config: dict):
        self.active = rank == 0
        self.run = None
        self.alerted: set[str] = set()
        if not self.active:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out_dir / "metrics.jsonl", "a")
        if mode != "disabled":
            import wandb

            self.run = wandb.init(
                project=cfg_log.project,
                group=cfg_log.group or None,
                name=cfg_log.name or out_dir.name,
                notes=cfg_log.notes or None,
                dir=str(out_dir),
                mode=mode,
                config=config,
                resume="allow",
                id=_run_id(out_dir),
                settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
            )
            self.run.save(str(out_dir / "config.json"), base_path=str(out_dir), policy="now")

    def log(self, metrics: dict, step: int, images: dict | None = None) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            payload = dict(metrics)
            if images:
                import wandb

                payload.update({k: wandb.Image(v) for k, v in images.items()})
            self.run.log(payload, step=step)

    def alert(self, title: str, text: str) -> None:
        """A warning on the console and, once per title, a W&B alert."""
        log.warning("%s: %s", title, text)
        if self.active and self.run is not None and title not in self.alerted:
            self.alerted.add(title)
            try:
                self.run.alert(title=title, text=text)
            except Exception as e:  # offline runs cannot send alerts; the console has it
                log.info("W&B alert not sent (%s)", e)

    @property
    def url(self) -> str:
        if self.run is None:
            return ""
        return self.run.url or str(Path(self.run.dir).parent)

    def finish(self) -> None:
        if self.active:
            self.jsonl.close()
            if self.run is not None:
                self.run.finish()


def _run_id(out_dir: Path) -> str:
    """A stable W&B run id per output folder, so a resumed run continues the same W&B run."""
    import hashlib

    return hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]


def heatmap_png(matrix: torch.Tensor, layers: list[int], path: Path, title: str) -> Path:
    """A layer x expert load heatmap (share of routes), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frac = (matrix / matrix.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    fig, ax = plt.subplots(figsize=(1 + 0.5 * frac.shape[1], 1 + 0.3 * len(layers)))
    im = ax.imshow(frac, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="share of routes")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
