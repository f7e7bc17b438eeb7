"""Bad input, tried as a careless user would: every case exits non-zero with one `error:` line that
names the field, flag or file, no traceback, and leaves the user's files byte-identical. All of
them fail before any rank starts (they run in-process and take seconds)."""

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import DEBUG_CONFIG, debug_overrides

from ds_upcycle.cli import main as cli


def tree_hash(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tiny_setup, tmp_path_factory):
    """The user's files: a good model and corpus, broken model folders, a folder of notes, a run."""
    root = tmp_path_factory.mktemp("bad_input")
    good = Path(tiny_setup["model"])

    def model_variant(name: str, edit) -> str:
        folder = root / "models" / name
        shutil.copytree(good, folder)
        edit(folder)
        return str(folder)

    def set_config(**changes):
        def edit(folder):
            cfg = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**cfg, **changes}))

        return edit

    def truncate(folder):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])

    models = {
        "bad_json": model_variant("bad_json", lambda f: (f / "config.json").write_text("{not json")),
        "gpt2": model_variant("gpt2", set_config(model_type="gpt2", architectures=["GPT2LMHeadModel"])),
        "zero_layers": model_variant("zero_layers", set_config(num_hidden_layers=0)),
        "neg_heads": model_variant("neg_heads", set_config(num_attention_heads=-4)),
        "small_vocab": model_variant("small_vocab", set_config(vocab_size=10)),
        "truncated": model_variant("truncated", truncate),
        "garbage": model_variant("garbage", lambda f: (f / "model.safetensors").write_bytes(b"\xff" * 64)),
        "no_tokenizer": model_variant(
            "no_tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]
        ),
    }
    notes = root / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    data = root / "data"
    data.mkdir()
    (data / "corpus.csv").write_text("a,b\n")
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    hostfiles = root / "hostfiles"
    hostfiles.mkdir()
    (hostfiles / "huge").write_text("localhost slots=4000000000\n")
    plan_cfg = root / "plan"
    plan_cfg.mkdir()
    base = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=256)  # fmt: skip
    (plan_cfg / "neg.json").write_text(json.dumps({**base, "hidden_size": -64}))
    (plan_cfg / "zero_layers.json").write_text(json.dumps({**base, "num_hidden_layers": 0}))
    (plan_cfg / "broken.json").write_text("{")
    (plan_cfg / "ok.json").write_text(json.dumps(base))
    return {"root": root, "good": str(good), "models": models, "notes": notes, "data": data, "run": run,
            "hostfiles": hostfiles, "plan": plan_cfg, "setup": tiny_setup}  # fmt: skip


def train_args(w, out=None, **overrides) -> list[str]:
    out = out or w["root"] / "fresh_run"
    return ["train", str(DEBUG_CONFIG), "--num-gpus", "2", *debug_overrides(w["setup"], out, **overrides)]


def write_json(w, name, obj) -> str:
    path = w["root"] / "configs" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


# (id, argv builder, exit code, pattern the message must match)
CASES = [
    # -- the run config file
    ("config_is_folder", lambda w: ["train", str(w["notes"])], 2, r"is a folder"),
    ("config_missing", lambda w: ["train", str(w["root"] / "nope.json")], 2, r"nope.json' does not exist"),
    ("config_not_json", lambda w: ["train", write_json(w, "bad.json", "{oops")], 2, r"bad.json' is not valid JSON"),
    ("config_a_list", lambda w: ["train", write_json(w, "list.json", [1])], 2, r"list.json' must hold a JSON object"),
    ("config_plain_deepspeed", lambda w: ["train", write_json(w, "ds.json", {"train_micro_batch_size_per_gpu": 1})],
     2, r"has no 'ds_upcycle' section"),
    ("unknown_section", lambda w: train_args(w, **{"foo.bar": 1}), 2, r"--foo.bar names no setting"),
    ("unknown_setting", lambda w: train_args(w, **{"moe.num_expert": 4}), 2, r"moe.num_expert is not a known setting"),
    # -- the DeepSpeed part
    ("ds_typo", lambda w: train_args(w, **{"ds.zero_optimisation": {"stage": 2}}), 2,
     r"'zero_optimisation' .*did you mean 'zero_optimization'"),
    ("ds_section_scalar", lambda w: train_args(w, **{"ds.optimizer": 3}), 2, r"section optimizer \(3\) must be a JSON"),
    ("ds_string_stage", lambda w: train_args(w, **{"ds.zero_optimization.stage": "two"}), 2,
     r"zero_optimization.stage \('two'\) must be 1 or 2"),
    ("ds_bool_batch", lambda w: train_args(w, **{"ds.train_micro_batch_size_per_gpu": True}), 2,
     r"train_micro_batch_size_per_gpu \(True\) must be a positive integer"),
    ("ds_nan_lr", lambda w: train_args(w, **{"ds.optimizer.params.lr": "NaN"}), 2,
     r"optimizer.params.lr \(nan\) must be a finite number"),
    ("ds_inf_clip", lambda w: train_args(w, **{"ds.gradient_clipping": "Infinity"}), 2, r"gradient_clipping \(inf\)"),
    ("ds_unknown_optimizer", lambda w: train_args(w, **{"ds.optimizer.type": "Adamm"}), 2,
     r"optimizer.type \('Adamm'\) is not an optimizer DeepSpeed builds"),
    ("ds_bad_betas", lambda w: train_args(w, **{"ds.optimizer.params.betas": [0.9]}), 2, r"optimizer.params.betas"),
    ("ds_zero3", lambda w: train_args(w, **{"ds.zero_optimization.stage": 3}), 2, r"zero_optimization.stage \(3\)"),
    ("ds_bf16_not_bool", lambda w: train_args(w, **{"ds.bf16.enabled": "yes"}), 2, r"bf16.enabled \('yes'\)"),
    # -- the model folder
    ("model_missing", lambda w: train_args(w, **{"model.path": str(w["root"] / "none")}), 2, r"model.path .* is not a folder"),
    ("model_bad_json", lambda w: train_args(w, **{"model.path": w["models"]["bad_json"]}), 2,
     r"config.json is not valid JSON"),
    ("model_unsupported", lambda w: train_args(w, **{"model.path": w["models"]["gpt2"]}), 2,
     r"is a 'gpt2' model; training supports llama"),
    ("model_zero_layers", lambda w: train_args(w, **{"model.path": w["models"]["zero_layers"]}), 2,
     r"num_hidden_layers \(0\) must be a positive integer"),
    ("model_negative_heads", lambda w: train_args(w, **{"model.path": w["models"]["neg_heads"]}), 2,
     r"num_attention_heads \(-4\) must be a positive integer"),
    ("model_truncated_weights", lambda w: train_args(w, **{"model.path": w["models"]["truncated"]}), 2,
     r"model.safetensors is truncated"),
    ("model_garbage_weights", lambda w: train_args(w, **{"model.path": w["models"]["garbage"]}), 2,
     r"model.safetensors is not a readable safetensors file"),
    ("model_no_tokenizer", lambda w: train_args(w, **{"model.path": w["models"]["no_tokenizer"]}), 2,
     r"has no tokenizer"),
    ("model_vocab_below_tokenizer", lambda w: train_args(w, **{"model.path": w["models"]["small_vocab"]}), 2,
     r"the tokenizer has \d+ tokens but config.json vocab_size is 10"),
    ("seq_len_over_max", lambda w: train_args(w, **{"data.seq_len": 4096}), 2, r"max_position_embeddings \(256\)"),
    # -- the data
    ("data_missing", lambda w: train_args(w, **{"data.train": [str(w["root"] / "nope.txt")]}), 2, r"matches no file"),
    ("data_folder", lambda w: train_args(w, **{"data.train": [str(w["data"])]}), 2, r"is a folder; give files"),
    ("data_suffix", lambda w: train_args(w, **{"data.train": [str(w["data"] / "corpus.csv")]}), 2,
     r"unsupported suffix '.csv'"),
    # -- the output folder
    ("output_is_file", lambda w: train_args(w, out=w["notes"] / "notes.txt"), 2, r"output_dir .* is a file"),
    ("output_holds_run", lambda w: train_args(w, out=w["run"]), 2, r"already holds a run; continue it with --train.resume"),
    ("output_inside_model", lambda w: train_args(w, out=Path(w["good"]) / "out"), 2, r"is inside model.path"),
    # -- sizes
    ("huge_experts", lambda w: train_args(w, **{"moe.num_experts": 2**40}), 2, r"moe.num_experts \(1099511627776\) must be <= 4096"),
    ("topk_over_experts", lambda w: train_args(w, **{"moe.top_k": 9}), 2, r"moe.top_k \(9\) must be <= moe.num_experts"),
    ("fractional_layers", lambda w: train_args(w, **{"moe.moe_layers": [0.5]}), 2, r"moe.moe_layers"),
    ("negative_layers", lambda w: train_args(w, **{"moe.moe_layers": [-1]}), 2, r"must be layer indices: integers >= 0"),
    ("num_gpus_zero", lambda w: ["train", str(DEBUG_CONFIG), "--num-gpus", "0"], 2, r"--num-gpus \(0\) must be between"),
    ("num_gpus_huge", lambda w: ["train", str(DEBUG_CONFIG), "--num-gpus", "4000000000"], 2, r"--num-gpus \(4000000000\)"),
    ("hostfile_folder", lambda w: ["train", str(DEBUG_CONFIG), "--hostfile", str(w["notes"])], 2, r"hostfile .* is a folder"),
    ("hostfile_huge_slots", lambda w: ["train", str(DEBUG_CONFIG), "--hostfile", str(w["hostfiles"] / "huge")], 2,
     r"has more than 1024 slots"),
    # -- plan
    ("plan_world_zero", lambda w: ["plan", str(w["plan"] / "ok.json"), "--world-size", "0"], 2, r"world_size \(0\) must be >= 1"),
    ("plan_negative_width", lambda w: ["plan", str(w["plan"] / "neg.json")], 2, r"hidden_size \(-64\) must be a positive"),
    ("plan_zero_layers", lambda w: ["plan", str(w["plan"] / "zero_layers.json")], 2, r"num_hidden_layers \(0\)"),
    ("plan_broken_json", lambda w: ["plan", str(w["plan"] / "broken.json")], 2, r"config.json is not valid JSON"),
    ("plan_fractional_layers", lambda w: ["plan", str(w["plan"] / "ok.json"), "--moe.moe_layers=[1.5]"], 2, r"moe.moe_layers"),
    ("plan_seq_zero", lambda w: ["plan", str(w["plan"] / "ok.json"), "--seq-len", "0"], 2, r"seq_len \(0\) must be >= 1"),
    ("plan_not_moe_flag", lambda w: ["plan", str(w["plan"] / "ok.json"), "--train.steps=3"], 2, r"is not a MoE setting"),
    # -- eval
    ("eval_seq_over_max", lambda w: ["eval", w["good"], "--data", w["setup"]["eval"], "--seq-len", "9999"], 2,
     r"--seq-len \(9999\) is above the model's max_position_embeddings \(256\)"),
    ("eval_batch_zero", lambda w: ["eval", w["good"], "--data", w["setup"]["eval"], "--batch", "0"], 2, r"--batch \(0\)"),
    ("eval_negative_batches", lambda w: ["eval", w["good"], "--data", w["setup"]["eval"], "--max-batches", "-1"], 2,
     r"--max-batches \(-1\)"),
    ("eval_missing_data", lambda w: ["eval", w["good"], "--data", str(w["root"] / "x.txt")], 2, r"--data .* matches no file"),
    ("eval_missing_model", lambda w: ["eval", str(w["root"] / "none"), "--data", w["setup"]["eval"]], 2, r"is not a folder"),
    # -- upcycle and check
    ("upcycle_into_source", lambda w: ["upcycle", w["good"], w["good"], "--overwrite", "--no-progress"], 2,
     r"output .* is the dense model"),
    ("upcycle_inside_source", lambda w: ["upcycle", w["good"], str(Path(w["good"]) / "moe"), "--no-progress"], 2,
     r"output .* is inside the dense model"),
    ("upcycle_over_notes", lambda w: ["upcycle", w["good"], str(w["notes"]), "--overwrite", "--no-progress"], 2,
     r"holds files this tool did not write \(notes.txt\)"),
    ("upcycle_bad_moe", lambda w: ["upcycle", w["good"], str(w["root"] / "m"), "--moe.top_k=0"], 2, r"moe.top_k \(0\) must be > 0"),
    ("check_bad_moe", lambda w: ["check", "--moe.num_experts=6", "--moe.ep_size=4"], 2,
     r"moe.num_experts \(6\) must be divisible by moe.ep_size \(4\)"),
    ("check_missing_model", lambda w: ["check", "--model", str(w["root"] / "none")], 2, r"--model .* is not a folder"),
    ("configs_unknown", lambda w: ["configs", "--path", "nope"], 2, r"config file 'nope' does not exist"),
    # -- demo
    ("demo_bad_layers", lambda w: ["demo", "--out", str(w["root"] / "demo"), "--model", w["good"], "--moe-layers", "[9]"],
     2, r"--moe-layers \('\[9\]'\) is not a layer selection"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_clear_message_and_changes_nothing(world, case, capsys, monkeypatch):
    _, argv, code, pattern = case
    monkeypatch.setenv("WANDB_MODE", "disabled")
    args = argv(world)  # may write the bad file the case needs
    before = tree_hash(world["root"])
    try:
        rc = cli(args)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    out = capsys.readouterr()
    text = out.out + out.err
    assert rc == code, text[-2000:]
    assert "Traceback" not in text
    assert re.search(pattern, out.err), out.err[-2000:]
    assert tree_hash(world["root"]) == before
    assert not (world["root"] / "fresh_run").exists()  # nothing started, nothing written


def test_wandb_online_without_login_fails_before_launch(world, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert cli(train_args(world, **{"log.wandb": "online"})) == 2
    assert "log.wandb ('online') needs a W&B login" in capsys.readouterr().err


# -- data loss: the three cases the issue reproduced, now prevented ------------------------------


@pytest.fixture(scope="module")
def finished_run(reference_run, tmp_path_factory):
    """A copy of a real finished 2-rank run (checkpoints at steps 10 and 20)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    shutil.copytree(reference_run, run)
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, pattern",
    [
        (lambda run: run, r"is the checkpoint's run folder"),
        (lambda run: run / "checkpoints" / "export", r"is inside the checkpoint's run folder"),
        (lambda run: run.parent, r"contains the checkpoint's run folder"),
    ],
    ids=["run_itself", "inside_run", "around_run"],
)
def test_export_never_overwrites_its_own_run(finished_run, capsys, target, pattern):
    before = tree_hash(finished_run)
    assert cli(["export", str(finished_run), str(target(finished_run)), "--overwrite", "--no-progress"]) == 2
    assert re.search(pattern, capsys.readouterr().err)
    assert tree_hash(finished_run) == before


@pytest.mark.slow
def test_export_overwrite_replaces_only_a_model_folder(finished_run, tmp_path, capsys):
    notes = tmp_path / "mine"
    notes.mkdir()
    (notes / "notes.txt").write_text("precious")
    assert cli(["export", str(finished_run), str(notes), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds files this tool did not write (notes.txt)" in err and "pass --overwrite" not in err
    assert (notes / "notes.txt").read_text() == "precious"
    out = tmp_path / "model"
    assert cli(["export", str(finished_run), str(out), "--no-progress"]) == 0
    assert cli(["export", str(finished_run), str(out), "--overwrite", "--no-progress"]) == 0  # a model: replaced


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, pattern, code",
    [("size=64k", r"no space left on the device", 4), ("ro,size=1m", r"read-only file system", 4)],
    ids=["full_disk", "read_only"],
)
def test_export_to_a_full_or_read_only_disk(finished_run, tmp_path, capsys, options, pattern, code):
    """A small disk (tmpfs of 64 KiB) and a read-only one: one message, exit 4, nothing half-written."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, options):
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN)")
    try:
        assert cli(["export", str(finished_run), str(disk / "model"), "--no-progress"]) == code
        err = capsys.readouterr().err
        assert re.search(pattern, err) and "Traceback" not in err, err
        assert not any(disk.iterdir())  # the partial export was removed
    finally:
        subprocess.run(["umount", str(disk)], check=True)
