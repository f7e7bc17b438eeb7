"""Loading dense HF checkpoints and their tokenizers, with errors that say what to fix; the dtype table."""

from __future__ import annotations

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
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(check_model_dir(path, field)))


def load_dense_model(path: str | Path, dtype: str = "fp32", field: str = "model.path") -> nn.Module:
    """Load a dense causal LM from an HF folder (weights via safetensors only)."""
    from transformers import AutoModelForCausalLM

    p = check_model_dir(path, field)
    if not list(p.glob("*.safetensors")):
        raise ValueError(
            f"{field} ({str(path)!r}) has no *.safetensors weights; re-save the model with "
            "save_pretrained(..., safe_serialization=True) (pickled .bin weights are not loaded)"
        )
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=DTYPES[dtype], use_safetensors=True)
    return model.eval()


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
