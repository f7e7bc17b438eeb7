"""`ds-upcycle ablate A.json B.json ...`: run configs on the same data and seed, compare them.

Each run goes to <out>/<config name>/, all W&B runs share one group, and each run's notes hold
its resolved-config difference from the first. Written into <out>:

- ablation.md / ablation.csv: final train loss (mean of the last steps), held-out loss, tokens/s,
  MFU, router balance (worst max/mean load), expert-dense and expert-expert similarity, router margin;
- heldout_loss.png (held-out loss curves of every run) and dense_similarity.png (mean
  expert-dense cosine similarity over steps);
- with --replicates N, the first config again under N other seeds (train.seed and moe.seed): the
  seed-to-seed spread of the held-out loss, against which the table marks each difference from
  the first config as within noise or not;
- wandb_workspace.json: the group's W&B workspace (tools/workspace.py), saved to W&B when online.

--report-only rebuilds these from the runs already in <out>; --drop-checkpoints deletes each run's
checkpoints once it has finished (the table needs only its metrics).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

RUN_KEYS = {"ds_upcycle.train.output_dir", "ds_upcycle.log.name"}
"""Settings that differ between ablation runs by construction, left out of the recorded diff."""

TRAIN_WINDOW = 5
"""Final train loss = the mean over this many last logged steps (one step's loss is noisy)."""

COLUMNS = [
    ("config", "config"),
    ("final_train_loss", "final train loss"),
    ("eval_loss_end", "held-out loss"),
    ("delta_eval", "vs first"),
    ("within_noise", "within noise?"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("max_over_mean", "max/mean load"),
    ("dense_sim", "expert-dense sim"),
    ("expert_sim", "expert-expert sim"),
    ("router_margin", "router margin"),
]
PRECISE = {"dense_sim", "expert_sim", "router_margin"}
"""Columns shown to 6 decimals: similarities move in the 4th decimal over a short run."""


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(base: dict, other: dict) -> dict:
    """{key: [base value, other value]} for every flattened key that differs."""
    a, b = flatten(base), flatten(other)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _fmt(v, precise: bool = False) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.6f}" if precise else f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of every row that logged ``key``."""
    return [(r["step"], r[key]) for r in rows if key in r]


def run_row(name: str, run: Path, summary: dict) -> dict:
    """One table row: the run's summary plus what its metrics.jsonl says about its last steps."""
    rows = read_metrics(run)
    train = [v for _, v in series(rows, "loss/lm")][-TRAIN_WINDOW:]
    last = {key: (series(rows, key) or [(0, None)])[-1][1]
            for key in ("health/dense_sim_mean", "health/expert_sim_mean", "health/router_margin")}  # fmt: skip
    return {
        **summary, "config": name,
        "final_train_loss": sum(train) / len(train) if train else summary.get("final_train_loss"),
        "train_loss_step_std": _std(train),
        "dense_sim": last["health/dense_sim_mean"], "expert_sim": last["health/expert_sim_mean"],
        "router_margin": last["health/router_margin"],
    }  # fmt: skip


def _std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def seed_noise(rows: list[dict], replicates: list[dict]) -> float | None:
    """The held-out loss's seed-to-seed standard deviation: over the first config and its
    replicates (None without replicates)."""
    values = [r["eval_loss_end"] for r in [rows[0], *replicates]]
    return _std(values)


def mark_noise(rows: list[dict], noise: float | None) -> None:
    """Each row's held-out difference from the first, and whether it is within 2 seed-to-seed
    standard deviations of the difference of two runs (sqrt(2) x the per-run std)."""
    for r in rows:
        r["delta_eval"] = r["eval_loss_end"] - rows[0]["eval_loss_end"]
        if noise is not None and r is not rows[0]:
            r["within_noise"] = abs(r["delta_eval"]) <= 2 * math.sqrt(2) * noise


def write_table(rows: list[dict], out: Path, noise: float | None = None, train_noise: float | None = None) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(k), k in PRECISE) for k, _ in COLUMNS) + " |" for r in rows]
    lines += ["", noise_note(rows, noise, train_noise)]
    md = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(md)
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in COLUMNS])
        for r in rows:
            w.writerow([r.get(k) for k, _ in COLUMNS])
    return md


def noise_note(rows: list[dict], noise: float | None, train_noise: float | None) -> str:
    if noise is None:
        return ("No seed replicates (--replicates 0): the table cannot say which differences are within noise; "
                "differences below the train loss's step-to-step std are not meaningful.")  # fmt: skip
    within = [r["config"] for r in rows[1:] if r.get("within_noise")]
    beyond = [r["config"] for r in rows[1:] if r.get("within_noise") is False]
    step = (
        f" The train loss moves by {train_noise:.4f} (std) from step to step over the last steps."
        if train_noise
        else ""
    )
    return (
        f"Noise at this budget: the held-out loss of {rows[0]['config']} varies by {noise:.4f} (std) from seed to seed, "
        f"so a difference from it below {2 * math.sqrt(2) * noise:.4f} (2 std of a difference) is within noise.{step} "
        f"Within noise: {', '.join(within) or 'none'}. Beyond noise: {', '.join(beyond) or 'none'}."
    )


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def _lines(ax, runs: dict[str, Path], key: str, transform=lambda step, v: v) -> None:
    for name, run in runs.items():
        points = [(step, transform(step, v)) for step, v in series(read_metrics(run), key)]
        if points:
            ax.plot(*zip(*points, strict=True), "--" if "_seed" in name else "-", marker="o", ms=3, label=name)


def _figure(ncols: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)


def plot_heldout(runs: dict[str, Path], path: Path) -> Path:
    """Held-out loss of every run over steps; right, the difference from the first run on a
    symmetric-log axis, so small gaps stay visible next to large ones."""
    plt, fig, axes = _figure(2)
    _lines(axes[0, 0], runs, "eval/loss")
    base = dict(series(read_metrics(next(iter(runs.values()))), "eval/loss"))
    _lines(axes[0, 1], runs, "eval/loss", lambda step, v: v - base.get(step, float("nan")))
    axes[0, 1].set_yscale("symlog", linthresh=1e-3)
    axes[0, 0].set_ylabel("held-out loss (nats/token)")
    axes[0, 1].set_ylabel(f"held-out loss - {next(iter(runs))}'s (symlog)")
    return _save(plt, fig, axes, "Held-out loss", path)


def plot_dense_similarity(runs: dict[str, Path], path: Path) -> Path:
    """How far the experts moved from the dense MLP: 1 - mean cosine similarity, symmetric-log."""
    plt, fig, axes = _figure(1)
    _lines(axes[0, 0], runs, "health/dense_sim_mean", lambda step, v: 1.0 - v)
    axes[0, 0].set_yscale("symlog", linthresh=1e-6)
    axes[0, 0].set_ylabel("1 - mean expert-dense cosine similarity")
    return _save(plt, fig, axes, "Expert-dense similarity (0 = experts are copies)", path)


def _save(plt, fig, axes, title: str, path: Path) -> Path:
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# The W&B workspace of the group
# --------------------------------------------------------------------------------------------


def workspace_for(out: Path, group: str, runs: dict[str, Path]) -> str:
    """Build the group's workspace from the run configs, check it against what the runs logged,
    write (and, online, save) it. Returns a line for the console."""
    try:
        from ds_upcycle.tools.workspace import build_workspace, write_workspace
    except ImportError:
        return "W&B workspace skipped: pip install wandb-workspaces (the `workspace` extra)"
    from ds_upcycle.config import run_config_from_dict
    from ds_upcycle.loading import load_hf_config

    cfgs = [run_config_from_dict(json.loads((run / "config.json").read_text())) for run in runs.values()]
    depth = load_hf_config(cfgs[0].model.path).num_hidden_layers
    layers = sorted({i for c in cfgs for i in c.moe.layer_indices(depth)})
    health = [c.log.health_every for c in cfgs if c.log.health_every]
    workspace = build_workspace(
        group, layers, max(c.moe.num_experts for c in cfgs), cfgs[0].log.project, health=bool(health),
        margin=any(c.log.health_every and c.train.steps >= c.log.health_every for c in cfgs),
    )  # fmt: skip
    logged = {k for run in runs.values() for row in read_metrics(run) for k in row}
    from ds_upcycle.metrics import wandb_mode

    report = write_workspace(workspace, out, logged, online=wandb_mode(cfgs[0].log.wandb) == "online")
    return f"W&B workspace ({report['panels']} panels, every key logged): {report['url'] or report['spec']}"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from ds_upcycle.launch import add_world_arguments

    p = argparse.ArgumentParser(
        prog="ds-upcycle ablate",
        description="Train each config with the same data and seed, one after another, through the deepspeed "
        "launcher; write a comparison table (Markdown and CSV: final train and held-out loss, tokens/s, MFU, router "
        "balance, expert-dense and expert-expert similarity), plots of held-out loss and expert-dense similarity "
        "over steps, and the group's W&B workspace. Extra --section.key=value arguments apply to every run.",
        epilog="example: ds-upcycle ablate ablations/copy ablations/drop ablations/granular --num-gpus 2 --replicates 1",
    )
    p.add_argument(
        "configs", nargs="+", help="config files or shipped config names to compare (the first is the baseline)"
    )
    p.add_argument("--out", default="runs/ablation", help="folder for the runs and the table (default runs/ablation)")
    p.add_argument("--name", default="", help="W&B group (default: the --out folder's name)")
    add_world_arguments(p)
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port")
    p.add_argument(
        "--replicates", type=int, default=0, help="rerun the first config under N other seeds to measure noise"
    )
    p.add_argument("--overwrite", action="store_true", help="replace run folders an earlier ablation left in --out")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: rebuild table, plots and workspace from --out's runs"
    )
    p.add_argument(
        "--drop-checkpoints", action="store_true", help="delete each run's checkpoints once it has finished (disk)"
    )
    return p


def plan_runs(args, overrides: list[str]) -> list[tuple[str, str, list[str], dict]]:
    """(config, run name, overrides, resolved config) of every run, validated before any starts."""
    from ds_upcycle.config import load_run_config
    from ds_upcycle.launch import world_size
    from ds_upcycle.preflight import validate

    names = [Path(c).stem for c in args.configs]
    if len(set(names)) != len(names):
        raise ValueError(f"config names must differ (they name the run folders): {names}")
    if args.replicates < 0:
        raise ValueError(f"--replicates ({args.replicates}) must be >= 0")
    first = load_run_config(args.configs[0], overrides)
    seed = f"--train.seed={first.train.seed}"  # every config on the first one's data order
    runs = [(c, n, [seed]) for c, n in zip(args.configs, names, strict=True)]
    runs += [(args.configs[0], f"{names[0]}_seed{i}", [f"--train.seed={first.train.seed + i}",
              f"--moe.seed={first.moe.seed + i}"]) for i in range(1, args.replicates + 1)]  # fmt: skip
    out, group, world = Path(args.out), args.name or Path(args.out).name, world_size(args.num_gpus, args.hostfile)
    plans = []
    for config, name, seeds in runs:
        run_overrides = [*overrides, *seeds, f"--train.output_dir={out / name}", f"--log.group={group}",
                         f"--log.name={name}"]  # fmt: skip
        cfg = load_run_config(config, run_overrides)
        # The run folders are fresh_runs' to judge (refused, or replaced with --overwrite): validate
        # everything else, as the run itself will once its folder is empty.
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, overwrite=True)), world)
        plans.append((config, name, run_overrides, cfg.to_dict()))
    base = plans[0][3]
    for i, (config, name, run_overrides, resolved) in enumerate(plans):
        diff = {k: v for k, v in config_diff(base, resolved).items() if k not in RUN_KEYS}
        run_overrides.append(f"--log.notes=config difference from {names[0]}: {json.dumps(diff)}")
        plans[i] = (config, name, run_overrides, diff)
    return plans


def _finished_summary(run: Path) -> dict:
    path = run / "summary.json"
    if not path.is_file():
        raise ValueError(f"--report-only: run {str(run)!r} has no summary.json; run the ablation first")
    return json.loads(path.read_text())


def fresh_runs(out: Path, names: list[str], overwrite: bool) -> None:
    """Empty run folders: a run folder holding an earlier run's metrics would be appended to (and its
    W&B run resumed), so it is replaced with --overwrite and refused otherwise."""
    from ds_upcycle.preflight import RUN_MARKERS

    earlier = [out / n for n in names if any((out / n / m).exists() for m in ("config.json", *RUN_MARKERS))]
    if earlier and not overwrite:
        raise ValueError(
            f"--out ({str(out)!r}) already holds run {earlier[0].name}; pass --overwrite or choose another"
        )
    for run in earlier:
        shutil.rmtree(run)
    out.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    from ds_upcycle.launch import run_training

    t0 = time.time()
    args, overrides = build_parser().parse_known_args(argv)
    out = Path(args.out)
    plans = plan_runs(args, overrides)
    if not args.report_only:
        fresh_runs(out, [name for _, name, _, _ in plans], args.overwrite)
    rows, replicates, runs = [], [], {}
    for config, name, run_overrides, diff in plans:
        if args.report_only:
            summary = _finished_summary(out / name)
        else:
            print(f"[ablate] {name}: {config} (differs from {plans[0][1]} in {len(diff)} settings)", flush=True)
            (out / name).mkdir(parents=True, exist_ok=True)
            (out / name / "config_diff.json").write_text(json.dumps(diff, indent=2))
            result = run_training(config, run_overrides, num_gpus=args.num_gpus, hostfile=args.hostfile,
                                  master_port=args.master_port)  # fmt: skip
            if result.returncode != 0:
                print(f"error: run {name} failed (exit {result.returncode}); see its output above", file=sys.stderr)
                return result.returncode
            summary = result.summary
            if args.drop_checkpoints:
                shutil.rmtree(out / name / "checkpoints", ignore_errors=True)
        runs[name] = out / name
        row = run_row(name, out / name, summary)
        (replicates if name.startswith(f"{plans[0][1]}_seed") else rows).append(row)
    noise = seed_noise(rows, replicates)
    mark_noise(rows, noise)
    print(write_table(rows + replicates, out, noise, rows[0].get("train_loss_step_std")))
    plots = [plot_heldout(runs, out / "heldout_loss.png"), plot_dense_similarity(runs, out / "dense_similarity.png")]
    print(f"[ablate] table: {out / 'ablation.md'} and {out / 'ablation.csv'}; plots: {', '.join(map(str, plots))}")
    print(f"[ablate] {workspace_for(out, args.name or out.name, runs)}")
    wall = time.time() - t0
    if args.report_only:
        return 0
    (out / "ablation.json").write_text(json.dumps({"rows": rows, "replicates": replicates, "seed_noise_std": noise,
                                                   "wall_s": wall}, indent=2))  # fmt: skip
    print(f"[ablate] done in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    from ds_upcycle.errors import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
