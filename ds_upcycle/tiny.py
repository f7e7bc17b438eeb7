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
}
"""Each variant exercises one thing export/upcycling can get wrong: GQA, tied embeddings,
rope_scaling, and head_dim != hidden / heads."""


def tiny_llama_config(variant: str = "gqa", **overrides) -> LlamaConfig:
    if variant not in VARIANTS:
        raise ValueError(f"tiny variant ({variant!r}) must be one of {', '.join(VARIANTS)}")
    return LlamaConfig(**{**_BASE, **VARIANTS[variant], **overrides})
