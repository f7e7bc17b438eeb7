"""Save and resume, atomically.

A checkpoint is DeepSpeed's native folder ``<root>/<tag>/`` (model states, one file per MoE
layer and global expert, ZeRO optimizer shards) plus ours:

- ``ds_upcycle_rank{R}.pt``: each rank's RNG states (tensors only);
- ``ds_upcycle_state.json``: step, data position, resolved config, MoE layout;
- ``ds_upcycle_manifest.json``: every file of the folder with its size and SHA-256.

Only after every rank has finished writing does rank 0 write the manifest and then replace
``<root>/latest_complete`` (tmp file + rename). An interrupted save therefore never becomes
what the next run loads, and a truncated or altered file is caught by the manifest before
anything is deserialised. A shared filesystem across nodes is assumed, as DeepSpeed does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest_complete"
STATE = "ds_upcycle_state.json"
MANIFEST = "ds_upcycle_manifest.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, root: Path, step: int, state: dict, rank: int, crash_before_commit: bool = False) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    crash_before_commit (a debug hook for tests) kills rank 0 after the files are written and
    before the manifest and the latest pointer: what a save interrupted midway leaves behind.
    """
    tag = tag_for(step)
    folder = root / tag
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"ds_upcycle_rank{rank:05d}.pt")
    _barrier()  # every rank's files are on disk
    if crash_before_commit and rank == 0:
        os._exit(17)
    if rank == 0:
        atomic_write_text(folder / STATE, json.dumps({"step": step, **state}, indent=2))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write_text(root / LATEST, tag)
    _barrier()
    return folder


def latest_tag(root: Path) -> str | None:
    p = root / LATEST
    return p.read_text().strip() if p.is_file() else None


def verify(folder: Path) -> dict:
    """Check every file against the manifest; ValueError names the first bad file. Returns the
    saved state."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {folder} has no {MANIFEST}: the save did not complete; delete the folder")
    manifest = json.loads(manifest_path.read_text())
    for rel, meta in manifest.items():
        p = folder / rel
        if not p.is_file():
            raise ValueError(f"checkpoint file {p} is missing; the checkpoint is incomplete")
        if p.stat().st_size != meta["bytes"]:
            raise ValueError(
                f"checkpoint file {p} is truncated or altered ({p.stat().st_size} bytes, expected {meta['bytes']}); "
                "restore it or delete the checkpoint folder"
            )
        if _sha256(p) != meta["sha256"]:
            raise ValueError(
                f"checkpoint file {p} is corrupted (SHA-256 mismatch); restore it or delete the checkpoint folder"
            )
    return json.loads((folder / STATE).read_text())


def _deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed 0.19 pickles into ZeRO-1/2 checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def check_safe_to_unpickle(folder: Path) -> None:
    """Load every .pt file with ``weights_only=True`` and only DeepSpeed's three known classes
    allowed, before DeepSpeed's own loader (which uses ``weights_only=False``,
    deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py) touches them. A file that needs
    anything else is refused, so an arbitrary pickle is never unpickled."""
    allowed = _deepspeed_safe_globals()
    for f in sorted(folder.glob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler raises several types; all mean "not safe"
            raise ValueError(
                f"checkpoint file {f} holds objects outside the safe allow-list ({type(e).__name__}); "
                "refusing to unpickle it. Only resume from checkpoints this tool wrote"
            ) from None


def load(engine, root: Path, rank: int) -> dict | None:
    """Collective: resume from ``root``'s latest complete checkpoint. Returns its state, or None
    when there is none yet (a fresh start)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    folder = root / tag
    state = verify(folder)
    check_safe_to_unpickle(folder)
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True, load_module_strict=True
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {folder}")
    rng_file = folder / f"ds_upcycle_rank{rank:05d}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state
