"""`ds-upcycle` entry points: help texts, `plan`'s table, and its validation."""

import json

import pytest

from ds_upcycle.cli import COMMANDS, main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert f"ds-upcycle {name}" in capsys.readouterr().out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


LLAMA3_8B = dict(
    model_type="llama",
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)


def test_plan_llama3_8b_shape(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA3_8B))
    assert main(["plan", str(cfg), "--moe.ep_size=8", "--world-size", "8", "--seq-len", "8192", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["dense_total_params"] == 8_030_261_248  # Llama-3-8B's published parameter count
    # 8 experts x 32 layers x 3 x 4096 x 14336 MLP weights, plus routers, replace 32 dense MLPs.
    assert d["moe_total_params"] == 8_030_261_248 + 32 * 7 * 3 * 4096 * 14336 + 32 * 8 * 4096
    assert d["moe_active_params"] == 8_030_261_248 + 32 * 3 * 4096 * 14336 + 32 * 8 * 4096
    assert main(["plan", str(cfg), "--moe.ep_size=8", "--world-size", "8"]) == 0
    table = capsys.readouterr().out
    assert "| total parameters" in table and "Adam state per rank" in table


def test_plan_refuses_bad_layouts(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(LLAMA3_8B))
    assert main(["plan", str(cfg), "--moe.ep_size=3"]) == 2
    assert "moe.num_experts (8) must be divisible by moe.ep_size (3)" in capsys.readouterr().err
    assert main(["plan", str(cfg), "--moe.ep_size=4", "--world-size", "6"]) == 2
    assert "world_size (6) must be divisible by moe.ep_size (4)" in capsys.readouterr().err
    assert main(["plan", str(tmp_path / "missing")]) == 2
    assert "model ('" in capsys.readouterr().err
