"""`ds-upcycle bench`: measured speed and memory, printed as a Markdown table and written as JSON.

    ds-upcycle bench conversion --sizes 0.5 2.5    # offline upcycle: GB/s and peak RSS vs size
    ds-upcycle bench block                         # MoE block vs dense MLP vs HF Mixtral block
    ds-upcycle bench step                          # training step, upcycled vs dense, 1 and 2 CPU ranks
    ds-upcycle bench gpu                           # the same on one GPU, bf16 (benchmarks/gpu_h200.sh)
    ds-upcycle bench prepare --corpus-mb 10 40     # data preparation: seconds and peak RSS vs size, num_proc
    ds-upcycle bench sampler                       # seconds per step choosing blocks at 12M blocks
    ds-upcycle bench commit --sizes 1 2.5          # checkpoint commit: each rank hashing its files vs one rank all

Every run records the machine, software versions, shapes and repeats. Timings are medians;
nothing here is asserted in tests except the memory bound of the streaming conversion.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ds_upcycle.config import MoEConfig, moe_from_overrides, moe_overrides_help, to_overrides
from ds_upcycle.errors import run_guarded
from ds_upcycle.loading import DTYPES


def machine_info() -> dict:
    import deepspeed
    import transformers

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": deepspeed.__version__,
        "transformers": transformers.__version__,
    }


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def conversion_shape(size_gb: float) -> dict:
    """A Llama config (hidden 2048, intermediate 8192, vocab 32000) deep enough for ~size_gb in fp32."""
    hidden, inter, vocab = 2048, 8192, 32000
    per_layer = (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) * 4
    fixed = (2 * vocab * hidden + hidden) * 4
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return dict(hidden_size=hidden, intermediate_size=inter, vocab_size=vocab, num_hidden_layers=layers,
                num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)  # fmt: skip


def write_random_dense(
    out: Path, shape: dict, max_shard_bytes: int = 2 * 10**9, dtype: torch.dtype = torch.float32
) -> int:
    """A dense Llama checkpoint of random weights, written tensor by tensor. Returns its bytes."""
    from transformers import LlamaConfig

    from ds_upcycle.safetensors_stream import TensorSpec, write_sharded

    cfg = LlamaConfig(**shape)
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):  # shapes only, no memory: exact for GQA, head_dim and tying
        from transformers import LlamaForCausalLM

        skeleton = LlamaForCausalLM(cfg)
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    specs = [TensorSpec(k, s, lambda s=s: torch.randn(s, dtype=dtype) * 0.02) for k, s in shapes.items()]
    write_sharded(specs, out, dtype, max_shard_bytes)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


_CHILD = """
import json, os, sys, threading, time
from ds_upcycle.config import MoEConfig
from ds_upcycle.export import upcycle_offline
# Import what the conversion imports lazily, so the baseline holds the libraries, not the work.
import safetensors.torch, tqdm, transformers, ds_upcycle.upcycle, ds_upcycle.mixtral
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaConfig, MixtralConfig
MixtralConfig(); LlamaConfig(); AutoConfig.for_model("llama")

page = os.sysconf("SC_PAGE_SIZE")
def rss():  # current resident set size, bytes
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
base, peak, done = rss(), [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], rss())
        time.sleep(0.005)
th = threading.Thread(target=sample, daemon=True); th.start()
t = time.perf_counter()
r = upcycle_offline(sys.argv[1], sys.argv[2], MoEConfig(**json.loads(sys.argv[3])), progress=False)
dt = time.perf_counter() - t
done.append(1); th.join()
print(json.dumps({"seconds": dt, "bytes": r["bytes"], "rss_base": base, "rss_peak": max(peak[0], rss())}))
"""


def measure_conversion(dense: Path, out: Path, moe: MoEConfig) -> dict:
    """Run the streaming conversion in a fresh process, sampling its resident memory every 5 ms;
    the peak minus the RSS just before converting is what the conversion itself needed."""
    import dataclasses

    moe_json = json.dumps(dataclasses.asdict(moe))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(dense), str(out), moe_json],
                          capture_output=True, text=True, check=True)  # fmt: skip
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "seconds": r["seconds"],
        "out_bytes": r["bytes"],
        "gb_per_s": r["bytes"] / r["seconds"] / 1e9,
        "peak_rss_gib": r["rss_peak"] / 2**30,
        "rss_growth_mib": (r["rss_peak"] - r["rss_base"]) / 2**20,
    }


def disk_copy_gb_per_s(src: Path, dst: Path) -> float:
    """Sequential copy speed of the same files (read + write, through the page cache, fsynced)."""
    dst.mkdir(parents=True, exist_ok=True)
    total, t = 0, time.perf_counter()
    for f in sorted(src.glob("*.safetensors")):
        shutil.copyfile(f, dst / f.name)
        with open(dst / f.name, "rb+") as h:
            os.fsync(h.fileno())
        total += f.stat().st_size
    return total / (time.perf_counter() - t) / 1e9


def conversion(sizes: list[float], moe: MoEConfig, workdir: Path) -> list[dict]:
    rows = []
    for size in sizes:
        shape = conversion_shape(size)
        d = workdir / f"dense_{size}"
        dense_bytes = write_random_dense(d, shape)
        largest = shape["vocab_size"] * shape["hidden_size"] * 4
        copy = disk_copy_gb_per_s(d, workdir / "copy")
        shutil.rmtree(workdir / "copy")
        m = measure_conversion(d, workdir / f"moe_{size}", moe)
        rows.append({"dense_gb": dense_bytes / 1e9, "layers": shape["num_hidden_layers"], "num_experts": moe.num_experts,
                     "largest_tensor_mib": largest / 2**20, "disk_copy_gb_per_s": copy, **m,
                     "rss_growth_over_largest_tensor": m["rss_growth_mib"] * 2**20 / largest})  # fmt: skip
        shutil.rmtree(d)
        shutil.rmtree(workdir / f"moe_{size}")
    return rows


# --------------------------------------------------------------------------------------------
# MoE block: ours vs the dense MLP vs HF Mixtral's block
# --------------------------------------------------------------------------------------------

BLOCK_SHAPES = {"smollm2": (576, 1536), "llama3-8b/4": (1024, 3584), "llama3-8b": (4096, 14336)}
"""(hidden, intermediate): SmolLM2-135M's, Llama-3-8B's scaled by 1/4 (fits a CPU), and Llama-3-8B's own."""


def _blocks(hidden: int, inter: int, moe: MoEConfig, device, dtype):
    from transformers import LlamaConfig, MixtralConfig
    from transformers.models.llama.modeling_llama import LlamaMLP
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from ds_upcycle.distributed import init_distributed
    from ds_upcycle.moe import MoEBlock

    init_distributed()
    torch.manual_seed(0)
    dense = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter))
    ours = MoEBlock(hidden, dense, moe)
    ours.moe.set_deepspeed_parallelism()
    hf = MixtralSparseMoeBlock(MixtralConfig(hidden_size=hidden, intermediate_size=inter,
                                             num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k))  # fmt: skip
    with torch.no_grad():  # the same random router for both MoE blocks, so the routing matches
        hf.gate.weight.copy_(ours.gate_weight)
    return {name: m.to(device=device, dtype=dtype).train() for name, m in
            (("dense MLP", dense), ("ours (deepspeed.moe)", ours), ("HF Mixtral block", hf))}  # fmt: skip


def _fwd_bwd_seconds(module, x: torch.Tensor) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    module(x).float().square().mean().backward()
    sync()
    return time.perf_counter() - t


def block(tokens: list[int], repeats: int, moe: MoEConfig, device: str, dtype: str, shapes: list[str],
          emit=None) -> list[dict]:  # fmt: skip
    """Forward + backward of each block on the same input, interleaved (A B C A B C ...) so that
    machine noise hits all of them alike; medians and min-max spread over `repeats`."""
    import statistics

    dev, dt = torch.device(device), DTYPES[dtype]
    rows = []
    for shape_name in shapes:
        hidden, inter = BLOCK_SHAPES[shape_name]
        blocks = _blocks(hidden, inter, moe, dev, dt)
        # Ideal cost relative to the dense MLP: k expert MLPs plus the router's E columns.
        ideal = (moe.top_k * 3 * hidden * inter + moe.num_experts * hidden) / (3 * hidden * inter)
        for n in tokens:
            x = torch.randn(1, n, hidden, device=dev, dtype=dt, requires_grad=True)
            times: dict[str, list[float]] = {k: [] for k in blocks}
            for r in range(repeats + 2):
                for name, m in blocks.items():
                    m.zero_grad(set_to_none=True)
                    t = _fwd_bwd_seconds(m, x)
                    if r >= 2:  # two warm-up rounds
                        times[name].append(t)
            dense_med = statistics.median(times["dense MLP"])
            for name, ts in times.items():
                med = statistics.median(ts)
                ideal_ratio = 1.0 if name == "dense MLP" else ideal
                rows.append({"shape": shape_name, "hidden": hidden, "intermediate": inter, "tokens": n, "block": name,
                             "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts),
                             "over_dense": med / dense_med, "ideal_ratio": ideal_ratio,
                             "over_ideal": med / dense_med / ideal_ratio})  # fmt: skip
            if emit is not None:
                emit(rows)
    return rows


# --------------------------------------------------------------------------------------------
# Whole training steps, upcycled vs dense: `step` on CPU ranks, `gpu` on one GPU
# --------------------------------------------------------------------------------------------

LLAMA3_8B_LAYERS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=3, num_attention_heads=32,
                        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                        tie_word_embeddings=False)  # fmt: skip
"""Llama-3-8B's own layer shapes, 3 layers: 1.7 B dense; upcycled to 8 experts top-2, 5.4 B total / 2.2 B
active, and `ds-upcycle plan` puts ZeRO-2 bf16 Adam at seq 8192, micro-batch 1 with checkpointing at
~113 GiB per rank: as many layers as fit one H200 (4 layers: ~140 GiB)."""
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip
SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)  # fmt: skip


@dataclass(frozen=True)
class StepBench:
    """One dense-vs-upcycled comparison: a generated model trained through `ds-upcycle train`."""

    shape: dict
    nprocs: int
    moe: MoEConfig
    steps: int
    seq_len: int
    micro: int
    accum: int
    base: str
    """The shipped config the runs start from (its optimizer, ZeRO and precision sections)."""
    device: str
    extra: dict = field(default_factory=dict)
    """Further overrides for both runs."""


def _bench_overrides(b: StepBench, model: Path, setup: dict, work: Path, out: Path, upcycle: bool) -> list[str]:
    return to_overrides({
        "model.path": str(model), "model.upcycle": upcycle, **{f"moe.{k}": v for k, v in dataclasses.asdict(b.moe).items()},
        "data.train": [setup["train"]], "data.eval": [setup["eval"]], "data.seq_len": b.seq_len,
        "data.eval_batches": 1, "data.cache_dir": str(work / "cache"),
        "train.steps": b.steps, "train.warmup_steps": 1, "train.min_lr": 0.0, "train.save_every": 0,
        "train.save_final": False, "train.overwrite": True, "train.output_dir": str(out), "log.wandb": "disabled", "log.heatmap_every": 0,
        "log.eval_every": 0, "ds.train_micro_batch_size_per_gpu": b.micro, "ds.gradient_accumulation_steps": b.accum,
        **b.extra,
    })  # fmt: skip


def _step_row(name: str, b: StepBench, summ: dict, measured: float, datasheet: float | None) -> dict:
    tps = summ["tokens_per_s"] / b.nprocs
    return {"model": name, "ranks": b.nprocs, "ep": b.moe.ep_size if name != "dense" else "-",
            "params_per_rank": summ["params_per_rank"], "tokens_per_s": summ["tokens_per_s"],
            "step_s": summ["step_time_s"], "optimizer_s": summ["optimizer_s"],
            "fwd_bwd_s": summ["step_time_s"] - summ["optimizer_s"],
            "mfu_measured": summ["flops_per_token"] * tps / (measured * 1e12),
            "mfu_datasheet": summ["flops_per_token"] * tps / (datasheet * 1e12) if datasheet else None,
            "peak_gib": summ["peak_memory_gib"], "predicted_peak_gib": summ["predicted_peak_gib"],
            "optimizer": summ["optimizer"]["optimizer"], "matmul_tflops_measured": measured,
            "datasheet_tflops": datasheet}  # fmt: skip


def train_compare(
    work: Path, b: StepBench, master_port: int | None, emit=None, copy_to: Path | None = None
) -> list[dict]:
    """Train the same generated model dense and upcycled for ``b.steps`` steps through
    `ds-upcycle train`: tokens/s, the optimizer's share of the step, MFU against the device's
    measured matmul rate and against its datasheet peak, and peak memory measured vs planned.
    ``emit(rows)`` is called after each run; ``copy_to`` receives each run's summary and metrics."""
    from ds_upcycle.launch import run_training
    from ds_upcycle.metrics import datasheet_tflops, measured_matmul_tflops
    from ds_upcycle.tools.tiny import write_tiny_setup

    setup = write_tiny_setup(work / "data", n_docs=20000)  # a real tokenizer (320 ids) and enough text
    model = work / "model"
    dtype = DTYPES["bf16" if "bf16" in b.base else "fp32"]
    write_random_dense(model, b.shape, dtype=dtype)
    for f in Path(setup["model"]).glob("tokenizer*"):
        shutil.copy(f, model / f.name)
    device = torch.device(b.device)
    measured = measured_matmul_tflops(device, dtype, seconds=1.0)
    datasheet = (datasheet_tflops(device) or (None, ""))[0]
    rows = []
    for name, upcycle in (("dense", False), ("upcycled", True)):
        out = work / f"{name}_{b.nprocs}"
        overrides = _bench_overrides(b, model, setup, work, out, upcycle)
        result = run_training(b.base, overrides, num_gpus=b.nprocs, master_port=master_port, capture=True)
        if copy_to is not None:
            for f in ("summary.json", "metrics.jsonl"):
                if (out / f).is_file():
                    shutil.copy(out / f, copy_to / f"{name}_{f}")
        if result.returncode != 0:
            raise RuntimeError(f"the {name} run on {b.nprocs} rank(s) failed:\n{result.output[-4000:]}")
        rows.append(_step_row(name, b, result.summary, measured, datasheet))
        if emit is not None:
            emit(rows)
    dense, upcycled = rows
    ratio = _active_flop_ratio(b.shape, b.moe, b.seq_len)
    upcycled.update(fwd_bwd_over_dense=upcycled["fwd_bwd_s"] / dense["fwd_bwd_s"], ideal_ratio=ratio,
                    over_ideal=upcycled["fwd_bwd_s"] / dense["fwd_bwd_s"] / ratio)  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------
# Data: preparation time and memory vs corpus size and num_proc; the sampler's cost per step
# --------------------------------------------------------------------------------------------

_PREPARE_CHILD = """
import json, os, sys, threading, time
from pathlib import Path
import psutil
from ds_upcycle.config import DataConfig
from ds_upcycle.data import load_blocks
from ds_upcycle.loading import load_tokenizer

tok, me = load_tokenizer(sys.argv[1]), psutil.Process()
def uss(p):  # memory only this (forked) worker holds: its RSS would count the parent's shared pages again
    try:
        return p.memory_full_info().uss
    except psutil.Error:  # a worker that just exited
        return 0
base, peak_main, peak_tree, done = me.memory_info().rss, [0], [0], []
def sample():  # this process alone, and with its worker processes
    while not done:
        main = me.memory_info().rss
        peak_main[0] = max(peak_main[0], main)
        peak_tree[0] = max(peak_tree[0], main + sum(uss(c) for c in me.children(recursive=True)))
        time.sleep(0.02)
th = threading.Thread(target=sample, daemon=True); th.start()
cfg = DataConfig(seq_len=int(sys.argv[5]), num_proc=int(sys.argv[3]))
t, c = time.perf_counter(), os.times()
blocks, info = load_blocks([sys.argv[2]], "data.train", tok, cfg, Path(sys.argv[4]))
dt, c2 = time.perf_counter() - t, os.times()
done.append(1); th.join()
cpu = sum(c2[:4]) - sum(c[:4])  # user + system, this process and its (finished) workers
print(json.dumps({"seconds": dt, "cpu_seconds": cpu, "blocks": len(blocks), "rss_base": base,
                  "rss_peak": peak_main[0], "rss_peak_with_workers": peak_tree[0]}))
"""


def write_corpus(path: Path, megabytes: float) -> int:
    """A .txt corpus of about ``megabytes`` MB: the tiny grammar's documents, rotated so no two
    copies align. Returns its bytes."""
    from ds_upcycle.tools.tiny import synthetic_corpus

    docs = synthetic_corpus(4000, seed=1)
    chunk = "\n\n".join(docs)
    with open(path, "w") as f:
        for i in range(max(1, round(megabytes * 1e6 / len(chunk)))):
            f.write("\n\n".join(docs[i % 97 :] + docs[: i % 97]) + "\n\n")
    return path.stat().st_size


def prepare_bench(
    sizes_mb: list[float], procs: list[int], tokenizer: Path | None, seq_len: int, work: Path
) -> list[dict]:
    """`ds-upcycle prepare-data`'s path (ds_upcycle.data.load_blocks), each preparation in a fresh
    process sampling its resident memory every 20 ms, and that plus its workers' own (unique) memory."""
    from ds_upcycle.tools.tiny import write_tiny_setup

    tok_dir = tokenizer or Path(write_tiny_setup(work / "tiny", n_docs=200)["model"])
    rows = []
    for mb in sizes_mb:
        corpus = work / f"corpus_{mb}.txt"
        nbytes = write_corpus(corpus, mb)
        for n in procs:
            cache = work / f"cache_{mb}_{n}"
            proc = subprocess.run([sys.executable, "-c", _PREPARE_CHILD, str(tok_dir), str(corpus), str(n), str(cache),
                                   str(seq_len)], capture_output=True, text=True, check=True)  # fmt: skip
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            shutil.rmtree(cache)
            rows.append({"corpus_mb": nbytes / 1e6, "num_proc": n, "seconds": r["seconds"], "cpu_s": r["cpu_seconds"],
                         "mb_per_s": nbytes / 1e6 / r["seconds"], "tokens": r["blocks"] * seq_len,
                         "rss_growth_mib": (r["rss_peak"] - r["rss_base"]) / 2**20,
                         "peak_rss_mib": r["rss_peak"] / 2**20,
                         "peak_rss_with_workers_mib": r["rss_peak_with_workers"] / 2**20})  # fmt: skip
        corpus.unlink()
    return rows


def _old_indices(s, step: int, accum_index: int) -> list[int]:
    """BlockSampler.indices before the epoch order was kept: a permutation of all blocks per index."""
    start = ((step * s.accum + accum_index) * s.world + s.rank) * s.micro
    return [int(s.permutation(pos // s.num_blocks)[pos % s.num_blocks]) for pos in range(start, start + s.micro)]


def sampler_bench(num_blocks: int, micro: int, accum: int, world: int, steps: int) -> list[dict]:
    """Seconds per optimizer step that one rank spends choosing its blocks, before (a permutation
    per index) and after (one per epoch, kept). Both give the same indices."""
    from ds_upcycle.data import BlockSampler

    s = BlockSampler(num_blocks, micro, accum, world, rank=0, seed=0)
    t = time.perf_counter()
    old = [_old_indices(s, 0, a) for a in range(accum)]
    before = time.perf_counter() - t
    t = time.perf_counter()
    new = [s.indices(0, a) for a in range(accum)]
    first = time.perf_counter() - t
    assert new == old, "the kept epoch order must give the indices the permutation gives"
    t = time.perf_counter()
    for step in range(1, steps + 1):
        for a in range(accum):
            s.indices(step, a)
    steady = (time.perf_counter() - t) / steps
    common = {"blocks": num_blocks, "micro": micro, "accum": accum, "world": world}
    return [{**common, "sampler": "before: a permutation per index", "first_step_s": before, "step_s": before},
            {**common, "sampler": "after: one permutation per epoch", "first_step_s": first, "step_s": steady}]  # fmt: skip


def _active_flop_ratio(shape: dict, moe: MoEConfig, seq_len: int) -> float:
    from transformers import LlamaConfig

    from ds_upcycle.plan import make_plan

    plan = make_plan(LlamaConfig(**shape), moe, moe.ep_size, seq_len, "fp32")
    return plan.train_flops_per_token(moe=True) / plan.train_flops_per_token(moe=False)


def gpu_bench(args, moe: MoEConfig) -> StepBench:
    """The `gpu` benchmark's settings: Llama-3-8B layer shapes on one GPU (bf16, ZeRO-2, fused torch
    AdamW, activation checkpointing, as gpu_zero2_bf16_ep1), or with --smoke the same path on the
    CPU with a tiny model."""
    moe = dataclasses.replace(moe, ep_size=1)
    if args.smoke:
        return StepBench(SMOKE_MODEL, 1, moe, 3, 64, 1, 2, "gpu_zero2_bf16_ep1", "cpu")
    shape = {**LLAMA3_8B_LAYERS, "num_hidden_layers": args.layers or LLAMA3_8B_LAYERS["num_hidden_layers"]}
    return StepBench(
        shape, 1, moe, args.steps, args.seq_len, args.micro_batch, args.accum, "gpu_zero2_bf16_ep1", "cuda"
    )


# --------------------------------------------------------------------------------------------
# Checkpoint commit
# --------------------------------------------------------------------------------------------


def commit_row(work: Path, size_gb: float, moe: MoEConfig, master_port: int | None) -> dict:
    """One 2-rank training step of a wide 2-layer model whose checkpoint is about size_gb (experts
    dominate: 16 bytes per parameter with ZeRO's fp32 copy and Adam moments), saved at the end.
    parallel: the in-run commit as rank 0 saw it, from its last file written to the commit done
    (its own hashing, the wait for rank 1's, the merge); the longest wait is the fastest rank's idle
    time in the collective. serial: one process hashing every file of the folder, as rank 0 did alone
    before, every other rank waiting in a collective all that time."""
    import dataclasses

    from ds_upcycle import checkpoint
    from ds_upcycle.launch import run_training
    from ds_upcycle.tools.tiny import write_tiny_setup

    setup = write_tiny_setup(work / "data")
    inter = max(128, round(size_gb * 1e9 / (16 * 2 * moe.num_experts * 3 * 256)))
    shape = dict(hidden_size=256, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False)  # fmt: skip
    model = work / "model"
    write_random_dense(model, shape)
    for f in Path(setup["model"]).glob("tokenizer*"):
        shutil.copy(f, model / f.name)
    out = work / "run"
    overrides = to_overrides({
        "model.path": str(model), **{f"moe.{k}": v for k, v in dataclasses.asdict(moe).items()}, "moe.ep_size": 2,
        "data.train": [setup["train"]], "data.eval": [setup["eval"]], "data.seq_len": 64, "data.eval_batches": 1,
        "data.cache_dir": str(work / "cache"), "train.steps": 1, "train.save_every": 0, "train.output_dir": str(out),
        "log.wandb": "disabled", "ds.train_micro_batch_size_per_gpu": 1,
    })  # fmt: skip
    result = run_training("cpu_debug_zero2_ep2", overrides, num_gpus=2, master_port=master_port, capture=True)
    if result.returncode != 0:
        raise RuntimeError(f"the {size_gb} GB run failed:\n{result.output[-4000:]}")
    stats = result.summary["last_commit"]
    files = [p for p in (out / "checkpoints" / checkpoint.tag_for(1)).iterdir() if p.is_file()]
    t0 = time.perf_counter()
    for f in files:
        checkpoint.file_entry(f)
    serial = time.perf_counter() - t0
    hash_s = [r["hash_s"] for r in stats["ranks"]]
    return {"checkpoint_gb": stats["checkpoint_bytes"] / 1e9, "files": len(files), "serial_s": serial,
            "parallel_s": stats["commit_s"], "rank_hash_s": "/".join(f"{h:.2f}" for h in hash_s),
            "rank_gb": "/".join(f"{r['hashed_bytes'] / 1e9:.2f}" for r in stats["ranks"]),
            "idle_wait_s": stats["commit_s"] - min(hash_s)}  # fmt: skip


def bench_commit(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_upcycle_commit_"))
    rows = []
    try:
        for size in args.sizes:
            rows.append(commit_row(work / f"s{size}", size, moe, args.master_port))
            emit(rows)
            shutil.rmtree(work / f"s{size}", ignore_errors=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    cols = [("checkpoint_gb", "checkpoint GB", ".2f"), ("files", "files", "d"),
            ("serial_s", "serial s (one rank hashes all; the others wait it all)", ".2f"),
            ("parallel_s", "parallel commit s", ".2f"), ("rank_gb", "GB hashed per rank", ""),
            ("rank_hash_s", "s per rank", ""), ("idle_wait_s", "longest wait s", ".2f")]  # fmt: skip
    return rows, cols, {"ranks": 2, "num_experts": moe.num_experts}


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    out = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join("-" if r.get(c[0]) is None else format(r[c[0]], c[2]) for c in cols) + " |")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds-upcycle bench",
        description="Measure speed and memory; print a Markdown table and write JSON (rewritten as each "
        "measurement arrives, so a later failure loses nothing). "
        "conversion: offline dense -> Mixtral upcycling of generated checkpoints of the given sizes: "
        "throughput (GB written per second) against the disk's sequential copy speed, and peak RSS "
        "against checkpoint size. block: forward + backward of our upcycled MoE block, the dense Llama MLP "
        "and HF's MixtralSparseMoeBlock at the same shapes, interleaved, with each block's time over the "
        "dense MLP's divided by the ideal FLOP ratio (k experts plus the router). step: whole training steps "
        "of a generated model of SmolLM2's shape, dense and upcycled, on 1 CPU rank (ep 1) and 2 (ep 2), the "
        "optimizer timed apart. gpu: the same on one GPU with Llama-3-8B's layer shapes (3 layers, seq 8192, "
        "bf16, ZeRO-2, fused torch AdamW, gradient accumulation 4), MFU against the datasheet peak and "
        "against the measured matmul rate, peak memory measured vs `plan`'s estimate; --smoke runs the same "
        "path on the CPU with a tiny model. preflight: the device, versions, measured matmul rate and the "
        "gpu benchmark's planned sizes, in seconds. prepare: data preparation "
        "(read, tokenise with data.num_proc processes, pack to disk) of generated .txt corpora: seconds, MB/s and "
        "peak RSS against corpus size. sampler: seconds per optimizer step spent choosing blocks at --blocks "
        "blocks in the paper's layout (micro-batch 1, accumulation 16, 64 ranks), before and after keeping "
        "each epoch's order. commit: the checkpoint "
        "commit of a 2-rank run at the given checkpoint sizes (--sizes, GB): each rank hashing its own files "
        "(in-run) against one process hashing them all (the former rank-0 design). elastic: on SmolLM2 (the demo's "
        "model and corpus; every other layer MoE, 2 ranks ep 2), the seconds and bytes of a checkpoint's layout-free "
        "part next to DeepSpeed's own files, and its step-1 checkpoint resumed on 1 rank ep 1: the step-2 loss "
        "difference.",
    )
    p.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("--layers", type=int, default=0, help="step: SmolLM2 shape with N layers (default 30); gpu: 3")
    p.add_argument("--steps", type=int, default=None, help="step/gpu: training steps per run (default 6 / 8)")
    p.add_argument("--seq-len", type=int, default=None, help="step/gpu: tokens per sequence (default 128 / 8192)")
    p.add_argument("--micro-batch", type=int, default=None, help="step/gpu: sequences per micro-batch (default 2 / 1)")
    p.add_argument("--accum", type=int, default=4, help="gpu: gradient accumulation steps (default 4)")
    p.add_argument("--smoke", action="store_true", help="gpu: run the same path on CPU with a tiny model (a check)")
    p.add_argument("--copy-runs", default=None, help="gpu/step: copy each run's summary.json and metrics.jsonl here")
    p.add_argument("--master-port", type=int, default=None, help="step, gpu, commit: rendezvous port")
    p.add_argument(
        "--sizes",
        type=float,
        nargs="+",
        default=[0.5, 2.5],
        help="conversion: dense checkpoint sizes in GB; commit: checkpoint sizes in GB (default 0.5 2.5)",
    )
    p.add_argument(
        "--tokens", type=int, nargs="+", default=[512, 2048, 4096], help="block: token counts (default 512 2048 4096)"
    )
    p.add_argument(
        "--shapes", nargs="+", choices=sorted(BLOCK_SHAPES), default=["smollm2", "llama3-8b/4"],
        help="block: (hidden, intermediate) shapes (default smollm2 llama3-8b/4; llama3-8b is the full 4096/14336)",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=9, help="block: timed repeats per block (default 9)")
    p.add_argument("--device", default="cpu", help="block: cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="block: dtype (default fp32)")
    p.add_argument("--workdir", default=None, help="conversion/step/gpu: scratch folder (default: a temp folder)")
    p.add_argument("--corpus-mb", type=float, nargs="+", default=[10, 40],
                   help="prepare: corpus sizes in MB of text (default 10 40)")  # fmt: skip
    p.add_argument(
        "--num-proc", type=int, nargs="+", default=[1, 2], help="prepare: data.num_proc values (default 1 2)"
    )
    p.add_argument("--tokenizer", default=None, help="prepare: a model folder whose tokenizer to use (default: tiny's)")
    p.add_argument("--blocks", type=int, default=12_000_000, help="sampler: blocks in the corpus (default 12M)")
    p.add_argument("--json", default=None, help="JSON output file (default bench_<what>.json)")
    p.add_argument_group("MoE settings", moe_overrides_help() + "; conversion defaults to num_experts=4")
    return p


TRAIN_COLUMNS = [("model", "model", ""), ("ranks", "ranks", "d"), ("ep", "ep", ""), ("params_per_rank", "params/rank", ",d"),
                 ("tokens_per_s", "tokens/s", ",.0f"), ("step_s", "step s", ".3f"), ("optimizer_s", "optimizer s", ".3f"),
                 ("fwd_bwd_over_dense", "fwd+bwd x dense", ".2f"), ("ideal_ratio", "active-FLOP x", ".2f"),
                 ("over_ideal", "x ideal", ".2f"), ("mfu_measured", "MFU vs measured matmul", ".3f"),
                 ("mfu_datasheet", "MFU vs datasheet", ".3f"), ("peak_gib", "peak GiB", ".1f"),
                 ("predicted_peak_gib", "plan GiB", ".1f")]  # fmt: skip


def bench_training(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    """`step` (1 and 2 CPU ranks) or `gpu` (one GPU, or the CPU with --smoke)."""
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_upcycle_step_"))
    copy_to = Path(args.copy_runs) if args.copy_runs else None
    if copy_to is not None:
        copy_to.mkdir(parents=True, exist_ok=True)
    if args.what == "gpu":
        benches = [(work / "g", gpu_bench(args, moe))]
    else:
        shape = {**SMOLLM2_SHAPE, "num_hidden_layers": args.layers or SMOLLM2_SHAPE["num_hidden_layers"]}
        benches = [(work / f"r{n}", StepBench(shape, n, dataclasses.replace(moe, ep_size=n), args.steps or 6,
                                              args.seq_len or 128, args.micro_batch or 2, 1, "cpu_debug_zero2_ep2",
                                              "cpu")) for n in (1, 2)]  # fmt: skip
    rows: list[dict] = []
    for folder, b in benches:
        done = list(rows)
        rows += train_compare(folder, b, args.master_port, lambda part, done=done: emit(done + part), copy_to)
        emit(rows)
    for r in rows:
        r.setdefault("fwd_bwd_over_dense", 1.0)
        r.setdefault("ideal_ratio", 1.0)
        r.setdefault("over_ideal", 1.0)
    config = [dataclasses.asdict(b) for _, b in benches]
    return rows, TRAIN_COLUMNS, {"runs": config}


def bench_preflight(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    """The device, its measured bf16 (GPU) or fp32 (CPU) matmul rate and datasheet peak, and what the
    `gpu` benchmark will need by `plan`: the first stage of benchmarks/gpu_h200.sh."""
    from transformers import LlamaConfig

    from ds_upcycle.metrics import datasheet_tflops, measured_matmul_tflops
    from ds_upcycle.plan import make_plan

    b = gpu_bench(args, moe)
    device = torch.device(b.device if torch.cuda.is_available() or b.device == "cpu" else "cpu")
    dtype = DTYPES["bf16" if device.type == "cuda" else "fp32"]
    plan = make_plan(LlamaConfig(**b.shape), b.moe, 1, b.seq_len, "bf16")
    row = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if device.type == "cuda" else None,
           "matmul_tflops_measured": measured_matmul_tflops(device, dtype, seconds=2.0),
           "datasheet_tflops": (datasheet_tflops(device) or (None, ""))[0],
           "dense_params": plan.dense_total, "moe_params": plan.moe_total, "moe_active_params": plan.moe_active,
           "dense_plan_peak_gib": plan.peak_bytes_per_rank(2, b.micro, True, moe=False) / 2**30,
           "moe_plan_peak_gib": plan.peak_bytes_per_rank(2, b.micro, True, moe=True) / 2**30}  # fmt: skip
    emit([row])
    cols = [(k, k, ".3g" if isinstance(v, float) else "") for k, v in row.items() if v is not None]
    return [row], cols, {"gpu_bench": dataclasses.asdict(b)}


def bench_block(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    rows = block(args.tokens, args.repeats, moe, args.device, args.dtype, args.shapes, emit)
    cols = [("shape", "shape", ""), ("tokens", "tokens", "d"), ("block", "block", ""), ("median_ms", "median ms", ".1f"),
            ("min_ms", "min ms", ".1f"), ("max_ms", "max ms", ".1f"), ("over_dense", "x dense", ".2f"),
            ("ideal_ratio", "ideal x", ".2f"), ("over_ideal", "x ideal", ".2f")]  # fmt: skip
    config = {"repeats": args.repeats, "num_experts": moe.num_experts, "top_k": moe.top_k, "device": args.device,
              "dtype": args.dtype}  # fmt: skip
    return rows, cols, config


def bench_conversion(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_upcycle_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = conversion(args.sizes, moe, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    cols = [("dense_gb", "dense GB", ".2f"), ("out_bytes", "MoE bytes", ",.0f"), ("gb_per_s", "GB/s", ".2f"),
            ("disk_copy_gb_per_s", "disk copy GB/s", ".2f"), ("peak_rss_gib", "peak RSS GiB", ".2f"),
            ("rss_growth_mib", "RSS growth MiB", ".0f"), ("largest_tensor_mib", "largest tensor MiB", ".0f")]  # fmt: skip
    return rows, cols, {"num_experts": moe.num_experts}


def bench_prepare(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_upcycle_prepare_"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    try:
        rows = prepare_bench(args.corpus_mb, args.num_proc, tokenizer, 1024, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    cols = [("corpus_mb", "corpus MB", ".1f"), ("num_proc", "num_proc", "d"), ("seconds", "seconds", ".1f"),
            ("cpu_s", "CPU s", ".1f"),
            ("mb_per_s", "MB/s", ".2f"), ("tokens", "tokens", ",d"), ("rss_growth_mib", "RSS growth MiB", ".0f"),
            ("peak_rss_mib", "peak RSS MiB", ".0f"), ("peak_rss_with_workers_mib", "+ workers' own MiB", ".0f")]  # fmt: skip
    return rows, cols, {"tokenizer": str(tokenizer or "tiny (320 ids)"), "seq_len": 1024}


PAPER_LAYOUT = {"micro": 1, "accum": 16, "world": 64}
"""ds_configs/llama3_8b_paper_*.json on 64 GPUs: 12,000 steps of 64 x 16 blocks of 8192 tokens (~100B) = 12.3M blocks."""


def bench_sampler(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    rows = sampler_bench(args.blocks, steps=1000, **PAPER_LAYOUT)
    cols = [("sampler", "sampler", ""), ("blocks", "blocks", ",d"), ("accum", "accumulation", "d"),
            ("first_step_s", "first step s", ".4f"), ("step_s", "per step s", ".6f")]  # fmt: skip
    return rows, cols, {**PAPER_LAYOUT, "steady_steps": 1000}


def _elastic_run(overrides: dict, out: Path, ranks: int, master_port: int | None) -> dict:
    from ds_upcycle.launch import run_training

    result = run_training("cpu_debug_zero2_ep2", to_overrides({**overrides, "train.output_dir": str(out)}),
                          num_gpus=ranks, master_port=master_port, capture=True)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"the {ranks}-rank run failed:\n{result.output[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": result.summary, "losses": {r["step"]: r["loss/lm"] for r in rows if "loss/lm" in r}}


def bench_elastic(args, moe: MoEConfig, emit) -> tuple[list[dict], list, dict]:
    """SmolLM2-135M (the demo's model and corpus), MoE on every other layer, 2 ranks ep 2, ZeRO-2:
    steps 1-2 saving after each, the save split into DeepSpeed's files and the layout-free part
    (rank 0's seconds, bytes); then the step-1 checkpoint resumed on 1 rank, ep 1, gradient
    accumulation 2 (the same global batch): its step-2 loss against the 2-rank run's."""
    from ds_upcycle import checkpoint
    from ds_upcycle.tools.demo import shakespeare_corpus, smollm2_checkpoint

    cache = Path(os.environ.get("DS_UPCYCLE_CACHE", Path.home() / ".cache" / "ds_upcycle"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_upcycle_elastic_"))
    train_files, eval_files = shakespeare_corpus(cache)
    common = {"model.path": str(smollm2_checkpoint(cache)), "model.activation_checkpointing": False,
              "data.train": train_files, "data.eval": eval_files, "data.seq_len": args.seq_len or 256,
              "data.eval_batches": 1, "data.cache_dir": str(cache / "tokens"), "train.steps": 2,
              "train.save_every": 1, "train.keep_last": 0, "log.wandb": "disabled", "log.heatmap_every": -1,
              "moe.moe_layers": "every_2", "ds.train_micro_batch_size_per_gpu": 1}  # fmt: skip
    try:
        two = _elastic_run({**common, "moe.ep_size": 2, "ds.gradient_accumulation_steps": 1}, work / "two", 2,
                           args.master_port)  # fmt: skip
        c = two["summary"]["last_commit"]
        one = work / "one"
        checkpoint.copy_to_new_run(work / "two", 1, one)
        t0 = time.perf_counter()
        resumed = _elastic_run({**common, "moe.ep_size": 1, "ds.gradient_accumulation_steps": 2, "train.resume": True,
                                "train.save_every": 0, "train.save_final": False}, one, 1, args.master_port)  # fmt: skip
        rows = [{"checkpoint_gb": c["checkpoint_bytes"] / 1e9, "layout_free_gb": c["layout_free_bytes"] / 1e9,
                 "native_s": c["native_s"], "layout_free_s": c["layout_free_s"], "commit_s": c["commit_s"],
                 "resume_mode": resumed["summary"]["resume_mode"], "resume_run_s": time.perf_counter() - t0,
                 "dloss_step2": abs(resumed["losses"][2] - two["losses"][2])}]  # fmt: skip
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    cols = [("checkpoint_gb", "checkpoint GB", ".2f"), ("layout_free_gb", "of which layout-free GB", ".2f"),
            ("native_s", "DeepSpeed save s", ".2f"), ("layout_free_s", "layout-free save s", ".2f"),
            ("commit_s", "commit s", ".2f"), ("resume_mode", "resume on 1 rank ep 1", ""),
            ("resume_run_s", "that run s", ".1f"), ("dloss_step2", "|dloss| step 2", ".2e")]  # fmt: skip
    return rows, cols, {"model": "SmolLM2-135M, MoE on every other layer, 8 experts", "ranks": 2, "ep": 2}


BENCHES = {"conversion": bench_conversion, "block": bench_block, "step": bench_training, "gpu": bench_training,
           "preflight": bench_preflight, "prepare": bench_prepare, "sampler": bench_sampler,
           "commit": bench_commit, "elastic": bench_elastic}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    moe = moe_from_overrides(overrides, base=MoEConfig(num_experts=4) if args.what == "conversion" else None)
    out_json = Path(args.json or f"bench_{args.what}.json")
    info = machine_info()

    def emit(rows: list[dict], config: dict | None = None) -> None:
        """Write what is measured so far (atomically): a stage that fails later loses nothing."""
        tmp = out_json.with_name(f".{out_json.name}.tmp")
        tmp.write_text(json.dumps({"machine": info, "config": config, "rows": rows, "complete": config is not None},
                                  indent=2, default=str))  # fmt: skip
        tmp.replace(out_json)

    rows, cols, config = BENCHES[args.what](args, moe, emit)
    emit(rows, config)
    print(_table(rows, cols))
    print(f"\nwritten: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
