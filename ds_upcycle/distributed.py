"""Process groups through DeepSpeed, and the few collectives the trainer needs.

Every helper works in a one-process run without a process group too (it is then the identity).
"""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 300.0) -> tuple[int, int]:
    """Initialise torch.distributed via ``deepspeed.init_distributed``; returns (rank, world_size).

    Under the ``deepspeed`` launcher the rendezvous comes from its environment. Without it, a
    one-process world on a free local port is made, because DeepSpeed's MoE layer needs an
    initialised process group even with one expert-parallel rank. ``timeout_s`` bounds every
    collective, so a dead peer fails the job instead of hanging it.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed

    deepspeed.init_distributed(timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def bound_all_groups(timeout_s: float) -> int:
    """Give every process group of this rank the collective timeout; returns how many it set.

    Call it once the engine exists. DeepSpeed creates its expert-parallel and expert-data-parallel
    groups with ``new_group(ranks)`` and no timeout (deepspeed/utils/groups.py,
    deepspeed/comm/torch.py ``new_group``), so torch gives them its 30-minute default
    (distributed_c10d.py, ``_get_default_timeout``), not init_process_group's. A hung peer would
    then stall an MoE all-to-all for 30 minutes instead of failing the job after ``timeout_s``.
    """
    if not dist.is_initialized():
        return 0
    from torch.distributed import distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    groups = [pg for pg in list(c10d._world.pg_map) if not c10d._rank_not_in_group(pg)]
    for pg in groups:
        c10d._set_pg_timeout(timeout, pg)
    return len(groups)


def strip_local_rank(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends ``--local_rank=N``; the rank comes from LOCAL_RANK instead."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a.startswith("--local_rank="):
            continue
        elif a == "--local_rank":
            skip = True
        else:
            out.append(a)
    return out


def shutdown_distributed() -> None:
    """Barrier, then destroy the process group. Without it a rank that exits while its peer's gloo
    threads are still alive can abort at interpreter exit ("terminate called without an active
    exception"), turning a finished job into a failed one."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def comm_device() -> torch.device:
    """Where collective buffers live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_mean(values: list[float]) -> list[float]:
    """The mean of each value over all ranks (collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is true on any rank (collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=comm_device())
    if dist.is_initialized():
        dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
