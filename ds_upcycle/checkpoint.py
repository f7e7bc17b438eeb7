"""Save and resume, atomically; find, verify and read checkpoints back.

A checkpoint is DeepSpeed's native folder ``<root>/<tag>/`` (model states, one file per MoE
layer and global expert, ZeRO optimizer shards) plus ours:

- ``ds_upcycle_rank{R}.pt``: each rank's RNG states (tensors only);
- ``ds_upcycle_state.json``: step, data position, counters, resolved config;
- ``ds_upcycle_manifest.json``: every file of the folder with its size and SHA-256;
- ``layout_free/``: every parameter's fp32 master weight and optimizer state under its global
  name (:mod:`ds_upcycle.layout_free`), what a resume under another layout reads.

Commit: each rank hashes the files it wrote itself (DeepSpeed's writes are recorded by
:class:`VerifiedIO`), all ranks at once, and leaves its part of the manifest next to them. Only
after every rank's part is there does rank 0 merge them into the manifest and then replace
``<root>/latest_complete`` (tmp file + rename). No rank hashes another rank's files, so the time
the others wait in a collective is the difference between the ranks' shares, never the whole
checkpoint. An interrupted save never becomes what the next run loads.

Resume: each rank checks exactly the files DeepSpeed reads on it (its own shards, its experts,
the shared model states) against the manifest, and reads them with ``torch.load(weights_only=True)``
and only DeepSpeed's known classes allowed, just before DeepSpeed would have unpickled them: a
truncated, altered or foreign file is refused, naming it. A shared filesystem across nodes is
assumed, as DeepSpeed does. When the layout (world size, ep_size, data-parallel sizes, ZeRO stage:
``layout`` in ds_upcycle_state.json) differs from the one saved, or DeepSpeed's native files are
gone, each rank reads its partitions from the layout-free part instead, again checking each file
it reads.

Reading back (export, eval): :func:`resolve` finds the step folder of a run, :func:`verify`
checks every file, :func:`read_tensors` maps every saved tensor to a loader, and
:func:`load_moe_model` rebuilds the trained model in one process whatever ep_size trained it.
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

from ds_upcycle import layout_free
from ds_upcycle.distributed import barrier

log = logging.getLogger("ds_upcycle")

LATEST = "latest_complete"
STATE = "ds_upcycle_state.json"
MANIFEST = "ds_upcycle_manifest.json"
PART_PREFIX = ".ds_upcycle_manifest_part"
"""Each rank's part of the manifest, merged by rank 0 and then removed."""
LAYOUT_KEYS = ("world_size", "ep_size", "dp_size", "expert_dp_size", "zero_stage")
"""What a checkpoint's ``layout`` records that DeepSpeed's native files depend on."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict:
    """A manifest entry: size and SHA-256."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class VerifiedIO:
    """DeepSpeed's checkpoint engine of this run, wrapped: it records the files this rank saves, and
    verifies each file against the manifest before DeepSpeed loads it.

    DeepSpeed reads and writes every checkpoint file through ``engine.checkpoint_engine``
    (deepspeed/runtime/checkpoint_engine/checkpoint_engine.py: save, load, create, commit, ...), and
    has no config key for a custom one, so :func:`attach` sets it. Everything but save and load is
    the wrapped engine's.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.written: list[Path] = []
        self.folder: Path | None = None
        self.manifest: dict = {}
        self.verified: list[str] = []

    def __getattr__(self, name: str):  # only for names not set in __init__
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def save(self, state_dict, path: str) -> None:
        self.inner.save(state_dict, path)
        self.written.append(Path(path))

    def load(self, path: str, map_location=None):
        if self.folder is None:  # not a resume through :func:`load`
            return self.inner.load(path, map_location=map_location)
        rel = os.path.relpath(path, self.folder)
        if rel not in self.verified:  # DeepSpeed reads the model states twice
            check_file(self.folder, rel, self.manifest)
            self.verified.append(rel)
        return safe_load(Path(path), map_location)


def attach(engine) -> VerifiedIO:
    """Wrap ``engine``'s checkpoint engine (DeepSpeed's torch.save/torch.load one) in :class:`VerifiedIO`."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if isinstance(current, VerifiedIO):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(
            f"the DeepSpeed checkpoint engine ({type(current).__name__}) is not supported: checkpoints are verified "
            "file by file through DeepSpeed's torch engine; remove the 'checkpoint' writer / 'datastates' settings"
        )
    engine.checkpoint_engine = VerifiedIO(current)
    return engine.checkpoint_engine


def _part_name(rank: int) -> str:
    return f"{PART_PREFIX}{rank:05d}.json"


def save(
    engine, root: Path, step: int, state: dict, rank: int, crash_before_commit: bool = False,
    crash_in_layout_free: bool = False,
) -> dict:  # fmt: skip
    """Collective: every rank calls it. Returns the checkpoint folder, ``commit_s`` (from this rank's
    last file written to the commit done: its hashing, the wait for the other ranks, rank 0's merge),
    ``native_s`` and ``layout_free_s`` (this rank's time in DeepSpeed's save and writing its share of
    the layout-free part) and ``ranks``:
    each rank's hashed bytes and seconds (rank 0 has them all, the others their own).

    crash_before_commit (a debug hook for tests) kills rank 0 after the files are written and
    before the manifest and the latest pointer: what a save interrupted midway leaves behind;
    crash_in_layout_free kills it midway through writing the layout-free part.
    """
    tag = tag_for(step)
    folder = root / tag
    if rank == 0:
        _clear_for_save(folder)
    barrier()
    io = attach(engine)
    io.written = []
    t_native = time.perf_counter()
    engine.save_checkpoint(str(root), tag=tag, save_latest=False)
    t_free = time.perf_counter()
    free = layout_free.save(engine, folder, rank, crash_in_layout_free)
    layout_free_s = time.perf_counter() - t_free
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    rng_file = folder / f"ds_upcycle_rank{rank:05d}.pt"
    torch.save(rng, rng_file)
    mine = [*io.written, *free, rng_file]
    if rank == 0:
        atomic_write_text(folder / STATE, json.dumps({"step": step, **state}, indent=2))
        mine.append(folder / STATE)
    t0 = time.perf_counter()
    files = {os.path.relpath(p, folder): file_entry(p) for p in mine}  # every rank at once, its own files
    stats = {"hashed_bytes": sum(e["bytes"] for e in files.values()), "hash_s": time.perf_counter() - t0}
    atomic_write_text(folder / _part_name(rank), json.dumps({"files": files, **stats}))
    barrier()  # every rank's files and its part of the manifest are on disk
    if crash_before_commit and rank == 0:
        os._exit(17)
    ranks = [stats]
    if rank == 0:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        _, ranks = commit(folder, world)
        atomic_write_text(root / LATEST, tag)
    barrier()
    return {"folder": folder, "commit_s": time.perf_counter() - t0, "native_s": t_free - t_native,
            "layout_free_s": layout_free_s, "ranks": ranks}  # fmt: skip


def commit(folder: Path, world: int) -> tuple[dict, list[dict]]:
    """Merge the ranks' parts into the manifest (files no rank recorded are hashed here: they are
    small), write it, remove the parts. Returns the manifest and each rank's hashing figures."""
    paths = [folder / _part_name(r) for r in range(world)]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {folder}: no manifest part from {', '.join(missing)}")  # internal
    parts = [json.loads(p.read_text()) for p in paths]
    manifest: dict = {}
    for part in parts:
        manifest.update(part.pop("files"))
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_file() and rel not in manifest and p.name != MANIFEST and not p.name.startswith(PART_PREFIX):
            manifest[rel] = file_entry(p)
    atomic_write_text(folder / MANIFEST, json.dumps(dict(sorted(manifest.items())), indent=1))
    for p in folder.glob(f"{PART_PREFIX}*"):
        p.unlink()
    return manifest, parts


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


def saved_layout(root: Path) -> tuple[str, dict] | None:
    """(tag, layout) of ``root``'s latest complete checkpoint, or None (none yet, or saved before
    layouts were recorded). A damaged state file is the resume's to name: None here."""
    tag = latest_tag(root)
    try:
        layout = json.loads((root / tag / STATE).read_text()).get("layout") if tag else None
    except (OSError, ValueError, AttributeError):
        return None
    return (tag, layout) if layout else None


def copy_to_new_run(run: Path, step: int, out: Path) -> Path:
    """``run``'s checkpoint of ``step`` as the only (latest complete) checkpoint of a new run folder
    ``out``, to continue there (e.g. on another layout) while ``run`` stays as it is."""
    root = out / "checkpoints"
    root.mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / tag_for(step), root / tag_for(step))
    atomic_write_text(root / LATEST, tag_for(step))
    return root / tag_for(step)


def latest_tag(root: Path) -> str | None:
    p = root / LATEST
    return p.read_text().strip() if p.is_file() else None


def read_manifest(folder: Path) -> dict:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ValueError(f"checkpoint {folder} has no {MANIFEST}: the save did not complete; delete the folder")
    return json.loads(manifest_path.read_text())


def check_file(folder: Path, rel: str, manifest: dict) -> Path:
    """One file against its manifest entry; ValueError names it when it is missing, unlisted,
    truncated or altered."""
    p = folder / rel
    meta = manifest.get(rel)
    if meta is None:
        raise ValueError(
            f"checkpoint file {p} is not in {folder / MANIFEST}; only resume from checkpoints this tool wrote"
        )
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
    return p


def _ours(rel: str) -> bool:
    """A file ds_upcycle writes (state, RNG, the layout-free part), not one of DeepSpeed's native files."""
    return rel.startswith((layout_free.FOLDER + "/", "ds_upcycle_"))


def native_missing(folder: Path, manifest: dict) -> list[str]:
    """DeepSpeed's native files of the manifest that are gone (e.g. deleted to keep only the
    layout-free part), when the layout-free part is there to stand in for them; else []."""
    if layout_free.INDEX not in manifest:
        return []
    return [rel for rel in manifest if not _ours(rel) and not (folder / rel).is_file()]


def verify(folder: Path) -> dict:
    """Check every file against the manifest (for readers of the whole checkpoint: export, eval);
    ValueError names the first bad file. DeepSpeed's native files may be gone when the layout-free
    part is complete. Returns the saved state."""
    manifest = read_manifest(folder)
    gone = set(native_missing(folder, manifest))
    if gone and not (folder / layout_free.INDEX).is_file():
        gone = set()  # nothing stands in for them: name the first missing file
    for rel in manifest:
        if rel not in gone:
            check_file(folder, rel, manifest)
    return json.loads((folder / STATE).read_text())


def _deepspeed_safe_globals() -> list:
    """The only non-tensor classes DeepSpeed 0.19 pickles into ZeRO-1/2 checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)`` with only DeepSpeed's three known classes allowed: what
    DeepSpeed's own loader (``weights_only=False``,
    deepspeed/runtime/checkpoint_engine/torch_checkpoint_engine.py) returns for its own files, while a
    file that needs anything else is refused, so an arbitrary pickle is never unpickled."""
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # the unpickler raises several types; all mean "not safe"
        raise ValueError(
            f"checkpoint file {path} holds objects outside the safe allow-list ({type(e).__name__}); "
            "refusing to unpickle it. Only resume from checkpoints this tool wrote"
        ) from None


def check_safe_to_unpickle(folder: Path) -> None:
    """:func:`safe_load` every .pt file of the folder (ValueError names the first unsafe one)."""
    for f in sorted(folder.glob("*.pt")):
        safe_load(f)


def changed_layout(saved: dict | None, current: dict | None) -> list[str]:
    """The ``LAYOUT_KEYS`` whose values differ, as "key: saved -> current" (none when either is unknown)."""
    if not saved or not current:
        return []
    return [f"{k}: {saved.get(k)} -> {current.get(k)}" for k in LAYOUT_KEYS if saved.get(k) != current.get(k)]


def load(engine, root: Path, rank: int, layout: dict | None = None) -> dict | None:
    """Collective: resume from ``root``'s latest complete checkpoint. Returns its state (plus
    "verified_files": what this rank checked and read, and "resume_mode": "native" or
    "layout_free"), or None when there is none yet (a fresh start). Each rank verifies only the
    files it reads. ``layout`` is this run's (world size, ep_size, ...): when it differs from the
    checkpoint's, or DeepSpeed's native files are gone, the layout-free part is read instead."""
    tag = latest_tag(root)
    if tag is None:
        return None
    folder = root / tag
    manifest = read_manifest(folder)
    state = json.loads(check_file(folder, STATE, manifest).read_text())
    changed = changed_layout(state.get("layout"), layout)
    if changed or native_missing(folder, manifest):
        if layout_free.INDEX not in manifest:
            raise ValueError(
                f"checkpoint {folder} was saved under another layout ({'; '.join(changed)}) and has no layout-free "
                "part (saved by an older ds_upcycle); resume it with the world size and moe.ep_size it was saved with"
            )
        verified = layout_free.load(engine, folder, lambda rel: check_file(folder, rel, manifest))
        rng = _load_rng(folder, manifest, rank, verified)
        barrier()  # every rank has read its files: from here on a save may move the folder aside
        return {**state, **rng, "resume_mode": "layout_free", "changed": changed}
    io = attach(engine)
    io.folder, io.manifest, io.verified = folder, manifest, []
    try:
        load_path, _ = engine.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True, load_module_strict=True
        )
    finally:
        io.folder = None
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {folder}")
    rng = _load_rng(folder, manifest, rank, io.verified)
    barrier()  # every rank has read its files: from here on a save may move the folder aside
    return {**state, **rng, "resume_mode": "native", "changed": []}


def _load_rng(folder: Path, manifest: dict, rank: int, verified: list[str]) -> dict:
    """This rank's RNG states, when the checkpoint has this rank's (under another world size, the
    ranks beyond the saved ones keep their seeded state); returns {"verified_files": ...}."""
    rng_name = f"ds_upcycle_rank{rank:05d}.pt"
    if rng_name in manifest:
        rng = torch.load(check_file(folder, rng_name, manifest), weights_only=True)
        verified = [*verified, rng_name]
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return {"verified_files": [STATE, *verified]}


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
    their global id); loaders read with ``torch.load(weights_only=True)``, one expert file at a time.
    When DeepSpeed's native files are (partly) gone, the layout-free part's master weights, cast
    to the run's model.dtype (the weights DeepSpeed copies from them after every step)."""
    from ds_upcycle.config import run_config_from_dict
    from ds_upcycle.loading import DTYPES
    from ds_upcycle.mixtral import OUR_GATE

    model_states = folder / "mp_rank_00_model_states.pt"
    if native_missing(folder, read_manifest(folder)):
        cfg = run_config_from_dict(json.loads((folder / STATE).read_text())["config"])
        return layout_free.read_tensors(folder, DTYPES[cfg.model.dtype])
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
