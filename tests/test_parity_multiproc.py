"""Online upcycling under expert parallelism: 2 real ranks through the `deepspeed` launcher."""

import json

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant, top_k", [("gqa", 2), ("tied", 4)])
def test_two_rank_ep2_upcycling_is_exact(launcher, tmp_path, variant, top_k):
    out = tmp_path / "parity.json"
    proc = launcher(
        "ds_upcycle.tools.check",
        [
            "--tiny",
            variant,
            f"--moe.top_k={top_k}",
            "--moe.ep_size=2",
            "--json",
            str(out),
        ],
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["ep_size"] == 2
    assert result["local_experts_per_layer"] == 4  # each rank holds only its half
    assert result["router_identical_across_ranks"]
    assert result["max_abs_diff"] <= 1e-5


def test_two_rank_negative_control_fails(launcher, tmp_path):
    out = tmp_path / "parity.json"
    proc = launcher("ds_upcycle.tools.check", ["--moe.top_k=1", "--moe.ep_size=2", "--json", str(out)])
    assert proc.returncode != 0
    assert json.loads(out.read_text())["max_abs_diff"] > 1e-3
