"""Out to the ecosystem: DeepSpeed checkpoints of ours -> HF Mixtral, and dense HF -> HF Mixtral.

DeepSpeed's own tools cannot do this for native MoE checkpoints (zero_to_fp32 fails, issue
#4497; universal checkpoints crash or duplicate experts, #5716/#6589), so the key map
(`ds_upcycle.mixtral`) is explicit and total: every source key is mapped, every target key is
produced with its shape, anything else is an error.

Both commands build a list of tensor specs and hand it to one write path,
:func:`write_mixtral`: contract check, sharded safetensors, config, tokenizer, and an output
folder that is swapped in only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ds_upcycle import checkpoint, mixtral
from ds_upcycle.config import MoEConfig, moe_from_overrides, moe_overrides_help
from ds_upcycle.loading import DTYPES, HF_DTYPE_NAMES, short_dtype_name
from ds_upcycle.paths import check_disjoint, check_replaceable
from ds_upcycle.safetensors_stream import TensorSpec, read_lazily, write_sharded

MAX_SHARD_BYTES = 5 * 10**9


def _add_expert_copies(specs: dict, key_match, shape, load, num_experts: int, router) -> None:
    """Map one dense MLP weight onto ``num_experts`` identical expert weights; with the layer's
    gate_proj, also add its router, produced by ``router(layer)`` ([E, hidden])."""
    layer, proj = int(key_match[1]), key_match[2]
    for e in range(num_experts):
        name = mixtral.expert_name(layer, e, proj)
        specs[name] = TensorSpec(name, shape, load)
    if proj == "gate_proj":
        gate = mixtral.router_name(layer)
        specs[gate] = TensorSpec(gate, (num_experts, shape[1]), lambda: router(layer))


# --------------------------------------------------------------------------------------------
# Output folders: never half-written, never over a model the user has
# --------------------------------------------------------------------------------------------


def prepare_output(out: Path, overwrite: bool, protected: dict[str, Path]) -> Path:
    """A fresh temporary folder next to ``out``; :func:`commit_output` moves it into place. ``out``
    must not overlap a ``protected`` input ({field: folder}), and is only ever replaced when it
    holds an HF model folder and nothing else (ds_upcycle/paths.py)."""
    for field, folder in protected.items():
        check_disjoint(out, "output", folder, field, containing=True)
    check_replaceable(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def commit_output(tmp: Path, out: Path) -> None:
    """Swap the finished folder in; the previous one (with --overwrite) is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{tmp.name.rsplit('-', 1)[-1]}")
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)


def write_mixtral(
    specs: dict[str, TensorSpec], dense_cfg, moe: MoEConfig, src_dir: Path | None, out: Path, dtype: str,
    overwrite: bool, max_shard_bytes: int, progress: str = "", protected: dict[str, Path] | None = None,
) -> dict:  # fmt: skip
    """The one write path: check ``specs`` against the Mixtral contract, write the shards, config,
    tokenizer and generation config into a folder next to ``out``, and swap it in when complete.
    ``progress``: the label of a progress bar over the bytes written (empty: no bar).
    ``protected``: {field: folder} inputs the output must not overlap."""
    from tqdm import tqdm

    plan = mixtral.check_against_contract(specs, dense_cfg, moe.num_experts, moe.granularity)
    out_dtype = DTYPES[dtype]
    config = mixtral.mixtral_config(dense_cfg, moe)
    config["dtype"] = HF_DTYPE_NAMES[out_dtype]
    total = sum(torch.Size(s.shape).numel() for s in plan) * torch.empty((), dtype=out_dtype).element_size()
    tmp = prepare_output(out, overwrite, protected or {})
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=progress, disable=not progress) as bar:
            write_sharded(plan, tmp, out_dtype, max_shard_bytes, progress=bar.update)
        _write_side_files(tmp, src_dir, config)
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out), "tensors": len(plan), "bytes": total, "dtype": str(out_dtype)}


def _write_side_files(out: Path, src_dir: Path | None, config: dict) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    gen = src_dir / "generation_config.json" if src_dir else None
    if gen is not None and gen.is_file():
        shutil.copy(gen, out / "generation_config.json")
    else:
        GenerationConfig(
            bos_token_id=config.get("bos_token_id"), eos_token_id=config.get("eos_token_id")
        ).save_pretrained(out)
    has_tokenizer = src_dir is not None and any(
        (src_dir / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if has_tokenizer:
        try:
            AutoTokenizer.from_pretrained(str(src_dir)).save_pretrained(str(out))
        except (OSError, ValueError) as e:
            raise ValueError(f"could not copy the tokenizer from {src_dir}: {e}") from None


# --------------------------------------------------------------------------------------------
# Export: a checkpoint of ours -> HF Mixtral
# --------------------------------------------------------------------------------------------


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    dtype: str | None = None,
    tag: int | None = None,
    allow_inexact: bool = False,
    expand_dense_layers: bool = False,
    overwrite: bool = False,
    source: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
    progress: bool = False,
) -> dict:
    """A DeepSpeed checkpoint of ours (any ep_size) -> an HF Mixtral folder. Returns a report."""
    folder = checkpoint.resolve(ckpt, tag)
    cfg, dense_cfg, src = checkpoint.load_meta(folder, source)
    moe = cfg.moe
    if expand_dense_layers:
        if moe.granularity > 1 and moe.layer_indices(dense_cfg.num_hidden_layers) != list(
            range(dense_cfg.num_hidden_layers)
        ):
            # A dense layer would need G segments per copy behind a zero router, and top-k of
            # E x G tied gates (torch.topk, no fixed tie order) could split copies: not exact.
            raise ValueError(
                f"--expand-dense-layers cannot write dense layers exactly when moe.granularity is {moe.granularity}; "
                'train granular runs with moe.moe_layers "all" to export them'
            )
        moe = dataclasses.replace(moe, moe_layers="all")
    warnings = mixtral.check_representable(dense_cfg, moe, allow_inexact)
    tied = bool(getattr(dense_cfg, "tie_word_embeddings", False))
    specs: dict[str, TensorSpec] = {}
    for key, (shape, load) in checkpoint.read_tensors(folder).items():
        if tied and key == "lm_head.weight":
            continue  # the same tensor as the embedding; Mixtral ties it too
        if m := mixtral.DENSE_MLP.match(key):
            if not expand_dense_layers:
                raise ValueError(f"layer {m[1]} is dense in this checkpoint; pass --expand-dense-layers")
            # A zero router: uniform gates over identical experts compute exactly the dense MLP.
            zeros = (moe.num_experts, shape[1])
            _add_expert_copies(specs, m, shape, load, moe.num_experts, lambda _, z=zeros: torch.zeros(z))
            continue
        name = mixtral.map_key(key)
        specs[name] = TensorSpec(name, shape, load)
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent
    protected = {"the checkpoint's run folder": run, "the dense source model": src}
    report = write_mixtral(specs, dense_cfg, moe, src, Path(out), dtype or cfg.model.dtype, overwrite,
                           max_shard_bytes, "export" if progress else "", protected)  # fmt: skip
    return {"checkpoint": str(folder), **report, "warnings": warnings}


# --------------------------------------------------------------------------------------------
# Offline conversion: dense HF -> HF Mixtral, streamed
# --------------------------------------------------------------------------------------------


def upcycle_offline(
    src: str | Path, out: str | Path, moe: MoEConfig, dtype: str | None = None, overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True,
) -> dict:  # fmt: skip
    """Dense HF checkpoint -> HF Mixtral checkpoint, tensor by tensor (peak memory ~ one layer's MLP).

    Routers and experts come from the same pure functions as online upcycling
    (``ds_upcycle.upcycle.router_init`` and ``expert_weights``: every expert_init, any granularity), so
    this output equals, bit for bit, what `ds-upcycle train` builds in memory at step 0.
    """
    from ds_upcycle.loading import check_model_dir, load_hf_config
    from ds_upcycle.upcycle import SUPPORTED_ARCHITECTURES

    src = check_model_dir(src, field="dense model")
    dense_cfg = load_hf_config(src, field="dense model")
    arch = (getattr(dense_cfg, "architectures", None) or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES or getattr(dense_cfg, "hidden_act", None) != "silu":
        raise ValueError(
            f"dense model ({str(src)!r}) is {arch} with hidden_act={getattr(dense_cfg, 'hidden_act', None)!r}; "
            f"upcycle supports dense {', '.join(SUPPORTED_ARCHITECTURES)} with SiLU MLPs"
        )
    mixtral.check_representable(dense_cfg, moe, allow_inexact=False)
    moe.check_intermediate(dense_cfg.intermediate_size)
    tied = bool(getattr(dense_cfg, "tie_word_embeddings", False))
    specs: dict[str, TensorSpec] = {}
    mlps: dict[int, dict[str, tuple]] = {}
    for key, (shape, load) in read_lazily(src).items():
        if tied and key == "lm_head.weight":
            continue
        if m := mixtral.DENSE_MLP.match(key):
            mlps.setdefault(int(m[1]), {})[m[2]] = (shape, load)
            continue
        if not mixtral.SHARED.match(key):
            raise ValueError(f"dense tensor {key!r} has no Mixtral counterpart; refusing to drop it silently")
        specs[key] = TensorSpec(key, shape, load)
    held: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # one expert at a time, over all layers
    for layer, mlp in sorted(mlps.items()):
        _add_upcycled_experts(specs, layer, mlp, moe, dense_cfg.hidden_size, held)
    dtype = dtype or short_dtype_name(getattr(dense_cfg, "dtype", None))
    report = write_mixtral(specs, dense_cfg, moe, src, Path(out), dtype, overwrite, max_shard_bytes,
                           "upcycle" if progress else "", {"the dense model": src})  # fmt: skip
    return {"source": str(src), **report}


def _add_upcycled_experts(
    specs: dict, layer: int, mlp: dict[str, tuple], moe: MoEConfig, hidden: int, held: dict
) -> None:
    """Specs for one layer's router and experts. Each expert is computed once from the layer's
    three dense matrices (the reader keeps the last three) and held until its three tensors are
    written. ``held`` is shared by all layers, so at most one expert is in memory at any time."""
    from ds_upcycle.upcycle import MLP_PROJECTIONS, expert_weights, router_init

    missing = [p for p in MLP_PROJECTIONS if p not in mlp]
    if missing:
        raise ValueError(f"dense layer {layer} lacks mlp.{missing[0]}.weight; upcycle needs gate, up and down")

    def weights(expert: int) -> dict[str, torch.Tensor]:
        if (layer, expert) not in held:
            held.clear()
            dense = {p: mlp[p][1]() for p in MLP_PROJECTIONS}
            held[layer, expert] = expert_weights(dense, moe, layer, expert)
        return held[layer, expert]

    gate = mixtral.router_name(layer)
    specs[gate] = TensorSpec(gate, (moe.num_experts, hidden), lambda: router_init(moe, layer, hidden))
    for expert in range(moe.num_experts):
        for proj in MLP_PROJECTIONS:
            rows, cols = mlp[proj][0]
            shape = (rows, cols // moe.granularity) if proj == "down_proj" else (rows // moe.granularity, cols)
            name = mixtral.expert_name(layer, expert, proj)
            specs[name] = TensorSpec(name, shape, lambda e=expert, p=proj: weights(e)[p])


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def export_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ds-upcycle export",
        description="Turn a DeepSpeed checkpoint of ours (trained at any ep_size) into a standard HF Mixtral "
        "folder: safetensors shards (<= 5 GB) with an index, config.json (rope, norms, heads, tying and token ids "
        "carried over), tokenizer and generation_config. Runs on one CPU machine; every key is mapped and "
        "every shape checked. Refuses what Mixtral cannot represent exactly.",
    )
    p.add_argument("checkpoint", help="a run folder, its checkpoints/ folder, or one step folder")
    p.add_argument("out_dir", help="the HF Mixtral folder to write (written atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the training dtype)")
    p.add_argument("--tag", type=int, default=None, help="export this step instead of the latest complete one")
    p.add_argument(
        "--source", default=None, help="dense source model folder (default: model.path recorded in the checkpoint)"
    )
    p.add_argument(
        "--allow-inexact", action="store_true", help="export top-1 or token-dropping runs anyway (LOUDLY inexact)"
    )
    p.add_argument("--expand-dense-layers", action="store_true", help="write dense layers as identical experts (exact)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model folder in out_dir (never a folder holding anything else)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    report = export_checkpoint(
        args.checkpoint, args.out_dir, args.dtype, args.tag, args.allow_inexact,
        args.expand_dense_layers, args.overwrite, args.source, progress=not args.no_progress,
    )  # fmt: skip
    for w in report["warnings"]:
        print(f"WARNING: INEXACT EXPORT: {w}", file=sys.stderr)
    print(f"exported {report['checkpoint']} -> {report['out']} ({report['tensors']} tensors, {report['dtype']})")
    return 0


def upcycle_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ds-upcycle upcycle",
        description="Offline conversion: dense HF Llama/Mistral checkpoint -> HF Mixtral checkpoint whose experts "
        "come from each dense MLP and whose routers are new, with the same recipes and seeded init as online "
        "upcycling (copies, noise, Drop-Upcycling, granular), bit for bit. "
        "Streams tensor by tensor, so peak memory is a few tensors, not the model. `ds-upcycle train` can "
        "start from the output.",
        epilog="example: ds-upcycle upcycle dense/ mixtral/ --moe.num_experts=8 --moe.top_k=2",
    )
    p.add_argument("dense_dir", help="dense HF checkpoint folder (safetensors)")
    p.add_argument("out_dir", help="the HF Mixtral folder to write (written atomically)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="weights dtype (default: the source's)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model folder in out_dir (never a folder holding anything else)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument_group("MoE settings", moe_overrides_help())
    args, overrides = p.parse_known_args(argv)
    moe = moe_from_overrides(overrides)
    report = upcycle_offline(
        args.dense_dir, args.out_dir, moe, args.dtype, args.overwrite, progress=not args.no_progress
    )
    print(
        f"upcycled {report['source']} -> {report['out']} ({report['tensors']} tensors, {report['bytes'] / 1e9:.2f} GB)"
    )
    return 0
