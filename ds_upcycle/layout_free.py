"""The layout-free part of a checkpoint: every parameter's fp32 master weight and optimizer state
under its global name, so that a run continues on another number of ranks, ep_size or ZeRO stage.

Files, in ``<step folder>/layout_free/``:

- ``<global name>.safetensors``, one per parameter: ``fp32`` (the master weight; a frozen
  parameter's value) and each per-element optimizer state (``exp_avg``, ``exp_avg_sq`` for Adam),
  fp32, in the parameter's shape. Experts carry their global id (rank-local index + ep_rank x local
  experts: DeepSpeed's own rule for its expert files, deepspeed/runtime/engine.py
  ``_save_moe_checkpoint``), so no name depends on the layout;
- ``index.json`` (rank 0): every parameter and its shape, the optimizer's step and each optimizer
  group's settings by kind, the LR scheduler's state by kind, DeepSpeed's step counters and loss
  scaler.

Save (collective): each parameter is written once, by one rank of its data-parallel group (any rank
for dense parameters, the expert-data-parallel group for an expert), picked by a greedy balance of
bytes. Its ZeRO fragments are reduced onto that rank (a zero-filled buffer per rank, as DeepSpeed's
``get_full_hp_param`` does, but onto one rank), batch by batch, and after each batch every rank
writes its files at once.

Why not DeepSpeed's ``safe_get_full_optimizer_state``: in 0.19.8 it works for the parameters of
the first optimizer group only. ``DeepSpeedZeroOptimizer._optimizer_step(i)`` links every group's
``_hp_mapping.optim_fragment`` right after group 0 has stepped
(``_lazy_init_hp_params_optimizer_state``, deepspeed/runtime/zero/stage_1_and_2.py), when the later
groups (norms, routers, every expert group) have no state yet, and never again: their fragments stay
empty ("exp_avg not found in optimizer state fragment"). We read the state where the inner optimizer
keeps it, the state of the group's flat fp32 partition (``single_partition_of_fp32_groups[i]``) at
the parameter's ``_hp_mapping.hp_fragment_address``: the view ``tensor_fragment.set_optim_state_fragment``
would have taken (deepspeed/utils/tensor_fragment.py).

Load (a resume under another layout): each rank reads only what its ZeRO partitions hold, one
parameter at a time, into the flat fp32 partitions and their optimizer state, as DeepSpeed's
universal-checkpoint load does (deepspeed/runtime/base_optimizer.py
``load_hp_checkpoint_state_from_checkpoint_dir``, tensor_fragment.py ``map_to_flat_opt_states``);
then ``update_lp_params`` copies the masters into the model's weights and all-gathers them
(stage_1_and_2.py; engine.py ``load_checkpoint`` calls it after a universal load). No rank holds
more than one parameter's full tensors at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

FOLDER = "layout_free"
INDEX = f"{FOLDER}/index.json"
FORMAT = "ds_upcycle.layout_free/1"
MASTER = "fp32"
"""The key of the master weight in a parameter's file (the other keys are optimizer states)."""
BATCH_BYTES = 1 << 30
"""At most this many bytes of gathered tensors per batch of a save (see :func:`save`)."""
HYPER = ("lr", "initial_lr", "betas", "eps", "weight_decay")
"""Optimizer group settings carried over, as DeepSpeed's native load restores its param groups."""


def param_file(global_name: str) -> str:
    return f"{FOLDER}/{global_name}.safetensors"


def zero_optimizer(engine):
    """DeepSpeed's ZeRO-1/2 optimizer of ``engine``, or None (ZeRO-0 or no optimizer)."""
    opt = engine.optimizer
    return opt if hasattr(opt, "single_partition_of_fp32_groups") and hasattr(opt, "bit16_groups") else None


# --------------------------------------------------------------------------------------------
# Global names
# --------------------------------------------------------------------------------------------


def _moe_layers(module) -> list[tuple[str, object]]:
    from deepspeed.moe.layer import MoE

    return [(name, m) for name, m in module.named_modules() if isinstance(m, MoE)]


def _expert_prefix(moe_name: str) -> str:
    return f"{moe_name}.deepspeed_moe.experts.deepspeed_experts."


def global_names(module) -> dict[str, str]:
    """{parameter name in this rank's model: its global name} (experts by global id)."""
    out = {n: n for n, _ in module.named_parameters()}
    for moe_name, moe in _moe_layers(module):
        ep_rank = dist.get_rank(group=moe.deepspeed_moe.ep_group) if dist.is_initialized() else 0
        prefix = _expert_prefix(moe_name)
        for n in out:
            if n.startswith(prefix):
                local, rest = n[len(prefix) :].split(".", 1)
                out[n] = f"{prefix}{ep_rank * moe.num_local_experts + int(local)}.{rest}"
    return out


def all_global_params(module) -> dict[str, list[int]]:
    """{global name: shape} of every parameter of the whole model, every rank's experts included
    (every expert of a layer has the shape of this rank's first one)."""
    out = {n: list(p.shape) for n, p in module.named_parameters()}
    for moe_name, moe in _moe_layers(module):
        prefix = _expert_prefix(moe_name)
        local = {n[len(prefix) :].split(".", 1)[1]: s for n, s in list(out.items()) if n.startswith(prefix)}
        for n in [n for n in out if n.startswith(prefix)]:
            del out[n]
        out.update({f"{prefix}{e}.{rest}": s for e in range(moe.num_experts) for rest, s in local.items()})
    return out


def _aliases(module) -> dict[str, str]:
    """Tied parameters: {second name: the name named_parameters() keeps} (e.g. lm_head -> embeddings)."""
    first: dict[int, str] = {}
    out = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[n] = first[id(p)]
        else:
            first[id(p)] = n
    return out


# --------------------------------------------------------------------------------------------
# Reading the ZeRO partitions
# --------------------------------------------------------------------------------------------


def group_key(group: dict) -> str:
    """A layout-free name for an optimizer group: its kind (ds_upcycle.optim), '/experts' for an
    expert group (DeepSpeed names those by ep_size, which may change)."""
    kind = group.get("kind") or group.get("name", "group")
    return f"{kind}/experts" if group.get("moe") else str(kind)


def state_keys(opt, i: int) -> list[str]:
    """The per-element optimizer states of group ``i`` (tensors shaped like its flat partition:
    the rule of tensor_fragment.set_optim_state_fragment)."""
    flat = opt.single_partition_of_fp32_groups[i]
    state = opt.optimizer.state.get(flat, {})
    return sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)


def _source(opt, p: torch.nn.Parameter, key: str) -> torch.Tensor:
    """This rank's fragment of ``p``'s master weight (key "fp32") or optimizer state ``key``."""
    m = p._hp_mapping
    flat = opt.single_partition_of_fp32_groups[m.param_group_index]
    src = flat if key == MASTER else opt.optimizer.state[flat][key]
    return src.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel)


@torch.no_grad()
def gather(opt, p: torch.nn.Parameter, key: str, dst: int) -> torch.Tensor | None:
    """Collective over ``p``'s data-parallel group: the full fp32 tensor of ``key`` on rank ``dst``
    (a global rank), None elsewhere. Each rank fills its fragments into a zero buffer (fragments
    never overlap, so the sum is exact)."""
    flat = opt.single_partition_of_fp32_groups[0]
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=flat.device)
    m = getattr(p, "_hp_mapping", None)
    if m is not None:
        buf.narrow(0, m.lp_fragment_address.start, m.lp_fragment_address.numel).copy_(_source(opt, p, key))
    if dist.is_initialized():
        dist.reduce(buf, dst=dst, group=p._dp_group)
        if dist.get_rank() != dst:
            return None
    return buf.view(p.shape).cpu()


def _step_of(opt) -> float | None:
    """The optimizer's step count (the same in every group), or None before any step."""
    steps = set()
    for i, flat in enumerate(opt.single_partition_of_fp32_groups):
        state = opt.optimizer.state.get(flat, {})
        step = state.get("step", opt.optimizer.param_groups[i].get("step"))
        if step is not None:
            steps.add(float(step))
    if len(steps) > 1:
        raise RuntimeError(f"optimizer groups disagree on the step count: {sorted(steps)}")  # internal
    return steps.pop() if steps else None


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def owners(params: list[tuple[str, torch.nn.Parameter, list[int]]], world: int) -> dict[str, int]:
    """{global name: the rank that writes it}, from (global name, param, candidate ranks): greedy by
    bytes, dense parameters first. Every rank of a group computes the same answer: the dense
    parameters are the same everywhere, and the ranks of an expert-data-parallel group hold the same
    experts."""
    load = dict.fromkeys(range(world), 0)
    out = {}
    for name, p, ranks in params:
        r = min(ranks, key=lambda r: (load[r], r))
        out[name] = r
        load[r] += p.numel()
    return out


def _ordered(module, world: int) -> list[tuple[str, torch.nn.Parameter, list[int]]]:
    """(global name, param, the ranks that hold it): dense parameters, then experts, so each
    group's collectives run in one order on all its ranks. An expert is held by its layer's
    expert-data-parallel group (deepspeed/utils/groups.py), a dense parameter by every rank."""
    from deepspeed.utils import groups

    names = global_names(module)
    holders = {}
    for moe_name, moe in _moe_layers(module):
        ranks = list(range(world))
        if dist.is_initialized():
            ranks = sorted(dist.get_process_group_ranks(groups._get_expert_data_parallel_group(moe.expert_group_name)))
        holders[_expert_prefix(moe_name)] = ranks
    dense, experts = [], []
    for n, p in module.named_parameters():
        prefix = next((h for h in holders if n.startswith(h)), None)
        if prefix is None:
            dense.append((names[n], p, list(range(world))))
        else:
            experts.append((names[n], p, holders[prefix]))
    return dense + experts


def _schedule(engine, opt) -> tuple[dict, dict | None]:
    """(each optimizer group kind's settings, the LR scheduler's position and per-kind LRs)."""
    groups = {}
    for g in opt.optimizer.param_groups:
        groups[group_key(g)] = {k: list(g[k]) if isinstance(g[k], tuple) else g[k] for k in HYPER if k in g}
    if engine.lr_scheduler is None:
        return groups, None
    state = engine.lr_scheduler.state_dict()  # base_lrs and _last_lr follow the optimizer's groups
    keys = [group_key(g) for g in opt.optimizer.param_groups]
    sched = {k: state.get(k) for k in ("last_epoch", "_step_count", "_is_initial")}
    sched["base_lrs"] = dict(zip(keys, state["base_lrs"], strict=True))
    sched["last_lrs"] = dict(zip(keys, state["_last_lr"], strict=True))
    return groups, sched


def _index(engine, opt, keys: list[str]) -> dict:
    """What rank 0 writes to index.json: everything but the tensors."""
    groups, sched = _schedule(engine, opt)
    scaler = getattr(opt, "loss_scaler", None)
    scaler_state = {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))} if scaler else None
    optimizer = {"class": f"{type(opt.optimizer).__module__}.{type(opt.optimizer).__name__}",
                 "step": _step_of(opt), "groups": groups}  # fmt: skip
    counters = {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")}
    return {
        "format": FORMAT,
        "params": {n: {"shape": s} for n, s in sorted(all_global_params(engine.module).items())},
        "aliases": _aliases(engine.module),
        "state_keys": keys,
        "optimizer": optimizer,
        "scheduler": sched,
        "engine": counters,
        "loss_scaler": scaler_state,
    }


def batches(params: list[tuple[str, torch.nn.Parameter, list[int]]], nkeys: dict[int, int]) -> list[list]:
    """``params`` cut into runs of at most BATCH_BYTES of fp32 tensors (a larger parameter alone).
    Every rank of a group cuts its collectives at the same places: the dense parameters come first
    and are the same everywhere, and the ranks of an expert-data-parallel group hold the same experts."""
    from ds_upcycle.safetensors_stream import pack

    return pack(params, lambda item: item[1].numel() * 4 * nkeys.get(id(item[1]), 1), BATCH_BYTES)


@torch.no_grad()
def save(engine, folder: Path, rank: int, crash_midway: bool = False) -> list[Path]:
    """Collective: write this rank's share of the layout-free part into ``folder``; returns the files
    it wrote (for its part of the manifest). Batch by batch, every rank gathers the parameters it
    owns, then all ranks write theirs at once: a rank holds at most a batch, and no write waits for
    another rank's. crash_midway (a debug hook for tests) kills rank 0 once it has written its first
    parameter file: a save cut off while writing this part."""
    from safetensors.torch import save_file

    opt = zero_optimizer(engine)
    if opt is None:
        return []
    world = dist.get_world_size() if dist.is_initialized() else 1
    (folder / FOLDER).mkdir(parents=True, exist_ok=True)
    ordered = _ordered(engine.module, world)
    owner = owners(ordered, world)
    group_keys = {id(p): state_keys(opt, i) for i, group in enumerate(opt.bit16_groups) for p in group}
    written: list[Path] = []
    for batch in batches(ordered, {k: 1 + len(v) for k, v in group_keys.items()}):
        mine: list[tuple[str, dict[str, torch.Tensor]]] = []
        for name, p, _ in batch:
            if id(p) in group_keys:  # trainable: master and states from the ZeRO partitions (collective)
                tensors = {key: gather(opt, p, key, owner[name]) for key in (MASTER, *group_keys[id(p)])}
                if rank == owner[name]:
                    mine.append((name, tensors))
            elif rank == owner[name]:  # frozen: the same on every rank that holds it; only its writer copies it
                mine.append((name, {MASTER: p.detach().float().cpu()}))
        for name, tensors in mine:
            path = folder / param_file(name)
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
            written.append(path)
            if crash_midway and rank == 0:
                os._exit(17)
    if rank == 0:
        keys = sorted({k for ks in group_keys.values() for k in ks})
        path = folder / INDEX
        path.write_text(json.dumps(_index(engine, opt, keys), indent=1))
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------


def _read_range(f, key: str, shape: list[int], start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the flattened tensor ``key``, reading only the rows that
    hold them."""
    if len(shape) == 0:
        return f.get_tensor(key).reshape(-1).narrow(0, start, numel)
    cols = math.prod(shape[1:])
    r0, r1 = start // cols, -(-(start + numel) // cols)
    rows = f.get_slice(key)[r0:r1]
    return rows.reshape(-1).narrow(0, start - r0 * cols, numel)


def check_params(index: dict, module) -> None:
    """The checkpoint holds exactly this model's parameters, with the same shapes."""
    saved = {n: v["shape"] for n, v in index["params"].items()}
    here = all_global_params(module)
    for name, shape in here.items():
        if name not in saved:
            raise ValueError(
                f"parameter {name} of this run's model is not in the checkpoint: the model (model.path, moe.num_experts, "
                "moe.moe_layers, moe.granularity) must be the one the checkpoint was trained with"
            )
        if saved[name] != shape:
            raise ValueError(
                f"parameter {name} has shape {saved[name]} in the checkpoint but {shape} in this run; the model must be "
                "the one the checkpoint was trained with"
            )
    extra = sorted(set(saved) - set(here))
    if extra:
        raise ValueError(
            f"the checkpoint holds {len(extra)} parameters this run's model lacks (e.g. {extra[0]}); the model "
            "(model.path, moe.num_experts, moe.moe_layers) must be the one the checkpoint was trained with"
        )


@torch.no_grad()
def _allocate_state(opt) -> None:
    """Let the inner optimizer allocate its own state (its dtypes and devices): one step on zero
    gradients. Everything it touched is overwritten from the checkpoint afterwards."""
    flats = opt.single_partition_of_fp32_groups
    for flat in flats:
        flat.grad = torch.zeros_like(flat)
    opt.optimizer.step()
    for flat in flats:
        flat.grad = None


def _set_step(opt, step: float | None) -> None:
    if step is None:
        return
    for i, flat in enumerate(opt.single_partition_of_fp32_groups):
        state = opt.optimizer.state[flat]
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = int(step)
        if "step" in opt.optimizer.param_groups[i]:  # DeepSpeed's FusedAdam keeps it in the group
            opt.optimizer.param_groups[i]["step"] = int(step)


def _set_schedule(engine, opt, index: dict) -> None:
    """Group settings and the LR scheduler's position, matched by group kind."""
    groups = index["optimizer"]["groups"]
    keys = [group_key(g) for g in opt.optimizer.param_groups]
    missing = sorted(set(keys) - set(groups))
    if missing:
        raise ValueError(
            f"optimizer group {missing[0]!r} of this run is not in the checkpoint (it has {', '.join(sorted(groups))}); "
            "keep the settings that make the groups (moe.freeze_router, the model's weight-decay kinds) unchanged"
        )
    for g, key in zip(opt.optimizer.param_groups, keys, strict=True):
        for k, v in groups[key].items():
            g[k] = tuple(v) if isinstance(g.get(k), tuple) else v
    saved, sched = index["scheduler"], engine.lr_scheduler
    if saved is None or sched is None:
        return
    state = sched.state_dict()
    state.update(last_epoch=saved["last_epoch"], base_lrs=[saved["base_lrs"][k] for k in keys],
                 _last_lr=[saved["last_lrs"][k] for k in keys])  # fmt: skip
    for k in ("_step_count", "_is_initial"):
        if saved.get(k) is not None:
            state[k] = saved[k]
    sched.load_state_dict(state)


@torch.no_grad()
def load(engine, folder: Path, check: Callable[[str], Path]) -> list[str]:
    """Collective: restore masters, optimizer state, schedule and counters from ``folder``'s
    layout-free part into ``engine`` (any world size, ep_size or ZeRO stage). ``check(rel)``
    verifies one file against the manifest and returns its path; each rank checks only the files it
    reads. Returns them."""
    from safetensors import safe_open

    opt = zero_optimizer(engine)
    if opt is None:
        raise ValueError(
            "resuming under another layout needs ZeRO-1/2 (zero_optimization.stage 1 or 2): the layout-free part is "
            "read into ZeRO's partitions"
        )
    index = json.loads(check(INDEX).read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{folder / INDEX} has format {index.get('format')!r}, expected {FORMAT!r}")
    check_params(index, engine.module)
    _allocate_state(opt)
    verified = [INDEX]
    gnames = global_names(engine.module)
    names = {id(p): gnames[n] for n, p in engine.module.named_parameters()}
    for i, group in enumerate(opt.bit16_groups):
        keys = state_keys(opt, i)
        if keys != index["state_keys"]:
            raise ValueError(
                f"the checkpoint's optimizer ({index['optimizer']['class']}) keeps states {index['state_keys']}, this "
                f"run's keeps {keys}; resume with the optimizer the checkpoint was trained with (optimizer.type)"
            )
        flat = opt.single_partition_of_fp32_groups[i]
        for p in group:
            m = p._hp_mapping
            if m is None:
                continue
            rel = param_file(names[id(p)])
            path = check(rel)
            verified.append(rel)
            shape = index["params"][names[id(p)]]["shape"]
            with safe_open(str(path), framework="pt") as f:
                if not {MASTER, *keys} <= set(f.keys()):
                    raise ValueError(
                        f"checkpoint file {path} holds {sorted(f.keys())}, not the optimizer state this run trains it "
                        "with: it was frozen when saved (moe.freeze_router); keep it frozen"
                    )
                for key in (MASTER, *keys):
                    dst = flat if key == MASTER else opt.optimizer.state[flat][key]
                    src = _read_range(f, key, shape, m.lp_fragment_address.start, m.lp_fragment_address.numel)
                    dst.narrow(0, m.hp_fragment_address.start, m.hp_fragment_address.numel).copy_(src)
    for p in engine.module.parameters():  # frozen parameters: not in any ZeRO partition
        if not p.requires_grad:
            rel = param_file(names[id(p)])
            with safe_open(str(check(rel)), framework="pt") as f:
                p.data.copy_(f.get_tensor(MASTER).to(p.dtype))
            verified.append(rel)
    _set_step(opt, index["optimizer"]["step"])
    opt.update_lp_params()  # masters -> the model's weights, all-gathered over each group
    _set_schedule(engine, opt, index)
    counters = index["engine"]
    engine.global_steps, engine.global_samples = counters["global_steps"], counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    scaler = getattr(opt, "loss_scaler", None)
    for k, v in (index.get("loss_scaler") or {}).items():
        if scaler is not None and hasattr(scaler, k):
            setattr(scaler, k, v)
    return verified


# --------------------------------------------------------------------------------------------
# Reading back (export, eval)
# --------------------------------------------------------------------------------------------


def read_tensors(folder: Path, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], Callable[[], torch.Tensor]]]:
    """{global name: (shape, loader)} of every parameter's master weight, cast to the run's
    ``dtype`` (what DeepSpeed copies into the model after each step), tied names included."""
    from safetensors import safe_open

    index = json.loads((folder / INDEX).read_text())

    def loader(name: str) -> Callable[[], torch.Tensor]:
        def load() -> torch.Tensor:
            with safe_open(str(folder / param_file(name)), framework="pt") as f:
                return f.get_tensor(MASTER).to(dtype)

        return load

    out = {n: (tuple(v["shape"]), loader(n)) for n, v in index["params"].items()}
    for alias, name in index.get("aliases", {}).items():
        out[alias] = out[name]
    return out
