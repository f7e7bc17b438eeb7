"""`ds-upcycle train` refuses bad runs before any process starts, naming field, value and fix."""

import pytest
from conftest import DEBUG_CONFIG, debug_overrides

from ds_upcycle.cli import main as cli


def main(argv):
    return cli(["train", *argv])


@pytest.mark.parametrize(
    "extra, args, message",
    [
        ({}, ["--num-gpus", "3"], r"world size \(3\) must be divisible by moe.ep_size \(2\)"),
        ({"moe.ep_size": 3}, ["--num-gpus", "3"], r"moe.num_experts \(8\) must be divisible by moe.ep_size \(3\)"),
        (
            {"ds.train_batch_size": 16},
            ["--num-gpus", "2"],
            r"train_batch_size \(16\) must equal train_micro_batch_size_per_gpu \(4\) x gradient_accumulation_steps \(1\) x data-parallel size \(2\) = 8",
        ),
        ({"ds.zero_optimization.stage": 3}, ["--num-gpus", "2"], r"zero_optimization.stage \(3\) is not supported"),
        ({"ds.zero_optimization.reduce_scatter": False}, ["--num-gpus", "2"], r"reduce_scatter \(false\) must be true"),
        (
            {"model.path": "/nonexistent/model"},
            ["--num-gpus", "2"],
            r"model.path \('/nonexistent/model'\) is not a folder",
        ),
        (
            {"data.train": ["/nonexistent/*.txt"]},
            ["--num-gpus", "2"],
            r"data.train \('/nonexistent/\*.txt'\) matches no file",
        ),
        (
            {"data.seq_len": 4096},
            ["--num-gpus", "2"],
            r"data.seq_len \(4096\) is larger than the model's max_position_embeddings \(256\)",
        ),
        (
            {"model.dtype": "bf16"},
            ["--num-gpus", "2"],
            r"model.dtype \('bf16'\) disagrees with the DeepSpeed config \(fp32\)",
        ),
        ({"ds.scheduler": {"type": "WarmupLR"}}, ["--num-gpus", "2"], r"the DeepSpeed 'scheduler' section is not used"),
        (
            {"moe.moe_layers": [0, 9]},
            ["--num-gpus", "2"],
            r"moe.moe_layers \(\[0, 9\]\) has indices \[9\] out of range",
        ),
        (
            {"ds.zero_optimization.stage": 0},
            ["--num-gpus", "2"],
            r"zero_optimization.stage \(0\) is refused with MoE layers: without ZeRO-1/2 DeepSpeed clips gradients by "
            r"a wrong norm .* Set zero_optimization.stage to 1 or 2",
        ),
        (
            {"ds.zero_optimization": None},
            ["--num-gpus", "2"],
            r"zero_optimization \(absent: ZeRO stage 0\) is refused with MoE layers",
        ),
        (
            {"ds.use_data_before_expert_parallelism": True},
            ["--num-gpus", "2"],
            r"use_data_before_expert_parallelism \(true\) is not supported: .* strided ranks .* remove the key",
        ),
        (
            {"moe.top_k": 1, "log.sample_prompt": "The router"},
            ["--num-gpus", "2"],
            r"log.sample_prompt \('The router'\) cannot be sampled with moe.top_k 1 and moe.min_capacity 4: .* set "
            r"moe.min_capacity=1",
        ),
    ],
)
def test_invalid_runs_fail_before_launch(tiny_setup, tmp_path, capsys, extra, args, message):
    import re

    rc = main([str(DEBUG_CONFIG), *args, *debug_overrides(tiny_setup, tmp_path / "run", **extra)])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def test_bad_hostfile_fails_before_launch(tiny_setup, tmp_path, capsys):
    hf = tmp_path / "hosts"
    hf.write_text("node-1 slots=two\n")
    rc = main([str(DEBUG_CONFIG), "--hostfile", str(hf), *debug_overrides(tiny_setup, tmp_path / "run")])
    assert rc == 2
    assert "line 1 ('node-1 slots=two') must be 'HOST slots=N'" in capsys.readouterr().err


def test_dense_baseline_may_use_zero_stage_0(tiny_setup, tmp_path):
    """The ZeRO-0 refusal is about MoE layers only: the dense baseline is fine."""
    from ds_upcycle.config import load_run_config
    from ds_upcycle.preflight import validate

    extra = {"ds.zero_optimization.stage": 0, "model.upcycle": False}
    validate(load_run_config(DEBUG_CONFIG, debug_overrides(tiny_setup, tmp_path / "run", **extra)), 2)
    top1 = {"moe.top_k": 1, "log.sample_prompt": "The router", "moe.min_capacity": 1}
    validate(load_run_config(DEBUG_CONFIG, debug_overrides(tiny_setup, tmp_path / "run", **top1)), 2)


def test_without_num_gpus_the_world_is_what_the_launcher_starts(tiny_setup, tmp_path, capsys, monkeypatch):
    """No --num-gpus and no hostfile: the deepspeed launcher starts one rank per local device
    (deepspeed/launcher/runner.py; the CPU accelerator counts NUMA nodes, or LOCAL_SIZE), so the
    run is validated against that world, not against 1."""
    from deepspeed.accelerator import get_accelerator

    from ds_upcycle.launch import world_size

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LOCAL_SIZE", raising=False)
    assert world_size(None, None) == get_accelerator().device_count() == 1  # this CPU machine: one NUMA node
    monkeypatch.setenv("LOCAL_SIZE", "3")  # the CPU accelerator's device count, as the launcher reads it
    assert world_size(None, None) == 3 and world_size(2, None) == 2
    rc = main([str(DEBUG_CONFIG), *debug_overrides(tiny_setup, tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "world size (3) must be divisible by moe.ep_size (2)" in err, err
    assert not (tmp_path / "run").exists()
