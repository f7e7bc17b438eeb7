"""Process-group set-up through DeepSpeed, for launched jobs and single-process use alike."""

from __future__ import annotations

import datetime
import os
import socket

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
