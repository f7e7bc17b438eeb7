"""Loading dense HF checkpoints and their tokenizers, with errors that say what to fix; the dtype table."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The one dtype table: our short names (configs, flags) -> torch dtypes."""
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
"""torch dtype -> the name HF config.json files use."""


def short_dtype_name(hf_name: object) -> str:
    """An HF config's ``dtype``/``torch_dtype`` (a string or torch dtype) -> our short name (fp32 default)."""
    by_name = {v: k for k, v in HF_DTYPE_NAMES.items()}
    dtype = by_name.get(str(hf_name).replace("torch.", ""), hf_name)
    return {v: k for k, v in DTYPES.items()}.get(dtype, "fp32")


def check_model_dir(path: str | Path, field: str = "model.path") -> Path:
    """A readable HF model folder with a config.json, or ValueError naming the field."""
    p = Path(path)
    if not str(path):
        raise ValueError(f"{field} is empty; give a dense HF checkpoint folder (with config.json)")
    if not p.is_dir():
        raise ValueError(f"{field} ({str(path)!r}) is not a folder; give a dense HF checkpoint folder")
    if not (p / "config.json").is_file():
        raise ValueError(f"{field} ({str(path)!r}) has no config.json; give an HF checkpoint folder")
    return p


def load_hf_config(path: str | Path, field: str = "model.path"):
    """The HF config of a model folder (or of a config.json file itself), or ValueError naming the
    field when it is not one."""
    from transformers import AutoConfig

    as_file = Path(path).is_file() and Path(path).suffix == ".json"
    file = Path(path) if as_file else check_model_dir(path, field) / "config.json"
    try:
        raw = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{field} ({str(path)!r}): config.json is not valid JSON ({e}); restore the file") from None
    if not isinstance(raw, dict) or "model_type" not in raw:
        raise ValueError(f"{field} ({str(path)!r}): config.json has no model_type; it is not an HF model config")
    try:
        return AutoConfig.for_model(**raw) if as_file else AutoConfig.from_pretrained(str(file.parent))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{field} ({str(path)!r}): config.json cannot be loaded by transformers: {e}") from None


SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_sizes(hf, field: str) -> None:
    """The sizes a model config must have for the MoE arithmetic to make sense."""
    for name in SIZE_FIELDS:
        value = getattr(hf, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{field}: config.json {name} ({value!r}) must be a positive integer")
    heads, kv = hf.num_attention_heads, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    if not isinstance(kv, int) or kv < 1 or heads % kv:
        raise ValueError(f"{field}: config.json num_key_value_heads ({kv!r}) must divide num_attention_heads ({heads})")
    if getattr(hf, "head_dim", None) is None and hf.hidden_size % heads:
        raise ValueError(
            f"{field}: config.json hidden_size ({hf.hidden_size}) is not divisible by num_attention_heads ({heads}) "
            "and no head_dim is given"
        )


def check_safetensors_headers(folder: Path, field: str) -> None:
    """Every *.safetensors file's header parses and its tensors fit in the file: a truncated or
    corrupt file is named before any rank starts (reads headers only, not weights)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(
            f"{field} ({str(folder)!r}) has no *.safetensors weights; re-save the model with "
            "save_pretrained(..., safe_serialization=True) (pickled .bin weights are not loaded)"
        )
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as h:
                (n,) = struct.unpack("<Q", h.read(8))
                if n > size - 8:
                    raise ValueError("header longer than the file")
                header = json.loads(h.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
            raise ValueError(
                f"{field}: {f} is not a readable safetensors file ({e}); restore or re-download it"
            ) from None
        if 8 + n + end > size:
            raise ValueError(
                f"{field}: {f} is truncated ({size} bytes, its header needs {8 + n + end}); restore or re-download it"
            )


def check_tokenizer(folder: Path, vocab_size: int, field: str) -> None:
    """A tokenizer is present, loads, and has no ids beyond the model's embedding table."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise ValueError(f"{field} ({str(folder)!r}) has no tokenizer (tokenizer.json or tokenizer.model); add one")
    try:
        n = len(load_tokenizer(folder))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"{field} ({str(folder)!r}): the tokenizer does not load ({e})") from None
    if n > vocab_size:
        raise ValueError(
            f"{field}: the tokenizer has {n} tokens but config.json vocab_size is {vocab_size}; ids beyond it would "
            "index past the embedding table. Use the model's own tokenizer"
        )


def load_dense_model(path: str | Path, dtype: str = "fp32", field: str = "model.path") -> nn.Module:
    """Load a dense causal LM from an HF folder (weights via safetensors only)."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, field)
    check_safetensors_headers(p, field)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=DTYPES[dtype], use_safetensors=True)
    return model.eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
