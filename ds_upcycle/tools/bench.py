"""`ds-upcycle bench`: measured speed and memory, printed as a Markdown table and written as JSON.

    ds-upcycle bench conversion --sizes 0.5 2.5    # offline upcycle: GB/s and peak RSS vs size
    ds-upcycle bench block                         # MoE block vs dense MLP vs HF Mixtral block
    ds-upcycle bench step                          # training step, upcycled vs dense, 1 and 2 CPU ranks
    ds-upcycle bench gpu                           # the same on one GPU, bf16 (benchmarks/gpu_h200.sh)
    ds-upcycle bench commit --sizes 1 2.5          # checkpoint commit: each rank hashing its files vs one rank all

Every run records the machine, software versions, shapes and repeats. Timings are medians;
nothing here is asserted in tests except the memory bound of the streaming conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
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


def write_random_dense(out: Path, shape: dict, max_shard_bytes: int = 2 * 10**9) -> int:
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
    specs = [TensorSpec(k, s, lambda s=s: torch.randn(s) * 0.02) for k, s in shapes.items()]
    write_sharded(specs, out, torch.float32, max_shard_bytes)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(out)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


_CHILD = """
import json, os, sys, threading, time
from ds_upcycle.config import MoEConfig
from ds_upcycle.export import upcycle_offline
# Import what the conversion imports lazily, so the baseline holds the libraries, not the work.
import safetensors.torch, tqdm, transformers
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

BLOCK_SHAPES = {"smollm2": (576, 1536), "llama3-8b/4": (1024, 3584)}
"""(hidden, intermediate): SmolLM2-135M's, and Llama-3-8B's (4096, 14336) scaled by 1/4 to fit a CPU."""


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


def block(tokens: list[int], repeats: int, moe: MoEConfig, device: str, dtype: str) -> list[dict]:
    """Forward + backward of each block on the same input, interleaved (A B C A B C ...) so that
    machine noise hits all of them alike; medians and min-max spread over `repeats`."""
    import statistics

    dev, dt = torch.device(device), DTYPES[dtype]
    rows = []
    for shape_name, (hidden, inter) in BLOCK_SHAPES.items():
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
    return rows


# --------------------------------------------------------------------------------------------
# GPU: a whole training step, upcycled vs dense, against the card's measured bf16 matmul rate
# --------------------------------------------------------------------------------------------

GPU_MODEL = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192, tie_word_embeddings=False)  # fmt: skip
"""A 0.89 B dense Llama; upcycled to 8 experts top-2 it is 5.1 B total / 1.5 B active (`ds-upcycle plan`):
bf16 weights and grads (19 GiB) plus Adam state (57 GiB) plus activations at 2 x 4096 tokens fill
much of one 141 GB H200."""
SMOKE_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, tie_word_embeddings=False)  # fmt: skip


SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True)  # fmt: skip


def train_compare(work: Path, shape: dict, nprocs: int, moe: MoEConfig, steps: int, seq_len: int, micro: int,
                  device: str, master_port: int | None) -> list[dict]:  # fmt: skip
    """Train the same generated model dense and upcycled (``moe``) for `steps` steps through
    `ds-upcycle train`; tokens/s, MFU and the optimizer's share of the step from each run's summary.
    The peak for MFU is the device's measured matmul rate."""
    import dataclasses

    from ds_upcycle.launch import run_training
    from ds_upcycle.metrics import measured_matmul_tflops
    from ds_upcycle.tools.tiny import write_tiny_setup

    setup = write_tiny_setup(work / "data", n_docs=2000)  # a real tokenizer (320 ids) and text
    model = work / "model"
    write_random_dense(model, shape)
    for f in Path(setup["model"]).glob("tokenizer*"):
        shutil.copy(f, model / f.name)
    gpu = device == "cuda"
    peak = measured_matmul_tflops(torch.device(device), DTYPES["bf16" if gpu else "fp32"], seconds=1.0)
    base = "gpu_zero2_bf16_ep1" if gpu else "cpu_debug_zero2_ep2"
    rows = []
    for name, upcycle in (("dense", False), ("upcycled", True)):
        out = work / f"{name}_{nprocs}"
        overrides = to_overrides({
            "model.path": str(model), "model.upcycle": upcycle, "model.activation_checkpointing": False,
            **{f"moe.{k}": v for k, v in dataclasses.asdict(moe).items()},
            "data.train": [setup["train"]], "data.eval": [setup["eval"]], "data.seq_len": seq_len,
            "data.eval_batches": 1, "data.cache_dir": str(work / "cache"),
            "train.steps": steps, "train.warmup_steps": 1, "train.min_lr": 0.0, "train.save_every": 0,
            "train.output_dir": str(out), "log.wandb": "disabled", "log.peak_tflops": peak,
            "ds.train_micro_batch_size_per_gpu": micro, "ds.gradient_accumulation_steps": 1,
        })  # fmt: skip
        result = run_training(base, overrides, num_gpus=nprocs, master_port=master_port, capture=True)
        if result.returncode != 0:
            raise RuntimeError(f"the {name} run on {nprocs} rank(s) failed:\n{result.output[-4000:]}")
        summ = result.summary
        rows.append({"model": name, "ranks": nprocs, "ep": moe.ep_size if upcycle else "-",
                     "params_per_rank": summ["params_per_rank"], "tokens_per_s": summ["tokens_per_s"],
                     "step_s": summ["step_time_s"], "optimizer_s": summ["optimizer_s"],
                     "fwd_bwd_s": summ["step_time_s"] - summ["optimizer_s"], "mfu": summ["mfu"],
                     "peak_tflops_measured": peak})  # fmt: skip
    dense, upcycled = rows
    plan_ratio = _active_flop_ratio(shape, moe, seq_len)
    upcycled["fwd_bwd_over_dense"] = upcycled["fwd_bwd_s"] / dense["fwd_bwd_s"]
    upcycled["ideal_ratio"] = plan_ratio
    upcycled["over_ideal"] = upcycled["fwd_bwd_over_dense"] / plan_ratio
    return rows


def _active_flop_ratio(shape: dict, moe: MoEConfig, seq_len: int) -> float:
    from transformers import LlamaConfig

    from ds_upcycle.plan import make_plan

    plan = make_plan(LlamaConfig(**shape), moe, moe.ep_size, seq_len, "fp32")
    return plan.train_flops_per_token(moe=True) / plan.train_flops_per_token(moe=False)


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


def bench_commit(args, moe: MoEConfig) -> tuple[list[dict], list, dict]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_upcycle_commit_"))
    rows = []
    try:
        for size in args.sizes:
            rows.append(commit_row(work / f"s{size}", size, moe, args.master_port))
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
        out.append("| " + " | ".join(format(r[c[0]], c[2]) for c in cols) + " |")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds-upcycle bench",
        description="Measure speed and memory; print a Markdown table and write JSON. "
        "conversion: offline dense -> Mixtral upcycling of generated checkpoints of the given sizes: "
        "throughput (GB written per second) against the disk's sequential copy speed, and peak RSS "
        "against checkpoint size. block: forward + backward of our upcycled MoE block, the dense Llama MLP "
        "and HF's MixtralSparseMoeBlock at the same shapes, interleaved, with each block's time over the "
        "dense MLP's divided by the ideal FLOP ratio (k experts plus the router). step: whole training steps "
        "of a generated model of SmolLM2's shape, dense and upcycled, on 1 CPU rank (ep 1) and 2 (ep 2), the "
        "optimizer timed apart. gpu: the same on one GPU in bf16 with a ~1.2 B model. commit: the checkpoint "
        "commit of a 2-rank run at the given checkpoint sizes (--sizes, GB): each rank hashing its own files "
        "(in-run) against one process hashing them all (the former rank-0 design).",
    )
    p.add_argument("what", choices=sorted(BENCHES), help="which benchmark")
    p.add_argument("--layers", type=int, default=0, help="step: SmolLM2 shape with only N layers (default: all 30)")
    p.add_argument("--steps", type=int, default=30, help="gpu: training steps per run (default 30)")
    p.add_argument("--seq-len", type=int, default=4096, help="gpu: tokens per sequence (default 4096)")
    p.add_argument("--micro-batch", type=int, default=4, help="gpu: sequences per step (default 4)")
    p.add_argument("--smoke", action="store_true", help="gpu: run the same path on CPU with a tiny model (a check)")
    p.add_argument("--master-port", type=int, default=None, help="gpu, commit: rendezvous port")
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
    p.add_argument("--repeats", type=int, default=9, help="block: timed repeats per block (default 9)")
    p.add_argument("--device", default="cpu", help="block: cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="block: dtype (default fp32)")
    p.add_argument(
        "--workdir",
        default=None,
        help="conversion, commit: scratch folder on the disk to measure (default: a temp folder)",
    )
    p.add_argument("--json", default=None, help="JSON output file (default bench_<what>.json)")
    p.add_argument_group("MoE settings", moe_overrides_help() + "; conversion defaults to num_experts=4")
    return p


TRAIN_COLUMNS = [("model", "model", ""), ("ranks", "ranks", "d"), ("ep", "ep", ""), ("params_per_rank", "params/rank", ",d"),
                 ("tokens_per_s", "tokens/s", ",.0f"), ("step_s", "step s", ".3f"), ("optimizer_s", "optimizer s", ".3f"),
                 ("fwd_bwd_over_dense", "fwd+bwd x dense", ".2f"), ("ideal_ratio", "active-FLOP x", ".2f"),
                 ("over_ideal", "x ideal", ".2f"), ("mfu", "MFU", ".3f")]  # fmt: skip


def bench_training(args, moe: MoEConfig) -> tuple[list[dict], list, dict]:
    """`step` (1 and 2 CPU ranks) or `gpu` (one GPU, or the CPU with --smoke)."""
    import dataclasses

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ds_upcycle_step_"))
    rows = []
    if args.what == "gpu":
        shape = SMOKE_MODEL if args.smoke else GPU_MODEL
        rows += train_compare(work / "g", shape, 1, dataclasses.replace(moe, ep_size=1), args.steps, args.seq_len,
                              args.micro_batch, "cpu" if args.smoke else "cuda", args.master_port)  # fmt: skip
    else:
        shape = {**SMOLLM2_SHAPE, "num_hidden_layers": args.layers} if args.layers else SMOLLM2_SHAPE
        for nprocs in (1, 2):
            rows += train_compare(work / f"r{nprocs}", shape, nprocs, dataclasses.replace(moe, ep_size=nprocs),
                                  args.steps, args.seq_len, args.micro_batch, "cpu", args.master_port)  # fmt: skip
    for r in rows:
        r.setdefault("fwd_bwd_over_dense", 1.0)
        r.setdefault("ideal_ratio", 1.0)
        r.setdefault("over_ideal", 1.0)
    config = {"steps": args.steps, "seq_len": args.seq_len, "micro_batch": args.micro_batch, "layers": args.layers}
    return rows, TRAIN_COLUMNS, config


def bench_block(args, moe: MoEConfig) -> tuple[list[dict], list, dict]:
    rows = block(args.tokens, args.repeats, moe, args.device, args.dtype)
    cols = [("shape", "shape", ""), ("tokens", "tokens", "d"), ("block", "block", ""), ("median_ms", "median ms", ".1f"),
            ("min_ms", "min ms", ".1f"), ("max_ms", "max ms", ".1f"), ("over_dense", "x dense", ".2f"),
            ("ideal_ratio", "ideal x", ".2f"), ("over_ideal", "x ideal", ".2f")]  # fmt: skip
    config = {"repeats": args.repeats, "num_experts": moe.num_experts, "top_k": moe.top_k, "device": args.device,
              "dtype": args.dtype}  # fmt: skip
    return rows, cols, config


def bench_conversion(args, moe: MoEConfig) -> tuple[list[dict], list, dict]:
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


BENCHES = {
    "conversion": bench_conversion, "block": bench_block, "step": bench_training, "gpu": bench_training,
    "commit": bench_commit,
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)
    moe = moe_from_overrides(overrides, base=MoEConfig(num_experts=4) if args.what == "conversion" else None)
    rows, cols, config = BENCHES[args.what](args, moe)
    out_json = Path(args.json or f"bench_{args.what}.json")
    print(_table(rows, cols))
    out_json.write_text(json.dumps({"machine": machine_info(), "config": config, "rows": rows}, indent=2))
    print(f"\nwritten: {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main, sys.argv[1:]))
