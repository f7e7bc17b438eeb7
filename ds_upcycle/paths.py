"""Folders the tool writes never overlap the user's inputs, and are only replaced when they hold
nothing but what the tool itself writes: the rules that keep "nothing the user had is lost" true."""

from __future__ import annotations

import re
from pathlib import Path

MODEL_FOLDER_FILES = {
    "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
}  # fmt: skip
"""What an HF model folder written by `ds-upcycle export`/`upcycle` (save_pretrained) holds."""
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def is_within(path: Path, folder: Path) -> bool:
    """True when ``path`` is ``folder`` or lies inside it (after resolving links)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def check_disjoint(target: Path, target_field: str, source: Path, source_field: str, *, containing: bool) -> None:
    """Refuse a target that is the source or sits inside it (and, with ``containing``, one that
    contains it): writing or replacing it could destroy the source."""
    if is_within(target, source) or (containing and is_within(source, target)):
        where = (
            "is" if target.resolve() == source.resolve() else "is inside" if is_within(target, source) else "contains"
        )
        raise ValueError(
            f"{target_field} ({str(target)!r}) {where} {source_field} ({str(source)!r}); writing there could destroy "
            "it. Choose a folder outside it"
        )


def foreign_entries(folder: Path) -> list[str]:
    """Entries of ``folder`` that an HF model folder written by this tool would not hold."""
    return sorted(
        p.name for p in folder.iterdir() if not (p.is_file() and (p.name in MODEL_FOLDER_FILES or _SHARD.match(p.name)))
    )


def check_replaceable(out: Path, overwrite: bool, flag: str = "--overwrite") -> None:
    """``out`` may be written: missing, empty, or (with ``flag``) an HF model folder and nothing else."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output ({str(out)!r}) is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(
            f"output ({str(out)!r}) holds files this tool did not write ({shown}); choose a new or empty folder "
            f"({flag} only ever replaces a model folder)"
        )
    if not overwrite:
        raise ValueError(f"output ({str(out)!r}) already holds a model; choose another folder or pass {flag}")
