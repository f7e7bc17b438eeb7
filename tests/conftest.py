"""Shared fixtures: a one-process DeepSpeed world, tiny Llama models, and the real launcher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ds_upcycle.launch import TrainingRun, launch_module, run_training

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HOSTFILE = ROOT / "hostfiles" / "localhost"
# A fixed port for every launcher run in the suite: DeepSpeed's CPU comm op leaves one ~69 MB
# /dev/shm/deepspeed_allreduce_buffer_* file per (port, rank) and never removes it, so fresh
# ports would fill RAM (deepspeed/ops/csrc/cpu/comm/shm.cpp never unlinks it). Runs are sequential, so one port is enough.
LAUNCH_PORT = int(os.environ.get("DS_UPCYCLE_TEST_PORT", "29731"))


@pytest.fixture(scope="session")
def dist_world():
    """A one-rank process group (DeepSpeed's MoE layer needs one even at ep_size 1)."""
    from ds_upcycle.distributed import init_distributed

    return init_distributed()


@pytest.fixture
def tiny_llama():
    """Factory: a tiny random LlamaForCausalLM (fp32, eval) for a variant of ds_upcycle.tools.tiny."""
    from transformers import LlamaForCausalLM

    from ds_upcycle.tools.tiny import tiny_llama_config

    def make(variant: str = "gqa", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        return LlamaForCausalLM(tiny_llama_config(variant, **overrides)).eval()

    return make


def launch(module: str, args: list[str], nprocs: int = 2, timeout: float = 600, env: dict | None = None):
    """Run `deepspeed --module MODULE ARGS` with the localhost hostfile and `nprocs` CPU ranks."""
    return launch_module(
        module, args, num_gpus=nprocs, hostfile=LOCAL_HOSTFILE, master_port=LAUNCH_PORT,
        env={"OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture
def launcher():
    return launch


def train(
    setup: dict, out, nprocs: int = 2, env: dict | None = None, timeout: float = 600, config=None, **overrides
) -> TrainingRun:
    """A real training run of the CPU debug config (or ``config``) on the tiny setup, through
    `ds_upcycle.launch.run_training` like every front end."""
    return run_training(
        config or DEBUG_CONFIG, debug_overrides(setup, out, **overrides), num_gpus=nprocs, hostfile=LOCAL_HOSTFILE,
        master_port=LAUNCH_PORT, env={"OMP_NUM_THREADS": "1", **(env or {})}, capture=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip


@pytest.fixture(scope="session")
def tiny_setup(tmp_path_factory):
    """A tiny Llama checkpoint folder (safetensors + tokenizer) and a text corpus, on disk."""
    from ds_upcycle.tools.tiny import write_tiny_setup

    return write_tiny_setup(tmp_path_factory.mktemp("tiny_setup"))


DEBUG_CONFIG = ROOT / "ds_configs" / "cpu_debug_zero2_ep2.json"


def debug_overrides(tiny_setup: dict, out_dir, **extra) -> list[str]:
    """Point the CPU debug config at the session's tiny setup and a run folder."""
    base = {
        "model.path": tiny_setup["model"],
        "data.train": [tiny_setup["train"]],
        "data.eval": [tiny_setup["eval"]],
        "train.output_dir": str(out_dir),
        "data.cache_dir": str(Path(tiny_setup["model"]).parent / "cache"),
        "log.wandb": "offline",
    }
    base.update(extra)
    import json

    return [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def losses(run_dir) -> dict[int, float]:
    """{step: loss/lm} from a run's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss/lm"] for r in rows if "loss/lm" in r}


REFERENCE_STEPS = 20


@pytest.fixture(scope="session")
def reference_run(tiny_setup, tmp_path_factory):
    """An uninterrupted 20-step 2-rank run (ZeRO-2, ep 2), saving at step 10 and 20: the
    reference that resumed and interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    proc = train(tiny_setup, out, **{"train.steps": REFERENCE_STEPS, "train.save_every": 10})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out
