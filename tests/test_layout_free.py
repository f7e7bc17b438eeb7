"""The layout-free part of a checkpoint, in one process on a real ZeRO-2 engine: what it reads equals
what DeepSpeed's optimizer holds, and a save/load round trip restores every value (the multi-rank
transitions run in tests/test_elastic.py)."""

import json
import shutil

import pytest
import torch
from conftest import DEBUG_CONFIG
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
from safetensors.torch import load_file

from ds_upcycle import checkpoint, layout_free
from ds_upcycle.config import load_run_config
from ds_upcycle.preflight import validate


def _cfg(tiny_setup, out, **extra):
    overrides = {"moe.ep_size": 1, "ds.train_batch_size": 4, "model.path": tiny_setup["model"],
                 "data.train": f'["{tiny_setup["train"]}"]', "data.eval": "[]", "train.output_dir": str(out),
                 "ds.optimizer.params.weight_decay": 0.1, **extra}  # fmt: skip
    return load_run_config(DEBUG_CONFIG, [f"--{k}={v}" for k, v in overrides.items()])


def _engine(cfg, steps: int):
    """The trainer's own engine (ZeRO-2, torch AdamW, 4 optimizer groups), after ``steps`` steps."""
    from ds_upcycle.train import load_model, make_engine

    derived = validate(cfg, 1)
    engine, scheduler = make_engine(cfg, load_model(cfg, derived), derived)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 256, (4, 16), generator=gen)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return engine


def test_what_it_reads_is_what_deepspeeds_optimizer_holds(dist_world, tiny_setup, tmp_path):
    """Masters equal DeepSpeed's public getter for every parameter; the optimizer states equal
    DeepSpeed's public getter where it works (the first optimizer group) and DeepSpeed's flat
    partition state everywhere: put back at their fragment addresses, the per-parameter values
    rebuild each group's flat exp_avg / exp_avg_sq exactly, and cover all of it but the padding."""
    engine = _engine(_cfg(tiny_setup, tmp_path / "run"), steps=3)
    opt = engine.optimizer
    assert len(opt.bit16_groups) == 4  # decay, no_decay, router, experts
    for i, group in enumerate(opt.bit16_groups):
        flat = opt.single_partition_of_fp32_groups[i]
        state = opt.optimizer.state[flat]
        assert layout_free.state_keys(opt, i) == ["exp_avg", "exp_avg_sq"]
        rebuilt = {k: torch.zeros_like(flat) for k in ("fp32", "exp_avg", "exp_avg_sq")}
        covered = 0
        for p in group:
            m = p._hp_mapping
            master = layout_free.gather(opt, p, "fp32", dst=0)
            assert torch.equal(master, safe_get_full_fp32_param(p))
            for key in ("exp_avg", "exp_avg_sq"):
                full = layout_free.gather(opt, p, key, dst=0)
                if i == 0:  # DeepSpeed's own getter works for the first group only
                    assert torch.equal(full, safe_get_full_optimizer_state(p, key))
                else:  # the 0.19.8 bug this path exists for (stage_1_and_2.py _optimizer_step)
                    with pytest.raises(ValueError, match=f"{key} not found in optimizer state fragment"):
                        safe_get_full_optimizer_state(p, key)
                rebuilt[key].narrow(0, m.hp_fragment_address.start, p.numel()).copy_(full.flatten())
            rebuilt["fp32"].narrow(0, m.hp_fragment_address.start, p.numel()).copy_(master.flatten())
            covered += p.numel()
        assert torch.equal(rebuilt["fp32"], flat.detach())
        assert torch.equal(rebuilt["exp_avg"], state["exp_avg"]) and torch.equal(
            rebuilt["exp_avg_sq"], state["exp_avg_sq"]
        )
        assert state["exp_avg_sq"].abs().sum() > 0 and flat.numel() - covered < 64  # only alignment padding uncovered


def test_writers_are_balanced_and_batches_bounded(monkeypatch):
    """Each parameter goes to the least-loaded rank that holds it (ties: the lowest rank); batches
    close before BATCH_BYTES, a larger parameter alone."""
    p = {n: torch.nn.Parameter(torch.zeros(n)) for n in (100, 60, 50, 40, 10)}
    params = [("a", p[100], [0, 1]), ("b", p[60], [0, 1]), ("c", p[50], [0, 1]), ("e1", p[40], [1, 3]),
              ("e0", p[10], [0, 2])]  # fmt: skip
    assert layout_free.owners(params, 4) == {"a": 0, "b": 1, "c": 1, "e1": 3, "e0": 2}
    monkeypatch.setattr(layout_free, "BATCH_BYTES", 500)
    cut = layout_free.batches(params, {id(p[100]): 3})  # bytes: 1200 (3 tensors), 240, 200, 160, 40
    assert [[n for n, _, _ in b] for b in cut] == [["a"], ["b", "c"], ["e1", "e0"]]


def test_round_trip_through_a_checkpoint_without_native_files(dist_world, tiny_setup, tmp_path, monkeypatch):
    """checkpoint.save, DeepSpeed's native files deleted, checkpoint.load into a fresh engine (the
    layout-free path, file by file verified): saving again gives the same files, and the next step
    the same loss and weights as the original engine. Batches of 64 KB: many batches."""
    monkeypatch.setattr(layout_free, "BATCH_BYTES", 64 * 1024)
    cfg = _cfg(tiny_setup, tmp_path / "run")
    engine = _engine(cfg, steps=3)
    root = tmp_path / "ckpt"
    layout = {"world_size": 1, "ep_size": 1, "dp_size": 1, "expert_dp_size": 1, "zero_stage": 2}
    saved = checkpoint.save(engine, root, 3, {"layout": layout}, rank=0)
    folder = saved["folder"]
    manifest = checkpoint.read_manifest(folder)
    free = sorted(rel for rel in manifest if rel.startswith("layout_free/"))
    assert (
        len(free) == 2 * (4 + 2 + 1 + 3 * 8) + 3 + 1
    )  # per layer: attention, norms, router, experts; then embeddings, norm, head; index
    for f in folder.glob("*.pt"):
        if not f.name.startswith("ds_upcycle_"):
            f.unlink()  # DeepSpeed's native model and optimizer files: gone
    checkpoint.verify(folder)  # still complete: the layout-free part stands in for them

    fresh = _engine(cfg, steps=0)
    state = checkpoint.load(fresh, root, rank=0, layout=layout)
    assert state["resume_mode"] == "layout_free" and set(free) <= set(state["verified_files"])
    again = checkpoint.save(fresh, tmp_path / "again", 3, {"layout": layout}, rank=0)["folder"]
    for rel in free:
        if rel.endswith(".safetensors"):
            a, b = load_file(folder / rel), load_file(again / rel)
            assert a.keys() == b.keys() == {"fp32", "exp_avg", "exp_avg_sq"}
            assert all(torch.equal(a[k], b[k]) for k in a), rel
    assert json.loads((again / layout_free.INDEX).read_text()) == json.loads((folder / layout_free.INDEX).read_text())
    index = json.loads((folder / layout_free.INDEX).read_text())
    assert index["optimizer"]["step"] == 3 and index["scheduler"]["last_epoch"] == 3
    assert index["engine"] == {"global_steps": 3, "global_samples": 12, "skipped_steps": 0}

    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))
    for e in (engine, fresh):
        loss = e(input_ids=ids, labels=ids).loss
        e.backward(loss)
        e.step()
        e.last_loss = loss.item()
    assert engine.last_loss == fresh.last_loss
    assert engine.lr_scheduler.get_last_lr() == fresh.lr_scheduler.get_last_lr()
    for (n, a), (_, b) in zip(engine.module.named_parameters(), fresh.module.named_parameters(), strict=True):
        assert torch.equal(a, b), n

    shutil.rmtree(folder / "layout_free")  # neither form complete: named
    with pytest.raises(ValueError, match=r"layout_free/index.json is missing"):
        checkpoint.load(fresh, root, rank=0, layout=layout)


def _fake_checkpoint(root, global_batch=8, micro=4, accum=1, world=2):
    folder = root / "checkpoints" / checkpoint.tag_for(10)
    folder.mkdir(parents=True)
    layout = {
        "world_size": world,
        "ep_size": 2,
        "micro_batch": micro,
        "grad_accum": accum,
        "global_batch": global_batch,
    }
    (folder / checkpoint.STATE).write_text(json.dumps({"step": 10, "layout": layout}))
    (root / "checkpoints" / checkpoint.LATEST).write_text(folder.name)


def test_resume_keeps_the_global_batch(tiny_setup, tmp_path):
    """Checked before any rank starts (preflight), with the fix for the new number of ranks."""
    out = tmp_path / "run"
    _fake_checkpoint(out)
    base = [f"--model.path={tiny_setup['model']}", f'--data.train=["{tiny_setup["train"]}"]',
            "--data.eval=[]", f"--train.output_dir={out}", "--train.resume=true", "--moe.ep_size=1"]  # fmt: skip

    def check(world: int, *extra: str):
        return validate(load_run_config(DEBUG_CONFIG, [*base, *extra]), world)

    with pytest.raises(
        ValueError,
        match=r"train.resume: checkpoint step_00000010 trained with a global batch of 8 sequences per step "
        r"\(train_micro_batch_size_per_gpu 4 x gradient_accumulation_steps 1 x 2 ranks\) but this run's is 4 "
        r"\(4 x 1 x 1 ranks\); .* 2 -> 1 ranks: set gradient_accumulation_steps to 2 "
        r"\(--ds.gradient_accumulation_steps=2\)",
    ):
        check(1)
    assert check(1, "--ds.gradient_accumulation_steps=2").accum == 2
    assert check(2, "--ds.train_micro_batch_size_per_gpu=2", "--ds.gradient_accumulation_steps=2").global_batch == 8
    with pytest.raises(ValueError, match=r"2 -> 3 ranks: launch a number of ranks that divides 8"):
        check(3, "--ds.train_micro_batch_size_per_gpu=1")
    with pytest.raises(ValueError, match=r"2 -> 4 ranks: make train_micro_batch_size_per_gpu x "
                                         r"gradient_accumulation_steps 2 per rank"):  # fmt: skip
        check(4, "--moe.ep_size=4")
