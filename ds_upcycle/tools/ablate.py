"""`ds-upcycle ablate A.json B.json ...`: run configs on the same data and seed, compare them.

Each run goes to <out>/<config name>/, all W&B runs share one group, and each run's notes hold
its resolved-config difference from the first. The comparison is written as ablation.md and
ablation.csv: final train loss, held-out loss, tokens/s, MFU, worst max/mean expert load.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

RUN_KEYS = {"ds_upcycle.train.output_dir", "ds_upcycle.log.name"}
"""Settings that differ between ablation runs by construction, left out of the recorded diff."""

COLUMNS = [
    ("config", "config"),
    ("final_train_loss", "final train loss"),
    ("eval_loss_end", "held-out loss"),
    ("tokens_per_s", "tokens/s"),
    ("mfu", "MFU"),
    ("max_over_mean", "max/mean load"),
]


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


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return "" if v is None else str(v)


def write_table(rows: list[dict], out: Path) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = [header, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(md)
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([k for k, _ in COLUMNS])
        for r in rows:
            w.writerow([r.get(k) for k, _ in COLUMNS])
    return md


def main(argv: list[str] | None = None) -> int:
    from ds_upcycle.config import load_run_config
    from ds_upcycle.launch import run_training, world_size
    from ds_upcycle.preflight import validate

    p = argparse.ArgumentParser(
        prog="ds-upcycle ablate",
        description="Train each config with the same data and seed, one after another, through the deepspeed "
        "launcher; write a comparison table (Markdown and CSV) of final train loss, held-out loss, tokens/s, "
        "MFU and worst max/mean expert load. Extra --section.key=value arguments apply to every run.",
    )
    p.add_argument(
        "configs", nargs="+", help="config files or shipped config names to compare (the first is the baseline)"
    )
    p.add_argument("--out", default="runs/ablation", help="folder for the runs and the table (default runs/ablation)")
    p.add_argument("--name", default="", help="W&B group (default: the --out folder's name)")
    p.add_argument("--num-gpus", type=int, default=None, help="ranks on this machine (default 1)")
    p.add_argument("--hostfile", default=None, help="DeepSpeed hostfile (see hostfiles/)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port")
    args, overrides = p.parse_known_args(argv)
    out = Path(args.out)
    group = args.name or out.name
    names = [Path(c).stem for c in args.configs]
    if len(set(names)) != len(names):
        raise ValueError(f"config names must differ (they name the run folders): {names}")
    seed = load_run_config(args.configs[0], overrides).train.seed
    world = world_size(args.num_gpus, args.hostfile)
    plans = []
    for config, name in zip(args.configs, names, strict=True):
        run_overrides = [*overrides, f"--train.seed={seed}", f"--train.output_dir={out / name}",
                         f"--log.group={group}", f"--log.name={name}"]  # fmt: skip
        cfg = load_run_config(config, run_overrides)
        validate(cfg, world)
        plans.append((config, name, run_overrides, cfg.to_dict()))
    base = plans[0][3]
    for i, (config, name, run_overrides, resolved) in enumerate(plans):
        diff = {k: v for k, v in config_diff(base, resolved).items() if k not in RUN_KEYS}
        run_overrides.append(f"--log.notes=config difference from {names[0]}: {json.dumps(diff)}")
        plans[i] = (config, name, run_overrides, diff)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for config, name, run_overrides, diff in plans:
        print(f"[ablate] {name}: {config} (differs from {names[0]} in {len(diff)} settings)", flush=True)
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "config_diff.json").write_text(json.dumps(diff, indent=2))
        result = run_training(config, run_overrides, num_gpus=args.num_gpus, hostfile=args.hostfile,
                              master_port=args.master_port)  # fmt: skip
        if result.returncode != 0:
            print(f"error: run {name} failed (exit {result.returncode}); see its output above", file=sys.stderr)
            return result.returncode
        rows.append({"config": name, **result.summary})
    print(write_table(rows, out))
    print(f"[ablate] table: {out / 'ablation.md'} and {out / 'ablation.csv'}")
    return 0


if __name__ == "__main__":
    from ds_upcycle.errors import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
