"""The streaming conversion's peak memory is a few tensors, independent of checkpoint size
(measured in a fresh process by sampling its RSS; see ds_upcycle/tools/bench.py)."""

import pytest

from ds_upcycle.config import MoEConfig
from ds_upcycle.tools.bench import measure_conversion, write_random_dense

pytestmark = pytest.mark.slow
SHAPE = dict(hidden_size=1024, intermediate_size=4096, vocab_size=4096, num_attention_heads=8,
             num_key_value_heads=8, tie_word_embeddings=False)  # fmt: skip
LARGEST = 4096 * 1024 * 4  # the MLP weights (fp32)


def test_peak_memory_is_independent_of_model_size(tmp_path):
    growth = {}
    for layers in (2, 8):
        dense = tmp_path / f"dense_{layers}"
        size = write_random_dense(dense, {**SHAPE, "num_hidden_layers": layers})
        m = measure_conversion(dense, tmp_path / f"moe_{layers}", MoEConfig(num_experts=4))
        growth[layers] = m["rss_growth_mib"] * 2**20
        print(f"{layers} layers: dense {size / 2**20:.0f} MiB, MoE {m['out_bytes'] / 2**20:.0f} MiB, "
              f"RSS growth {m['rss_growth_mib']:.0f} MiB, {m['gb_per_s']:.2f} GB/s")  # fmt: skip
    assert growth[8] <= 6 * LARGEST  # a few tensors, not the 4x larger model (~560 MiB of MoE at 8 layers)
    assert growth[8] <= growth[2] + 2 * LARGEST  # 4x the layers does not mean 4x the memory
