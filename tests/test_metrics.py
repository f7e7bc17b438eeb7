"""Router statistics and the LR schedule: exact values on hand-made inputs."""

import math

import pytest
import torch

from ds_upcycle.metrics import mfu, router_metrics, router_stats
from ds_upcycle.train import lr_lambda


def test_balanced_router():
    s = router_stats(torch.tensor([5.0, 5.0, 5.0, 5.0]), dead_threshold=0.1)
    assert s["max_over_mean"] == pytest.approx(1.0) and s["cv"] == pytest.approx(0.0)
    assert s["entropy"] == pytest.approx(1.0) and s["dead_frac"] == 0.0
    assert sum(s[f"expert_{e:02d}"] for e in range(4)) == pytest.approx(1.0)


def test_collapsed_router():
    s = router_stats(torch.tensor([0.0, 0.0, 0.0, 12.0]), dead_threshold=0.1)
    assert s["max_over_mean"] == pytest.approx(4.0) and s["entropy"] == pytest.approx(0.0)
    assert s["dead_frac"] == pytest.approx(0.75)


def test_router_metrics_keys_and_drop_fraction():
    counts = torch.tensor([[3.0, 1.0], [2.0, 2.0]])
    m = router_metrics([0, 5], counts, torch.tensor([1.0, 0.0]), 0.1)
    assert m["router/layer_00/drop_frac"] == pytest.approx(0.25)
    assert m["router/layer_05/max_over_mean"] == pytest.approx(1.0)
    assert m["router/max_over_mean_worst"] == pytest.approx(1.5)


def test_mfu():
    assert mfu(6e9, 1000.0, 1.0) == pytest.approx(6.0)  # 6 TFLOP/s achieved on a 1 TFLOP/s peak


def test_warmup_then_cosine():
    f = lr_lambda(warmup=4, total=14, min_ratio=0.01)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == pytest.approx(1.0) and f(14) == pytest.approx(0.01) and f(100) == pytest.approx(0.01)
    assert f(9) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
