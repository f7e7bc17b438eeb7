"""Tiny, random Llama configs for tests and the quick parity check (no downloads)."""

from __future__ import annotations

from transformers import LlamaConfig

_BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

VARIANTS: dict[str, dict] = {
    "gqa": dict(num_key_value_heads=2),
    "tied": dict(tie_word_embeddings=True),
    "rope_scaling": dict(
        num_key_value_heads=2,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
    "head_dim": dict(head_dim=32, num_key_value_heads=2),  # 4 heads x 32 != hidden 64
    "gqa_tied_rope": dict(  # all three at once, for the costlier (multi-process) checks
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0},
    ),
}
"""Each variant exercises one thing export/upcycling can get wrong: GQA, tied embeddings,
rope_scaling, and head_dim != hidden / heads."""


def tiny_llama_config(variant: str = "gqa", **overrides) -> LlamaConfig:
    if variant not in VARIANTS:
        raise ValueError(f"tiny variant ({variant!r}) must be one of {', '.join(VARIANTS)}")
    return LlamaConfig(**{**_BASE, **VARIANTS[variant], **overrides})


# --------------------------------------------------------------------------------------------
# A complete tiny setup on disk: model folder (safetensors + tokenizer) and a text corpus.
# --------------------------------------------------------------------------------------------

_WORDS = {
    "subject": ["the router", "an expert", "the model", "each rank", "the optimizer", "a token", "the dense layer"],
    "verb": ["sends", "learns", "copies", "balances", "routes", "updates", "measures"],
    "object": ["the tokens", "its weights", "the gradients", "a new expert", "the load", "every batch"],
    "tail": ["quickly.", "in parallel.", "at step zero.", "without loss.", "on every rank.", "again."],
}


def synthetic_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """Short documents from a tiny grammar: learnable in a few steps, so a loss curve means something."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [
            " ".join(rng.choice(_WORDS[k]) for k in ("subject", "verb", "object", "tail")).capitalize()
            for _ in range(rng.randint(2, 5))
        ]
        docs.append(" ".join(sents))
    return docs


def write_tiny_setup(
    out_dir, variant: str = "gqa", n_docs: int = 400, seed: int = 0, num_layers: int = 2, **overrides
) -> dict:
    """Write <out>/model (tiny random Llama + byte-level BPE tokenizer) and <out>/corpus/*.txt.

    Returns the paths. Everything is real: `transformers` loads the model folder, `datasets`
    reads the corpus.
    """
    from pathlib import Path

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    docs = synthetic_corpus(n_docs, seed)
    half = len(docs) * 9 // 10
    (out / "corpus" / "train.txt").write_text("\n\n".join(docs[:half]) + "\n")
    (out / "corpus" / "heldout.txt").write_text("\n\n".join(docs[half:]) + "\n")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(docs, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    model_dir = out / "model"
    fast.save_pretrained(model_dir)

    torch.manual_seed(seed)
    cfg = tiny_llama_config(
        variant,
        vocab_size=len(fast),
        num_hidden_layers=num_layers,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        **overrides,
    )
    LlamaForCausalLM(cfg).save_pretrained(model_dir, safe_serialization=True)
    return {
        "model": str(model_dir),
        "train": str(out / "corpus" / "train.txt"),
        "eval": str(out / "corpus" / "heldout.txt"),
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="ds-upcycle make-tiny",
        description="Write a tiny random Llama checkpoint (safetensors, with a byte-level BPE tokenizer) and a "
        "small synthetic text corpus: what ds_configs/cpu_debug_zero2_ep2.json trains on.",
    )
    p.add_argument(
        "out_dir", nargs="?", default="runs/tiny", help="where to write model/ and corpus/ (default runs/tiny)"
    )
    p.add_argument("--variant", default="gqa", choices=sorted(VARIANTS), help="tiny config variant (default gqa)")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    p.add_argument("--docs", type=int, default=400, help="documents in the corpus (default 400)")
    args = p.parse_args(argv)
    print(json.dumps(write_tiny_setup(args.out_dir, args.variant, args.docs, num_layers=args.layers), indent=2))
    return 0
