"""Helpers of the elastic-resume tests (tests/test_elastic.py, tests/test_multihost.py): compare a
continued run's losses with its predecessor's, and two checkpoints' layout-free parts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import losses
from safetensors.torch import load_file

from ds_upcycle import checkpoint, layout_free


def max_loss_difference(reference: Path, run: Path, steps: range) -> float:
    ref, got = losses(reference), losses(run)
    assert set(steps) <= set(got), sorted(got)
    return max(abs(ref[s] - got[s]) for s in steps)


def resaved_equals_read(run: Path, step: int) -> int:
    """A run started with debug.save_at_resume wrote its state back right after resuming at
    ``step`` (the checkpoint it read moved aside as step_N.superseded-*): every tensor of the two
    layout-free parts, and the index (optimizer step, group settings, LR schedule, counters), are
    equal. Returns the number of parameters compared."""
    root = run / "checkpoints"
    (read,) = root.glob(f"{checkpoint.tag_for(step)}.superseded-*")
    written = root / checkpoint.tag_for(step)
    checkpoint.verify(read)
    checkpoint.verify(written)
    files = sorted(p.name for p in (read / layout_free.FOLDER).glob("*.safetensors"))
    assert files == sorted(p.name for p in (written / layout_free.FOLDER).glob("*.safetensors"))
    for name in files:
        a, b = load_file(read / layout_free.FOLDER / name), load_file(written / layout_free.FOLDER / name)
        assert a.keys() == b.keys() == {"fp32", "exp_avg", "exp_avg_sq"}, name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name} {key}: max |diff| {(a[key] - b[key]).abs().max()}"
    assert json.loads((read / layout_free.INDEX).read_text()) == json.loads((written / layout_free.INDEX).read_text())
    return len(files)
