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


def test_every_window_value_covers_the_whole_window():
    """Three steps in one logging window: tokens/s is the window's tokens over its time (not the last
    step's), the grad norm the mean over applied steps, the loss the mean over counted micro-batches."""
    from ds_upcycle.metrics import StepWindow, window_metrics

    w = StepWindow()
    w.add([4.0, 2.0, 0.0], 2, 1.0, True, 1.0, 0.5)
    w.add([0.0, 0.0, 0.0], 0, math.inf, False, 2.0, 0.5)  # skipped by DeepSpeed; both micro-batches NaN
    w.add([2.0, 1.0, 0.0], 1, 3.0, True, 3.0, 0.5)
    assert w.mean_losses() == pytest.approx([2.0, 1.0, 0.0])
    m = window_metrics(w, tokens_per_step=100, world=2, flops_per_token=6e9, peak=1.0)
    assert m["throughput/tokens_per_s"] == pytest.approx(300 / 6) and m["throughput/step_time_s"] == pytest.approx(2)
    assert m["throughput/tokens_per_s_per_device"] == pytest.approx(25) and m["train/window_steps"] == 3
    assert m["throughput/mfu"] == pytest.approx(mfu(6e9, 25, 1.0)) and m["throughput/optimizer_s"] == pytest.approx(0.5)
    assert m["optim/grad_norm"] == pytest.approx(2.0)
    empty = StepWindow()
    empty.add([0.0, 0.0, 0.0], 0, math.inf, False, 1.0, 0.0)
    assert all(math.isnan(x) for x in empty.mean_losses())
    assert math.isnan(window_metrics(empty, 100, 1, 6e9, 1.0)["optim/grad_norm"])


@pytest.mark.parametrize(
    "every, drawn",
    [(0, [7]), (3, [1, 3, 6, 7]), (7, [1, 7]), (-1, [])],
)
def test_heatmaps_include_the_last_step(every, drawn):
    from ds_upcycle.train import heatmap_due

    assert [d for d in range(1, 8) if heatmap_due(d, d == 7, every)] == drawn


def test_heatmap_every_must_be_a_multiple_of_log_every():
    from ds_upcycle.config import LogConfig

    with pytest.raises(ValueError, match=r"log.heatmap_every \(5\) must be a multiple of log.every \(2\)"):
        LogConfig(every=2, heatmap_every=5)
    assert LogConfig(every=2, heatmap_every=0).heatmap_every == 0 and LogConfig(every=2, heatmap_every=-1)
    with pytest.raises(ValueError, match=r"log.heatmap_every \(-2\) must be >= 0, or -1 for no heatmaps"):
        LogConfig(heatmap_every=-2)
