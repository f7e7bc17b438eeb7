"""`ds-upcycle check`: prove that upcycling preserves the dense model's function at step 0.

Runs in one process (ep_size 1) or under the launcher, one process per expert-parallel rank:

    ds-upcycle check --tiny gqa --num-experts 8 --top-k 2
    deepspeed --num_gpus 2 --no_ssh_check --master_addr 127.0.0.1 \
        -m ds_upcycle.parity --tiny gqa --ep-size 2 --json out.json

Each rank builds the same dense model (same seed or same folder), records its logits, upcycles
itself in place (building only its local experts), and compares. It also checks that every rank
holds the same router. Exit code 0 when max |logits difference| <= --tolerance, else 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ds_upcycle.config import MoEConfig
from ds_upcycle.distributed import init_distributed, shutdown_distributed, strip_local_rank
from ds_upcycle.tiny import VARIANTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds-upcycle check",
        description="Upcycle a dense model and check that its logits equal the dense model's "
        "(step-0 function preservation). Exit 0 on parity, 1 otherwise.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="dense HF checkpoint folder (default: a tiny random Llama)")
    src.add_argument("--tiny", default="gqa", choices=sorted(VARIANTS), help="tiny random Llama variant (default: gqa)")
    p.add_argument("--num-experts", type=int, default=8, help="experts per MoE layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size; launch that many ranks (default 1)")
    p.add_argument(
        "--drop-tokens", action="store_true", help="capacity-limited routing (not exact; a negative control)"
    )
    p.add_argument(
        "--capacity-factor", type=float, default=1.0, help="eval capacity factor with --drop-tokens (default 1.0)"
    )
    p.add_argument("--min-capacity", type=int, default=4, help="minimum capacity with --drop-tokens (default 4)")
    p.add_argument("--moe-layers", default="all", help='"all", "every_K" or a JSON list of indices (default all)')
    p.add_argument("--seq-len", type=int, default=32, help="tokens per sequence of the probe batch (default 32)")
    p.add_argument("--batch", type=int, default=2, help="sequences in the probe batch (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for the tiny model and the probe batch (default 0)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max |delta logits| for a pass (default 1e-5)")
    p.add_argument("--json", help="write the result (rank 0's view) as JSON to this file")
    return p


def _moe_layers_arg(text: str):
    return json.loads(text) if text.strip().startswith("[") else text


def run_check(args: argparse.Namespace) -> dict:
    from ds_upcycle.loading import load_dense_model
    from ds_upcycle.moe import attach_process_groups, moe_blocks
    from ds_upcycle.upcycle import upcycle

    rank, world = init_distributed()
    cfg = MoEConfig(
        num_experts=args.num_experts,
        top_k=args.top_k,
        ep_size=args.ep_size,
        drop_tokens=args.drop_tokens,
        capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.capacity_factor,
        min_capacity=args.min_capacity,
        moe_layers=_moe_layers_arg(args.moe_layers),
    )
    if world % cfg.ep_size != 0:
        raise ValueError(
            f"world size ({world}) must be divisible by --ep-size ({cfg.ep_size}); launch {cfg.ep_size} ranks"
        )
    torch.manual_seed(args.seed)
    if args.model:
        model = load_dense_model(args.model, field="--model")
        source = args.model
    else:
        from transformers import LlamaForCausalLM

        from ds_upcycle.tiny import tiny_llama_config

        model = LlamaForCausalLM(tiny_llama_config(args.tiny)).eval()
        source = f"tiny:{args.tiny}"
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=gen)
    with torch.no_grad():
        dense = model(ids).logits
    upcycle(model, cfg)
    attach_process_groups(model)
    model.eval()
    with torch.no_grad():
        moe = model(ids).logits
    diff = (moe - dense).abs().max().item()

    blocks = moe_blocks(model)
    routers = torch.stack([b.gate_weight.detach().float() for _, b in blocks])
    router_equal = True
    if world > 1:
        gathered = [torch.empty_like(routers) for _ in range(world)]
        torch.distributed.all_gather(gathered, routers)
        router_equal = all(torch.equal(g, gathered[0]) for g in gathered)
        worst = torch.tensor([diff])
        torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
        diff = worst.item()
    return {
        "source": source,
        "world_size": world,
        "rank": rank,
        "num_experts": cfg.num_experts,
        "top_k": cfg.top_k,
        "ep_size": cfg.ep_size,
        "drop_tokens": cfg.drop_tokens,
        "moe_layers": [i for i, _ in blocks],
        "local_experts_per_layer": len(blocks[0][1].local_experts),
        "max_abs_diff": diff,
        "router_identical_across_ranks": router_equal,
        "tolerance": args.tolerance,
        "passed": diff <= args.tolerance and router_equal,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(strip_local_rank(sys.argv[1:] if argv is None else argv))
    try:
        result = run_check(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result["rank"] == 0:
        verdict = "PASS" if result["passed"] else "FAIL"
        print(
            f"{verdict}: {result['source']} -> {result['num_experts']} experts top-{result['top_k']}, "
            f"ep {result['ep_size']} on {result['world_size']} rank(s), MoE layers {result['moe_layers']}: "
            f"max |dense - moe| logits = {result['max_abs_diff']:.3e} (tolerance {result['tolerance']:.0e}); "
            f"router identical on all ranks: {result['router_identical_across_ranks']}"
        )
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
    shutdown_distributed()
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
