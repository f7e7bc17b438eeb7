"""The `ds-upcycle` console script: one subcommand per job, each a plain ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

# name -> (module, one-line help). Modules are imported lazily so `--help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("ds_upcycle.cli", "dense -> MoE parameters, FLOPs and per-rank memory, from config.json alone"),
    "check": ("ds_upcycle.parity", "upcycle a model and prove its logits equal the dense model's"),
    "train": ("ds_upcycle.train", "validate a ds_configs run and start it through the deepspeed launcher"),
    "export": ("ds_upcycle.export", "a DeepSpeed checkpoint of ours -> a standard HF Mixtral folder"),
    "upcycle": ("ds_upcycle.export", "offline: dense HF checkpoint -> HF Mixtral checkpoint, streamed"),
    "eval": ("ds_upcycle.evaluate", "held-out perplexity of a dense model, an exported Mixtral, or a checkpoint"),
    "ablate": ("ds_upcycle.ablate", "run several configs on the same data and seed and compare them"),
    "bench": ("ds_upcycle.bench", "benchmarks: speed and memory, as a Markdown table and JSON"),
    "make-tiny": ("ds_upcycle.tiny", "write a tiny Llama checkpoint and corpus for the CPU debug config"),
    "demo": ("ds_upcycle.demo", "the main job on the embedded default"),
}

USAGE = """usage: ds-upcycle <command> [options]

Upcycle dense Llama-family checkpoints into DeepSpeed Mixture-of-Experts models.

commands:
{commands}

Run `ds-upcycle <command> --help` for a command's options.
"""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, f"{name.replace('-', '_')}_main", None) or module.main
    return entry(rest)


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _count(n: float) -> str:
    return f"{n / 1e9:,.3f} B" if n >= 1e8 else f"{n / 1e6:,.3f} M"


def plan_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ds-upcycle plan",
        description="Read a dense checkpoint's config.json (no weights) and print the dense -> MoE "
        "table: total and active parameters, training FLOPs per token (Megatron's formula), and "
        "per-rank parameter and Adam-state memory under ZeRO at the given layout. Validates the "
        "combination before anyone launches a job.",
    )
    p.add_argument("model", help="dense HF checkpoint folder, or a config.json file")
    p.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size (default 1)")
    p.add_argument("--world-size", type=int, default=None, help="total ranks (default: ep-size)")
    p.add_argument("--moe-layers", default="all", help='"all", "every_K" or a JSON list (default all)')
    p.add_argument("--seq-len", type=int, default=4096, help="sequence length for FLOPs (default 4096)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="training dtype (default bf16)")
    p.add_argument("--zero-stage", type=int, default=1, choices=[0, 1, 2], help="ZeRO stage (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)

    from pathlib import Path

    from transformers import AutoConfig

    from ds_upcycle.config import MoEConfig
    from ds_upcycle.plan import make_plan

    try:
        src = Path(args.model)
        if src.is_file():
            hf = AutoConfig.for_model(**json.loads(src.read_text()))
        else:
            from ds_upcycle.loading import load_hf_config

            hf = load_hf_config(args.model, field="model")
        layers = json.loads(args.moe_layers) if args.moe_layers.strip().startswith("[") else args.moe_layers
        moe = MoEConfig(num_experts=args.num_experts, top_k=args.top_k, ep_size=args.ep_size, moe_layers=layers)
        plan = make_plan(hf, moe, args.world_size or args.ep_size, args.seq_len, args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = plan.to_dict(args.zero_stage)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    s = plan.shape
    dense = d["dense_total_params"]
    print(
        f"{args.model}: hidden {s.hidden}, intermediate {s.intermediate}, {s.layers} layers, "
        f"{s.heads} heads ({s.kv_heads} KV, head_dim {s.head_dim}), vocab {s.vocab}, tied {s.tied}"
    )
    print(
        f"MoE: {plan.num_experts} experts, top-{plan.top_k}, on {len(plan.moe_layers)}/{s.layers} layers; "
        f"ep {plan.ep_size}, world {plan.world_size}, ZeRO-{args.zero_stage}, {plan.dtype}, seq {plan.seq_len}\n"
    )
    rows = [
        ("total parameters", _count(dense), _count(d["moe_total_params"])),
        ("active parameters / token", _count(dense), _count(d["moe_active_params"])),
        (
            "training FLOPs / token",
            f"{d['dense_train_flops_per_token'] / 1e9:,.2f} GFLOP",
            f"{d['moe_train_flops_per_token'] / 1e9:,.2f} GFLOP",
        ),
        ("parameters per rank", _count(dense), _count(d["params_per_rank"])),
        ("parameter memory per rank", _gib(d["dense_param_bytes_per_rank"]), _gib(d["param_bytes_per_rank"])),
        ("Adam state per rank", _gib(d["dense_adam_bytes_per_rank"]), _gib(d["adam_bytes_per_rank"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    print(f"| {'':{w0}} | {'dense':>14} | {'MoE':>14} |")
    print(f"|{'-' * (w0 + 2)}|{'-' * 16}|{'-' * 16}|")
    for name, a, b in rows:
        print(f"| {name:{w0}} | {a:>14} | {b:>14} |")
    ratio = d["moe_train_flops_per_token"] / d["dense_train_flops_per_token"]
    print(
        f"\nMoE/dense FLOPs per token: {ratio:.2f}x; total/active parameters: "
        f"{d['moe_total_params'] / d['moe_active_params']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
