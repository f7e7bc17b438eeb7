"""Router statistics, throughput and MFU, and the logger that sends them to W&B and the console.

Keys are namespaced: ``loss/*``, ``optim/*``, ``throughput/*``, ``memory/*``, ``eval/*``,
``router/layer_LL/*`` and ``health/layer_LL/*`` (see the README's metrics glossary). A logged value
covers the logging window (:class:`StepWindow`: the steps since the previous logging step), as the
router counts do. Only rank 0 writes; every rank must take part in the all-reduces that feed it.
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
# Upcycling health: how far experts moved from the dense MLP and from each other, and how
# decisive routing is. Each expert is one vector: its gate, up and down weights together.
# --------------------------------------------------------------------------------------------

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class DenseReference:
    """Each expert's step-0 reference: its copy of the dense MLP (its granularity segment, down
    scaled by G), read back from the checkpoint the run started from, one layer at a time.

    Nothing is kept in memory between measurements: at Llama-3-8B scale the dense MLPs of 32 MoE
    layers are 5.6 B parameters (11 GB in bf16) that every rank would hold. The safetensors files are
    memory-mapped, so the ranks of a node share one page-cached copy, and a measurement reads each
    MoE layer's three dense matrices once. A Mixtral folder (e.g. `ds-upcycle upcycle` output)
    has no dense MLP: its own step-0 experts are the reference there.
    """

    def __init__(self, model_path: str | Path, granularity: int) -> None:
        from ds_upcycle.safetensors_stream import read_lazily

        self.tensors = read_lazily(Path(model_path))
        self.granularity = granularity

    def expert(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        from ds_upcycle.mixtral import expert_name
        from ds_upcycle.upcycle import dense_segment

        dense = {p: f"model.layers.{layer}.mlp.{p}.weight" for p in PROJECTIONS}
        if all(k in self.tensors for k in dense.values()):
            weights = {p: self.tensors[k][1]() for p, k in dense.items()}
            return dense_segment(weights, self.granularity, expert % self.granularity)
        return {p: self.tensors[expert_name(layer, expert, p)][1]() for p in PROJECTIONS}


def _dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum((a[p] * b[p]).sum(dtype=torch.float64) for p in PROJECTIONS)


def _all_reduce(t: torch.Tensor, group=None) -> torch.Tensor:
    if not torch.distributed.is_initialized():
        return t
    out = t.to(comm_device())
    torch.distributed.all_reduce(out, group=group)
    return out.to(t.device)


def layer_health(block, layer: int, reference: DenseReference, ep_rank: int) -> dict[str, float]:
    """One MoE layer: cosine similarity of every expert to its dense reference (mean, min), and the
    mean pairwise cosine similarity between experts that started from the same dense weights (all
    pairs; with granularity G, pairs of the same segment). Collective over the layer's EP group.

    Pairs across ranks are exact, without moving experts: with unit vectors u_i, the sum over pairs
    i != j of u_i . u_j is |sum_i u_i|^2 - n, so each rank adds its own u_i and one all-reduce of an
    expert-sized sum per segment gives every pair."""
    experts = block.local_experts
    num_experts, g = block.num_experts, block.granularity
    first = ep_rank * len(experts)
    dense_sim = torch.zeros(num_experts, dtype=torch.float64)
    counts = torch.zeros(g, dtype=torch.float64)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    for j, expert in enumerate(experts):
        w = {p: getattr(expert, p).weight.detach().float() for p in PROJECTIONS}
        ref = {p: t.to(w[p].device, torch.float32) for p, t in reference.expert(layer, first + j).items()}
        norm = _dot(w, w).sqrt()
        dense_sim[first + j] = (_dot(w, ref) / (norm * _dot(ref, ref).sqrt())).cpu()
        seg = (first + j) % g
        acc = sums.setdefault(seg, {p: torch.zeros_like(t) for p, t in w.items()})
        for p in PROJECTIONS:
            acc[p] += w[p] / norm.float()
        counts[seg] += 1
    shapes = {p: getattr(experts[0], p).weight.shape for p in PROJECTIONS}
    device = experts[0].gate_proj.weight.device
    flat = torch.cat(
        [sums[s][p].flatten() if s in sums else torch.zeros(shapes[p].numel(), device=device)
         for s in range(g) for p in PROJECTIONS]
    )  # fmt: skip
    group = block.moe.deepspeed_moe.ep_group if block.moe.ep_size > 1 else None
    if group is not None:
        dense_sim, counts, flat = (_all_reduce(t, group) for t in (dense_sim, counts, flat))
    per_segment = flat.view(g, -1).double().square().sum(dim=1).cpu()  # |sum_i u_i|^2 per segment
    pairs = float((counts * (counts - 1)).sum())
    out = {"dense_sim_mean": float(dense_sim.mean()), "dense_sim_min": float(dense_sim.min())}
    if pairs > 0:
        out["expert_sim_mean"] = float((per_segment - counts).sum()) / pairs
    return out


@torch.no_grad()
def health_metrics(blocks, moe, model_path: str | Path) -> dict[str, float]:
    """Upcycling-health scalars of every MoE layer and across layers (collective: EP groups for the
    weights, the whole world for the router margin, whose sums cover every training forward since
    the previous call)."""
    from ds_upcycle.upcycle import expert_parallel_rank

    reference = DenseReference(model_path, moe.granularity)
    ep_rank = expert_parallel_rank(moe.ep_size)
    margins = _all_reduce(torch.stack([block.pop_margin() for _, block in blocks]).cpu())
    out: dict[str, float] = {}
    per_layer = []
    for j, (layer, block) in enumerate(blocks):
        stats = layer_health(block, layer, reference, ep_rank)
        if margins[j, 1] > 0:
            stats["router_margin"] = float(margins[j, 0] / margins[j, 1])
        out.update({f"health/layer_{layer:02d}/{k}": v for k, v in stats.items()})
        per_layer.append(stats)
    for key, reduce in (("dense_sim_mean", _mean), ("dense_sim_min", min), ("expert_sim_mean", _mean),
                        ("router_margin", _mean)):  # fmt: skip
        values = [s[key] for s in per_layer if key in s]
        if values:
            out[f"health/{key}"] = reduce(values)
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


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


def datasheet_tflops(device: torch.device) -> tuple[float, str] | None:
    """(dense bf16 peak TFLOP/s from the vendor's datasheet, "table:NAME"), or None when the
    device is not in PEAK_TFLOPS (CPUs, unknown GPUs)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value, f"table:{key}"
    return None


def peak_tflops(device: torch.device, dtype: torch.dtype, configured: float) -> tuple[float, str]:
    """(peak TFLOP/s per device, where it came from): config > datasheet table > measured."""
    if configured > 0:
        return configured, "config"
    return datasheet_tflops(device) or (measured_matmul_tflops(device, dtype), "measured")


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


def wandb_logged_in() -> bool:
    """An API key is configured (the environment, or the netrc `wandb login` writes)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_mode(setting: str) -> str:
    """ "auto" -> online when an API key is configured (env or netrc), else offline."""
    if setting != "auto":
        return setting
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if wandb_logged_in() else "offline"


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
            try:
                self.run.log(payload, step=step)
            except Exception as e:  # e.g. its service process was signalled (deepspeed launch.py's
                # terminate_process_tree signals a rank's children too); metrics.jsonl keeps everything
                log.warning(
                    "W&B failed (%s: %s); logging to metrics.jsonl only from step %d", type(e).__name__, e, step
                )
                self.run = None

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
                try:
                    self.run.finish()
                except Exception as e:  # as in log(): the run's files are on disk; metrics.jsonl is complete
                    log.warning("W&B finish failed (%s: %s)", type(e).__name__, e)


def _run_id(out_dir: Path) -> str:
    """The W&B run id of this run folder, made at its first start and kept in the folder: a resumed
    run continues the same W&B run, a new run in the folder (train.overwrite moves the old one
    aside, id file included) starts a new one."""
    import uuid

    path = out_dir / "wandb_run_id"
    if not path.is_file():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


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
