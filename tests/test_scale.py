"""The settings a real run uses, resumed: activation checkpointing, token dropping, gradient
accumulation, skipped steps, a collective timeout far below what one rank hashing a whole
checkpoint takes. 2 CPU ranks through the `deepspeed` launcher, one uninterrupted run and one resumed
from its middle checkpoint."""

import json
import math
import os
import shutil
import time

import pytest
from conftest import train

from ds_upcycle import checkpoint

pytestmark = pytest.mark.slow

STEPS, RESUME_AT = 3, 2
# Experts dominate the checkpoint (16 bytes per parameter: the expert file plus ZeRO's fp32 copy and
# Adam moments), so each rank writes about half of it; the model-states file rank 0 writes on top is
# a few MB. 2 layers x 8 experts x 3 x 256 x 15360 = 189M parameters: about 3 GB per checkpoint.
SHAPE = {"hidden_size": 256, "intermediate_size": 15360, "num_attention_heads": 4, "num_key_value_heads": 2}
SETTINGS = {
    "train.steps": STEPS, "train.save_every": RESUME_AT, "log.wandb": "disabled", "log.every": 1,
    "model.activation_checkpointing": True, "ds.gradient_accumulation_steps": 2,
    "ds.train_micro_batch_size_per_gpu": 2,
    "moe.drop_tokens": True, "moe.capacity_factor": 1.0, "moe.eval_capacity_factor": 2.0,
    "train.on_nonfinite": "skip", "debug.inject_inf_grad_at_steps": [0], "debug.inject_nan_at_step": 1,
    "log.collapse_max_over_mean": 1.01, "log.collapse_patience": 3,
    "log.heatmap_every": -1,  # no matplotlib on rank 0 while rank 1 waits under the short timeout
}  # fmt: skip
NOT_COMPARED = ("throughput/", "memory/")  # timings and RSS differ between runs


@pytest.fixture(scope="module")
def wide_setup(tiny_setup, tmp_path_factory):
    """The tiny setup's corpus and tokenizer with a wide random Llama."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    model = tmp_path_factory.mktemp("wide_setup") / "model"
    shutil.copytree(tiny_setup["model"], model, ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    config = AutoConfig.from_pretrained(tiny_setup["model"])
    config.update(SHAPE)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model, safe_serialization=True)
    return {**tiny_setup, "model": str(model)}


def _rows(out) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss/lm" in r}


def _serial_hash_seconds(folder) -> tuple[float, int]:
    """What the old commit made rank 0 do while every other rank waited: hash every file, alone."""
    files = [p for p in folder.iterdir() if p.is_file()]
    t0 = time.perf_counter()
    for p in files:
        checkpoint.file_entry(p)
    return time.perf_counter() - t0, sum(p.stat().st_size for p in files)


def test_resume_at_scale_settings_with_a_short_collective_timeout(wide_setup, tmp_path):
    ref = tmp_path / "ref"
    proc = train(wide_setup, ref, **SETTINGS)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    middle = ref / "checkpoints" / checkpoint.tag_for(RESUME_AT)
    serial_s, size = _serial_hash_seconds(middle)
    # Below the serial time, above what the ranks otherwise wait for each other (loading, building
    # the engine: those grow with the machine's load, as the serial time does).
    timeout_s = max(1.5, round(0.55 * serial_s, 1))
    print(f"checkpoint {size / 1e9:.2f} GB: serial SHA-256 {serial_s:.2f} s; train.timeout_s={timeout_s}")
    assert serial_s > timeout_s  # the old commit (rank 0 hashing it all, the rest waiting) would time out

    # A copy of the run as it stood after step RESUME_AT (hard links: no 3 GB copy), resumed.
    out = tmp_path / "resumed"
    shutil.copytree(middle, out / "checkpoints" / middle.name, copy_function=os.link)
    (out / "checkpoints" / checkpoint.LATEST).write_text(middle.name)
    proc = train(wide_setup, out, **SETTINGS, **{"train.resume": True, "train.timeout_s": timeout_s})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())

    # 1. Train mode at every step of the resumed run, so checkpointing and capacity_factor applied.
    assert summary["resumed_from"] == RESUME_AT and summary["train_mode_every_step"] is True
    # 2. The commit and the resume completed under the short timeout; rank 0 read only its share.
    final = out / "checkpoints" / checkpoint.tag_for(STEPS)
    assert (out / "checkpoints" / checkpoint.LATEST).read_text() == final.name
    assert not list(final.glob(f"{checkpoint.PART_PREFIX}*"))  # the ranks' parts were merged
    assert checkpoint.verify(final)["step"] == STEPS
    read = set(summary["verified_files"])
    assert {"mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "layer_1_expert_3_mp_rank_00_model_states.pt", "ds_upcycle_rank00000.pt"} <= read  # fmt: skip
    assert not read & {"zero_pp_rank_1_mp_rank_00_optim_states.pt", "layer_1_expert_4_mp_rank_00_model_states.pt",
                       "ds_upcycle_rank00001.pt"}  # fmt: skip
    # 3./4./8. Every later metric equals the uninterrupted run's: losses, LR (the skipped step 1 held
    # it back in both), the counters kept in the checkpoint, the collapse alert's streak.
    full, resumed = _rows(ref), _rows(out)
    assert sorted(resumed) == list(range(RESUME_AT + 1, STEPS + 1))
    for step, row in resumed.items():
        for key, value in row.items():
            if not key.startswith(NOT_COMPARED):
                assert value == pytest.approx(full[step][key], rel=1e-5, abs=1e-6, nan_ok=True), (step, key)
    assert [full[s]["optim/skipped_steps"] for s in (1, 3)] == [1, 1]
    assert [full[s]["optim/skipped_microbatches"] for s in (1, 2, 3)] == [0, 2, 2]
    assert full[1]["optim/lr"] == full[2]["optim/lr"] < full[3]["optim/lr"]  # warm-up held back by the skip
    assert [full[s]["alerts/router_collapse"] for s in range(1, STEPS + 1)] == [0.0, 0.0, 1.0]
    assert max(full[s]["router/layer_00/drop_frac"] for s in full) > 0  # tokens were dropped
    assert math.isfinite(full[STEPS]["loss/lm"]) and summary["counters"]["skipped_steps"] == 1
