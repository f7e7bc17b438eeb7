"""Save and resume, atomically; find, verify and read checkpoints back.

A checkpoint is DeepSpeed's native folder ``<root>/<tag>/`` (model states, one file per MoE
layer and global expert, ZeRO optimizer shards) plus ours:

- ``ds_upcycle_rank{R}.pt``: each rank's RNG states (tensors only);
- ``ds_upcycle_state.json``: step, data position, resolved config, MoE layout;
- ``ds_upcycle_manifest.json``: every file of the folder with its size and SHA-256.

Only after every rank has finished writing does rank 0 write the manifest and then replace
``<root>/latest_complete`` (tmp file + rename). An interrupted save therefore never becomes
what the next run loads, and a truncated or altered file is caught by the manifest before
anything is deserialised. A shared filesystem across nodes is assumed, as DeepSpeed does.

Reading back (export, eval): :func:`resolve` finds the step folder of a run, :func:`read_tensors`
maps every saved tensor to a loader, and :func:`load_moe_model` rebuilds the trained model in one
process whatever ep_size trained it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ds_upcycle.distributed import barrier

log = logging.getLogger("ds_upcycle")

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


def save(engine, root: Path, step: int, state: dict, rank: int, crash_before_commit: bool = False) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    crash_before_commit (a debug hook for tests) kills rank 0 after the files are written and
    before the manifest and the latest pointer: what a save interrupted midway leaves behind.
    """
    tag = tag_for(step)
    folder = root / tag
    if rank == 0:
        _clear_for_save(folder)
    barrier()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, folder / f"ds_upcycle_rank{rank:05d}.pt")
    barrier()  # every rank's files are on disk
    if crash_before_commit and rank == 0:
        os._exit(17)
    if rank == 0:
        atomic_write_text(folder / STATE, json.dumps({"step": step, **state}, indent=2))
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
        manifest = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
        atomic_write_text(root / LATEST, tag)
    barrier()
    return folder


def _clear_for_save(folder: Path) -> None:
    """No save ever writes into a complete checkpoint's folder: a complete one of the same step
    (e.g. left by a save cut off between its manifest and the latest pointer) is moved aside,
    never overwritten; a partial one (no manifest: never loadable) is removed."""
    if (folder / MANIFEST).is_file():
        aside = folder.with_name(f"{folder.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        log.warning("checkpoint %s already existed complete; moved it aside to %s", folder, aside)
    elif folder.exists():
        shutil.rmtree(folder)


def prune(root: Path, keep_last: int) -> list[Path]:
    """Retention, after a complete save: delete the complete checkpoints older than the newest
    ``keep_last`` (0 keeps all). Never deleted: the one ``latest_complete`` names, and any folder
    without a manifest (a save in progress, or one cut off). A folder is first renamed out of the
    ``step_*`` namespace, so a partly deleted one is never taken for a checkpoint; a failed delete is
    a warning, retried at the next save. Returns the folders deleted."""
    if keep_last <= 0:
        return []
    latest = latest_tag(root)
    complete = sorted(
        (p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / MANIFEST).is_file()),
        key=lambda p: p.name,
    )  # step_N.superseded-* folders (moved aside by a save) are the user's to delete
    doomed = [p for p in complete[:-keep_last] if p.name != latest]
    deleted = []
    for folder in doomed:
        trash = root / f".deleting-{folder.name}"
        try:
            folder.rename(trash)
            deleted.append(folder)
        except OSError as e:
            log.warning("retention: could not delete %s (%s); it is kept", folder, e)
    for trash in root.glob(".deleting-step_*"):  # this save's, and any an earlier failure left
        try:
            shutil.rmtree(trash)
        except OSError as e:
            log.warning("retention: could not delete %s (%s); retried after the next save", trash, e)
    return deleted


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


# --------------------------------------------------------------------------------------------
# Reading checkpoints back: export, eval
# --------------------------------------------------------------------------------------------


def resolve(path: str | Path, tag: int | None = None) -> Path:
    """A run folder, its checkpoints/ folder, or one step folder -> the step folder to read."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"checkpoint ({str(path)!r}) is not a folder; give a run folder or its checkpoints/")
    if (p / STATE).is_file() or (p / MANIFEST).is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag is not None:
        folder = root / tag_for(tag)
        if not folder.is_dir():
            have = sorted(q.name for q in root.glob("step_*"))
            raise ValueError(f"--tag {tag}: no {folder}; available: {', '.join(have) or 'none'}")
        return folder
    latest = latest_tag(root)
    if latest is None:
        raise ValueError(f"checkpoint ({str(path)!r}) holds no complete checkpoint (no {LATEST})")
    return root / latest


def is_checkpoint(path: Path) -> bool:
    """True for a run folder with checkpoints, a checkpoints/ folder, or a step folder of ours."""
    return (path / "checkpoints").is_dir() or (path / MANIFEST).is_file() or (path / LATEST).is_file()


def load_meta(folder: Path, source: str | None = None):
    """(RunConfig, dense HF config, dense source folder) of a verified checkpoint folder."""
    from ds_upcycle.config import run_config_from_dict
    from ds_upcycle.loading import load_hf_config

    state = verify(folder)
    cfg = run_config_from_dict(state["config"])
    src = Path(source or cfg.model.path)
    field = "--source" if source else f"model.path recorded in {folder / STATE} (override with --source)"
    dense_cfg = load_hf_config(src, field=field)
    if getattr(dense_cfg, "model_type", "") == "mixtral":
        raise ValueError(f"{field} ({str(src)!r}) is a Mixtral folder; give the dense source checkpoint")
    return cfg, dense_cfg, src


def read_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """{our key: (shape, loader)} over the model-states file and every expert file (experts by
    their global id); loaders read with ``torch.load(weights_only=True)``, one expert file at a time."""
    from ds_upcycle.mixtral import OUR_GATE

    model_states = folder / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        raise ValueError(f"checkpoint {folder} has no mp_rank_00_model_states.pt")
    module = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
    out = {k: (tuple(t.shape), (lambda t=t: t)) for k, t in module.items()}
    expert_files = sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    if any(OUR_GATE.match(k) for k in module) and not expert_files:
        raise ValueError(f"checkpoint {folder} has MoE routers but no expert files (layer_*_expert_*_model_states.pt)")
    cache: dict[Path, dict] = {}

    def loader(path: Path, key: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            if path not in cache:
                cache.clear()  # hold one expert file at a time
                cache[path] = torch.load(path, map_location="cpu", weights_only=True)
            return cache[path][key]

        return load

    for path in expert_files:
        for key, t in torch.load(path, map_location="meta", weights_only=True).items():
            out[key] = (tuple(t.shape), loader(path, key))
    return out


def load_moe_model(ckpt: str | Path, tag: int | None = None, source: str | None = None):
    """(model, run config, dense source folder): our trained MoE model from a checkpoint, rebuilt in
    one process (ep 1) whatever ep_size trained it: the dense skeleton, upcycled, then every tensor
    loaded strictly."""
    from ds_upcycle.loading import load_dense_model
    from ds_upcycle.upcycle import upcycle

    folder = resolve(ckpt, tag)
    cfg, _, src = load_meta(folder, source)
    model = upcycle(
        load_dense_model(src, "fp32", field="model.path"), dataclasses.replace(cfg.moe, ep_size=1), ep_rank=0
    )
    state = {k: load().float() for k, (_, load) in read_tensors(folder).items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, src
