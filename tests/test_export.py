"""Export and conversion: HF Mixtral from `transformers` reproduces our model's (or the dense
model's) logits; bad input is refused and never leaves a half-written model behind."""

import json
import shutil

import pytest
import torch
from transformers import LlamaForCausalLM, MixtralForCausalLM

from ds_upcycle.checkpoint import load_moe_model
from ds_upcycle.cli import main as cli
from ds_upcycle.config import MoEConfig
from ds_upcycle.export import upcycle_offline
from ds_upcycle.mixtral import check_representable
from ds_upcycle.moe import attach_process_groups
from ds_upcycle.tools.tiny import VARIANTS, tiny_llama_config


def _probe(vocab, seed=0):
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(seed))


def _max_diff(a, b, ids):
    with torch.no_grad():
        return (a(ids).logits - b(ids).logits).abs().max().item()


# -- trained checkpoints (real 2-rank and 1-rank runs through the launcher) ------------------


@pytest.fixture(scope="module")
def trained(tiny_setup, tmp_path_factory):
    """{name: run folder}: ep 2 on 2 ranks (untied, all layers), and ep 1 on 1 rank (tied,
    rope_scaling, head_dim != hidden/heads, MoE on layer 0 only)."""
    from conftest import train

    from ds_upcycle.tools.tiny import write_tiny_setup

    base = tmp_path_factory.mktemp("export")
    tied = write_tiny_setup(base / "tied_setup", variant="tied", head_dim=32,
                            rope_scaling={"rope_type": "linear", "factor": 2.0})  # fmt: skip
    runs = {
        "ep2_untied": (tiny_setup, 2, {}),
        "ep1_tied_partial": (tied, 1, {"moe.ep_size": 1, "moe.moe_layers": [0]}),
    }
    out = {}
    for name, (setup, nprocs, extra) in runs.items():
        run = base / name
        proc = train(setup, run, nprocs=nprocs, **{"train.steps": 3, **extra})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out[name] = run
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name, flags", [("ep2_untied", []), ("ep1_tied_partial", ["--expand-dense-layers"])])
def test_export_parity(dist_world, trained, tmp_path, name, flags):
    out = tmp_path / "mixtral"
    assert cli(["export", str(trained[name]), str(out), "--dtype", "fp32", *flags]) == 0
    ours, _, _ = load_moe_model(trained[name])
    attach_process_groups(ours)
    theirs = MixtralForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    diff = _max_diff(ours, theirs, _probe(ours.config.vocab_size))
    print(f"export parity {name}: max |delta logits| = {diff:.3e}")
    assert diff <= 1e-4
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "model.safetensors",
    }


@pytest.mark.slow
def test_export_config_carries_the_llama_config(trained, tmp_path):
    out = tmp_path / "mixtral"
    assert cli(["export", str(trained["ep1_tied_partial"]), str(out), "--expand-dense-layers"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["rope_theta"] == 10000.0
    assert cfg["rope_parameters"]["factor"] == 2.0
    assert cfg["head_dim"] == 32 and cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 4
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (8, 2)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["dtype"] == "float32"


@pytest.mark.slow
def test_partial_moe_is_refused_without_expansion(trained, tmp_path, capsys):
    assert cli(["export", str(trained["ep1_tied_partial"]), str(tmp_path / "m")]) == 2
    assert "makes only 1 of 2 layers MoE; Mixtral has an MoE block in every layer" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_export_bad_inputs(trained, tmp_path, capsys):
    run = trained["ep2_untied"]
    assert cli(["export", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # an output folder that already holds a model is never overwritten silently
    out = tmp_path / "exists"
    assert cli(["export", str(run), str(out)]) == 0
    before = (out / "config.json").read_text()
    assert cli(["export", str(run), str(out)]) == 2
    assert "already holds a model; choose another folder or pass --overwrite" in capsys.readouterr().err
    assert (out / "config.json").read_text() == before
    assert cli(["export", str(run), str(out), "--overwrite", "--dtype", "bf16"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # an unsupported dtype
    with pytest.raises(SystemExit) as e:
        cli(["export", str(run), str(tmp_path / "o2"), "--dtype", "int8"])
    assert e.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    # a checkpoint without its expert files: read from its layout-free part; without that too, refused
    broken = tmp_path / "no_experts"
    shutil.copytree(run / "checkpoints", broken)
    step = broken / (broken / "latest_complete").read_text()
    for f in step.glob("layer_*_expert_*"):
        f.unlink()
    assert cli(["export", str(broken), str(tmp_path / "o3")]) == 0
    shutil.rmtree(step / "layout_free")
    assert cli(["export", str(broken), str(tmp_path / "o4")]) == 2
    assert "layer_0_expert_0_mp_rank_00_model_states.pt is missing" in capsys.readouterr().err
    # a failure midway (an unreadable tokenizer in the source) leaves no output that looks complete
    src = tmp_path / "bad_source"
    shutil.copytree(json.loads((run / "config.json").read_text())["ds_upcycle"]["model"]["path"], src)
    (src / "tokenizer.json").write_text("{not json")
    (src / "tokenizer_config.json").write_text("{not json")
    assert cli(["export", str(run), str(tmp_path / "o4"), "--source", str(src)]) == 2
    assert not (tmp_path / "o4").exists() and not list(tmp_path.glob(".o4.partial-*"))


def test_inexact_settings_are_refused_or_loud():
    cfg = tiny_llama_config()
    with pytest.raises(ValueError, match=r"moe.top_k is 1: DeepSpeed scales the chosen expert .*--allow-inexact"):
        check_representable(cfg, MoEConfig(top_k=1), allow_inexact=False)
    with pytest.raises(ValueError, match=r"moe.drop_tokens was true in training: Mixtral never drops tokens"):
        check_representable(cfg, MoEConfig(drop_tokens=True), allow_inexact=False)
    assert len(check_representable(cfg, MoEConfig(top_k=1, drop_tokens=True), allow_inexact=True)) == 2
    with pytest.raises(ValueError, match=r"attention_bias=True; Mixtral has no biases"):
        check_representable(tiny_llama_config(attention_bias=True), MoEConfig(), allow_inexact=True)


# -- offline conversion ------------------------------------------------------------------------


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_offline_upcycle_reproduces_the_dense_model(tmp_path, variant):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(variant, bos_token_id=1, eos_token_id=2)).eval()
    dense.save_pretrained(tmp_path / "dense", safe_serialization=True)
    upcycle_offline(tmp_path / "dense", tmp_path / "moe", MoEConfig(), progress=False)
    moe = MixtralForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    ids = _probe(dense.config.vocab_size)
    diff = _max_diff(dense, moe, ids)
    print(f"conversion parity {variant}: max |delta logits| = {diff:.3e}")
    assert diff <= 1e-5
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(dense.generate(ids[:, :8], **kwargs), moe.generate(ids[:, :8], **kwargs))


def test_trainer_start_from_mixtral_equals_online_upcycling(dist_world, tmp_path, tiny_llama):
    from ds_upcycle.mixtral import load_mixtral_as_moe
    from ds_upcycle.upcycle import upcycle

    dense = tiny_llama()
    dense.save_pretrained(tmp_path / "dense", safe_serialization=True)
    assert cli(["upcycle", str(tmp_path / "dense"), str(tmp_path / "moe"), "--no-progress"]) == 0
    cfg = MoEConfig(ep_size=2)
    for rank in (0, 1):  # each expert-parallel rank reads only its own experts
        from_mixtral = load_mixtral_as_moe(tmp_path / "moe", cfg, ep_rank=rank)
        online = upcycle(tiny_llama(), cfg, ep_rank=rank)
        a, b = from_mixtral.state_dict(), online.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_offline_upcycle_refuses_bad_sources(tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    assert cli(["upcycle", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "dense model ('" in capsys.readouterr().err
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    assert cli(["upcycle", str(tmp_path / "gpt2"), str(tmp_path / "o")]) == 2
    assert "is GPT2LMHeadModel with hidden_act=None; upcycle supports dense LlamaForCausalLM" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_gives_the_same_perplexity_for_checkpoint_and_export(trained, tiny_setup, tmp_path):
    from ds_upcycle.evaluate import main as eval_main

    run, exported = trained["ep2_untied"], tmp_path / "mixtral"
    assert cli(["export", str(run), str(exported), "--dtype", "fp32"]) == 0
    results = {}
    for name, model in (("checkpoint", run), ("export", exported), ("dense", tiny_setup["model"])):
        out = tmp_path / f"{name}.json"
        assert eval_main([str(model), "--data", tiny_setup["eval"], "--seq-len", "64", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())
    assert (
        results["checkpoint"]["kind"] == "ds_upcycle checkpoint" and results["export"]["kind"] == "MixtralForCausalLM"
    )
    assert results["checkpoint"]["ppl"] == pytest.approx(results["export"]["ppl"], rel=1e-5)
    assert results["checkpoint"]["tokens"] == results["dense"]["tokens"] > 0
