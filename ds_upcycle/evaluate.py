"""`ds-upcycle eval`: held-out perplexity of a dense model, an exported Mixtral, or a checkpoint of ours.

For benchmark tasks on an exported folder, lm-evaluation-harness loads it like any HF model
(the paper's MMLU 0-shot):

    pip install -e ".[lm-eval]"
    lm_eval --model hf --model_args pretrained=runs/export,dtype=bfloat16 --tasks mmlu --num_fewshot 0
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch


def load_for_eval(path: str | Path, source: str | None = None):
    """(model, tokenizer source folder, kind) for any of the three model kinds."""
    from ds_upcycle import checkpoint
    from ds_upcycle.loading import load_dense_model

    p = Path(path)
    if p.is_dir() and checkpoint.is_checkpoint(p):
        from ds_upcycle.distributed import init_distributed
        from ds_upcycle.moe import attach_process_groups

        init_distributed()
        model, _, src = checkpoint.load_moe_model(p, source=source)
        attach_process_groups(model)
        return model, src, "ds_upcycle checkpoint"
    model = load_dense_model(p, "fp32", field="model")
    return model, p, type(model).__name__


@torch.no_grad()
def perplexity(model, blocks, batch: int, max_batches: int) -> dict:
    """Mean token loss over packed blocks (each predicts L-1 tokens) and its exponential."""
    total, count = 0.0, 0
    n = min(len(blocks), batch * max_batches) if max_batches else len(blocks)
    for i in range(0, n, batch):
        ids = torch.from_numpy(blocks[i : i + batch].astype("int64"))
        loss = model(input_ids=ids, labels=ids).loss
        tokens = ids.numel() - ids.shape[0]
        total += loss.item() * tokens
        count += tokens
    return {"loss": total / count, "ppl": math.exp(total / count), "tokens": count, "blocks": n}


def main(argv: list[str] | None = None) -> int:
    from ds_upcycle.config import DataConfig
    from ds_upcycle.data import expand_paths, load_blocks
    from ds_upcycle.loading import load_tokenizer

    p = argparse.ArgumentParser(
        prog="ds-upcycle eval",
        description="Held-out perplexity of a dense HF model, an exported HF Mixtral, or a ds_upcycle checkpoint "
        "(a run folder, its checkpoints/, or a step folder), on local text files. For lm-evaluation-harness "
        'tasks on an exported folder: pip install -e ".[lm-eval]", then lm_eval --model hf --model_args '
        "pretrained=OUT --tasks mmlu --num_fewshot 0.",
    )
    p.add_argument("model", help="HF model folder or ds_upcycle checkpoint")
    p.add_argument(
        "--data", nargs="+", required=True, help="held-out files (.txt/.jsonl/.json/.parquet; globs allowed)"
    )
    p.add_argument("--text-field", default="text", help="text column of .jsonl/.json/.parquet files (default text)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--batch", type=int, default=4, help="blocks per forward (default 4)")
    p.add_argument("--max-batches", type=int, default=0, help="stop after this many batches (default: all)")
    p.add_argument("--source", default=None, help="dense source folder for a checkpoint (default: the recorded one)")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    args = p.parse_args(argv)
    for flag, value, low in (
        ("--seq-len", args.seq_len, 2),
        ("--batch", args.batch, 1),
        ("--max-batches", args.max_batches, 0),
    ):
        if value < low:
            raise ValueError(f"{flag} ({value}) must be >= {low}")
    expand_paths(args.data, "--data")
    model, tok_dir, kind = load_for_eval(args.model, args.source)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and args.seq_len > max_pos:
        raise ValueError(f"--seq-len ({args.seq_len}) is above the model's max_position_embeddings ({max_pos})")
    tokenizer = load_tokenizer(tok_dir)
    cfg = DataConfig(seq_len=args.seq_len, text_field=args.text_field)
    blocks, _ = load_blocks(args.data, "--data", tokenizer, cfg, Path(args.model) / ".eval_cache", is_writer=False)
    result = {"model": str(args.model), "kind": kind, **perplexity(model, blocks, args.batch, args.max_batches)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
