"""GPU readiness, checked on the CPU: the device script's stages and files (SMOKE=1 runs the same
commands with tiny shapes), the shipped GPU configs training for real (bf16, fused torch AdamW,
ZeRO, activation checkpointing, accumulation, token dropping), and plan's memory estimate."""

import json
import os
import subprocess

import pytest
from conftest import LAUNCH_PORT, ROOT, train
from transformers import LlamaConfig

from ds_upcycle.config import MoEConfig, load_run_config, shipped_configs
from ds_upcycle.plan import make_plan
from ds_upcycle.tools.bench import LLAMA3_8B_LAYERS

GPU_CONFIGS = [n for n in shipped_configs() if n.startswith(("gpu_", "llama3_"))]
DEVICE_FILES = {"log.txt", "preflight.json", "block.json", "step.json", "dense_summary.json", "dense_metrics.jsonl",
                "upcycled_summary.json", "upcycled_metrics.jsonl"}  # fmt: skip


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_configs_compile_nothing(name):
    """torch's fused AdamW, not DeepSpeed's FusedAdam (an nvcc build of a minute or more at start-up)."""
    params = load_run_config(name).ds["optimizer"]["params"]
    assert params["torch_adam"] is True and params["fused"] is True


def test_plan_fits_the_benchmark_model_on_one_h200():
    """3 upcycled layers of Llama-3-8B's shape fit one H200 (139 GiB usable) with ZeRO-2 bf16 Adam; 4 do not."""
    fits = {}
    for layers in (3, 4):
        plan = make_plan(LlamaConfig(**{**LLAMA3_8B_LAYERS, "num_hidden_layers": layers}), MoEConfig(), 1, 8192)
        fits[layers] = plan.peak_bytes_per_rank(2, 1, True) / 2**30
        assert plan.activation_bytes(1, True) < plan.activation_bytes(1, False)
        assert plan.grad_bytes_per_rank(2) == plan.grad_bytes_per_rank(1)  # one rank: nothing to partition
    assert fits[3] < 139 < fits[4], fits


@pytest.mark.slow
def test_device_script_runs_every_stage_and_returns_its_files(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "WORKDIR": str(work), "MASTER_PORT": str(LAUNCH_PORT),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_h200.sh")], cwd=ROOT, env=env, capture_output=True,
                   text=True, timeout=900)  # fmt: skip
    log = (out / "log.txt").read_text()
    assert {p.name for p in out.iterdir()} == DEVICE_FILES, log[-3000:]
    for stage in ("preflight", "block", "step"):
        assert f"== stage {stage}: exit 0" in log, log[-3000:]
    step = json.loads((out / "step.json").read_text())
    assert step["complete"] and [r["model"] for r in step["rows"]] == ["dense", "upcycled"]
    for row in step["rows"]:
        assert row["mfu_measured"] > 0 and row["peak_gib"] > 0 and row["predicted_peak_gib"] > 0
    summary = json.loads((out / "upcycled_summary.json").read_text())
    assert summary["optimizer"] == {"wrapper": "DeepSpeedZeroOptimizer", "optimizer": "torch.optim.adamw.AdamW",
                                    "fused": True, "zero_stage": 2, "dtype": "bfloat16"}  # fmt: skip
    assert summary["checkpoint"] is None and not list(work.rglob("latest_complete"))  # train.save_final=false
    assert json.loads((out / "preflight.json").read_text())["complete"]
    assert len(json.loads((out / "block.json").read_text())["rows"]) == 3  # dense, ours, HF at one shape


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpu_zero1_bf16_ep2", "llama3_8b_paper_cf4"])
def test_gpu_config_trains_on_cpu(tiny_setup, tmp_path, name):
    """The shipped config's own DeepSpeed sections (bf16, ZeRO, fused torch AdamW), activation checkpointing
    and MoE settings (token dropping for the paper's cf4), on the tiny model and 2 CPU ranks; shrunk to
    micro-batches of 1 sequence of 32 tokens, 2 accumulation steps, 2 steps."""
    cfg = load_run_config(name)
    run = train(tiny_setup, tmp_path / "run", config=name, **{
        "moe.ep_size": min(cfg.moe.ep_size, 2), "data.seq_len": 32, "data.eval_batches": 1, "train.steps": 2,
        "train.save_every": 0, "log.every": 1, "ds.train_micro_batch_size_per_gpu": 1,
        "ds.gradient_accumulation_steps": 2})  # fmt: skip
    assert run.returncode == 0, run.output[-4000:]
    s = run.summary
    assert s["steps_done"] == 2 and s["eval_loss_end"] == s["eval_loss_end"]  # finite, not NaN
    assert s["optimizer"]["optimizer"] == "torch.optim.adamw.AdamW" and s["optimizer"]["fused"]
    assert s["optimizer"]["zero_stage"] == cfg.ds["zero_optimization"]["stage"]
    assert s["optimizer"]["dtype"] == "bfloat16"
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "router/layer_00/drop_frac" in m] == [1, 2]
