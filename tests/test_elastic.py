"""Elastic resume for real: a checkpoint continued on another number of ranks and another ep_size
(through the launcher), its losses against the uninterrupted run's, its restored optimizer state
against the saved one parameter by parameter; a save cut off in the layout-free part; the export
reading either form. The multi-host transition (4 ranks, ep 4 -> 2 ranks, ep 2) is in
tests/test_multihost.py."""

import re
import shutil

import pytest
import torch
from conftest import REFERENCE_STEPS, train
from layout_free_checks import max_loss_difference, resaved_equals_read
from safetensors.torch import load_file

from ds_upcycle import checkpoint, layout_free

QUICK = {"log.wandb": "disabled", "log.heatmap_every": -1, "train.steps": REFERENCE_STEPS}


def _resume(tiny_setup, run, step, out, nprocs, **overrides):
    checkpoint.copy_to_new_run(run, step, out)
    return train(tiny_setup, out, nprocs=nprocs, **{**QUICK, "train.resume": True, "debug.save_at_resume": True,
                                                    **overrides})  # fmt: skip


def _check_resumed(proc, reference, out, step: int, what: str) -> None:
    assert proc.returncode == 0, proc.output[-4000:]
    assert proc.summary["resume_mode"] == "layout_free" and proc.summary["resumed_from"] == step
    worst = max_loss_difference(reference, out, range(step + 1, REFERENCE_STEPS + 1))
    compared = resaved_equals_read(out, step)
    print(f"{what}: max |dloss| = {worst:.3e} over steps {step + 1}-{REFERENCE_STEPS}; restored state equal "
          f"for all {compared} parameters")  # fmt: skip
    assert worst <= 1e-5


@pytest.mark.slow
def test_two_ranks_ep2_to_one_rank_ep1_and_on_to_two_ranks_ep2(reference_run, tiny_setup, tmp_path):
    """The reference run's step 10 (2 ranks, ep 2) on 1 rank, ep 1 with gradient accumulation 2 (the
    same global batch), to step 20; its step 15 back on 2 ranks, ep 2. Each continues its
    uninterrupted predecessor: the reference, then the 1-rank run itself."""
    one = tmp_path / "one"
    proc = _resume(tiny_setup, reference_run, 10, one, nprocs=1, **{"moe.ep_size": 1, "train.save_every": 5,
                                                                    "ds.gradient_accumulation_steps": 2})  # fmt: skip
    _check_resumed(proc, reference_run, one, 10, "2 ranks ep 2 -> 1 rank ep 1")
    two = tmp_path / "two"
    proc = _resume(tiny_setup, one, 15, two, nprocs=2, **{"moe.ep_size": 2})
    _check_resumed(proc, one, two, 15, "1 rank ep 1 -> 2 ranks ep 2")
    # Rank 0 read only its own partitions: of the experts, only its own four (ep rank 0).
    read = [f for f in proc.summary["verified_files"] if "deepspeed_experts" in f]
    assert read and {int(re.search(r"deepspeed_experts\.(\d+)\.", f)[1]) for f in read} <= {0, 1, 2, 3}


@pytest.mark.slow
def test_two_ranks_ep2_to_two_ranks_ep1_and_a_save_cut_off_in_the_layout_free_part(reference_run, tiny_setup, tmp_path):
    """The reference run's step 10 on 2 ranks, ep 1, to step 20; the final save dies while writing
    the layout-free part (rank 0 killed after its first file): never latest_complete."""
    out = tmp_path / "run"
    proc = _resume(tiny_setup, reference_run, 10, out, nprocs=2,
                   **{"moe.ep_size": 1, "debug.inject_crash_in_layout_free_at_step": REFERENCE_STEPS})  # fmt: skip
    assert proc.returncode != 0
    worst = max_loss_difference(reference_run, out, range(11, REFERENCE_STEPS + 1))
    compared = resaved_equals_read(out, 10)
    print(f"2 ranks ep 2 -> 2 ranks ep 1: max |dloss| = {worst:.3e} over steps 11-{REFERENCE_STEPS}; restored state "
          f"equal for all {compared} parameters")  # fmt: skip
    assert worst <= 1e-5
    root = out / "checkpoints"
    cut = root / checkpoint.tag_for(REFERENCE_STEPS)
    assert list((cut / layout_free.FOLDER).glob("*.safetensors"))  # the save got that far
    assert not (cut / layout_free.INDEX).exists() and not (cut / checkpoint.MANIFEST).exists()
    assert checkpoint.latest_tag(root) == checkpoint.tag_for(10)
    assert checkpoint.resolve(out) == root / checkpoint.tag_for(10)


@pytest.mark.slow
def test_export_reads_either_form(reference_run, tmp_path):
    """Without DeepSpeed's native files the checkpoint still verifies, and reads and exports to the
    same tensors from its layout-free part."""
    from ds_upcycle.export import export_checkpoint

    native = tmp_path / "ckpt" / "native"
    shutil.copytree(reference_run / "checkpoints" / checkpoint.tag_for(REFERENCE_STEPS), native)
    free = tmp_path / "ckpt" / "free"
    shutil.copytree(native, free)
    gone = [f for f in free.iterdir() if f.suffix == ".pt" and not f.name.startswith("ds_upcycle_")]
    assert len(gone) == 1 + 2 * 8 + 2  # model states, 2 layers x 8 experts, 2 ZeRO shards
    for f in gone:
        f.unlink()
    checkpoint.verify(free)
    a, b = checkpoint.read_tensors(native), checkpoint.read_tensors(free)
    assert a.keys() == b.keys()
    for key, (shape, load) in a.items():
        assert b[key][0] == shape and torch.equal(load(), b[key][1]()), key
    export_checkpoint(native, tmp_path / "hf_native")
    export_checkpoint(free, tmp_path / "hf_free")
    x, y = (
        load_file(tmp_path / "hf_native" / "model.safetensors"),
        load_file(tmp_path / "hf_free" / "model.safetensors"),
    )
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
