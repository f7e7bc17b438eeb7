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
