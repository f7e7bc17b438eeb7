"""Out to the ecosystem: DeepSpeed checkpoints of ours -> HF Mixtral, and dense HF -> HF Mixtral.

DeepSpeed's own tools cannot do this for native MoE checkpoints (zero_to_fp32 fails, issue
#4497; universal checkpoints crash or duplicate experts, #5716/#6589), so the key map lives here,
explicit and total: every source key is mapped, every target key is produced with its shape,
anything else is an error.

Target names are the classic Mixtral ones, which transformers 4.x and 5.x and vLLM load:
``block_sparse_moe.gate`` for the router and ``experts.{e}.w1/w3/w2`` for gate/up/down_proj.

Exactness: Mixtral routes softmax -> top-k -> renormalise, which is DeepSpeed's top-k (k >= 2)
function exactly. It is dropless, has an MoE block in every layer, and has no biases.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from ds_upcycle.config import MoEConfig, RunConfig, run_config_from_dict
from ds_upcycle.plan import ModelShape
from ds_upcycle.safetensors_stream import TensorSpec, write_sharded

CLASSIC = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SHARD_BYTES = 5 * 10**9

_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.moe\.deepspeed_moe\.gate\.wg\.weight$")
_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
_DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
_SHARED = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj\.weight|input_layernorm\.weight|post_attention_layernorm\.weight))$"
)


# --------------------------------------------------------------------------------------------
# The contract: Mixtral config and the set of target tensors
# --------------------------------------------------------------------------------------------


def check_mixtral_representable(dense_cfg, moe: MoEConfig, allow_inexact: bool) -> list[str]:
    """Raise ValueError for what Mixtral cannot represent; return the warnings that
    --allow-inexact accepted."""
    name = type(dense_cfg).__name__
    if getattr(dense_cfg, "model_type", "") not in ("llama", "mistral"):
        raise ValueError(
            f"source config {name} (model_type {getattr(dense_cfg, 'model_type', None)!r}) cannot become Mixtral: "
            "only Llama and Mistral attention maps onto it"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(dense_cfg, flag, False):
            raise ValueError(f"source config has {flag}=True; Mixtral has no biases, so the export would drop them")
    layers = moe.layer_indices(dense_cfg.num_hidden_layers)
    if len(layers) != dense_cfg.num_hidden_layers:
        raise ValueError(
            f"moe.moe_layers ({moe.moe_layers!r}) makes only {len(layers)} of {dense_cfg.num_hidden_layers} layers MoE; "
            "Mixtral has an MoE block in every layer. Pass --expand-dense-layers to write each dense MLP as "
            f"{moe.num_experts} identical experts with a zero router (exact: renormalised top-k of copies is the MLP)"
        )
    problems = []
    if moe.top_k == 1:
        problems.append(
            "moe.top_k is 1: DeepSpeed scales the chosen expert by its gate probability, Mixtral renormalises it to 1, "
            "so the exported model computes a different function. Train with top_k >= 2 for an exact export"
        )
    if moe.drop_tokens:
        problems.append(
            "moe.drop_tokens was true in training: Mixtral never drops tokens, so its outputs differ wherever "
            "training dropped; the weights are exported unchanged. Train dropless for an exact export"
        )
    if problems and not allow_inexact:
        raise ValueError(problems[0] + "; or pass --allow-inexact to export anyway")
    return problems


def mixtral_config(dense_cfg, moe: MoEConfig) -> dict:
    """config.json for the Mixtral twin of a Llama/Mistral config, carrying everything over."""
    from transformers import MixtralConfig

    d = dense_cfg.to_dict()
    shape = ModelShape.from_hf_config(dense_cfg)
    cfg = MixtralConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        hidden_act=dense_cfg.hidden_act,
        max_position_embeddings=dense_cfg.max_position_embeddings,
        rms_norm_eps=dense_cfg.rms_norm_eps,
        tie_word_embeddings=shape.tied,
        bos_token_id=dense_cfg.bos_token_id,
        eos_token_id=dense_cfg.eos_token_id,
        pad_token_id=getattr(dense_cfg, "pad_token_id", None),
        attention_dropout=getattr(dense_cfg, "attention_dropout", 0.0),
        sliding_window=getattr(dense_cfg, "sliding_window", None),
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        router_aux_loss_coef=moe.aux_loss_coef,
        router_jitter_noise=0.0,
        rope_parameters=d.get("rope_parameters"),
    )
    out = cfg.to_dict()
    out["architectures"] = ["MixtralForCausalLM"]
    # Classic rope keys too, for readers before transformers 5 (4.x, vLLM). Losing rope_scaling
    # is the classic export bug (mergekit #88, #380).
    rope = dict(d.get("rope_parameters") or {})
    out["rope_theta"] = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    out["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else d.get("rope_scaling")
    return out


def target_shapes(dense_cfg, num_experts: int) -> dict[str, tuple[int, ...]]:
    """Every tensor a Mixtral checkpoint of this shape holds, in classic names, with its shape."""
    shape = ModelShape.from_hf_config(dense_cfg)
    h, f, v, heads, kv, hd = shape.hidden, shape.intermediate, shape.vocab, shape.heads, shape.kv_heads, shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (heads * hd, h)
        out[p + "self_attn.k_proj.weight"] = (kv * hd, h)
        out[p + "self_attn.v_proj.weight"] = (kv * hd, h)
        out[p + "self_attn.o_proj.weight"] = (h, heads * hd)
        out[p + "block_sparse_moe.gate.weight"] = (num_experts, h)
        for e in range(num_experts):
            out[p + f"block_sparse_moe.experts.{e}.w1.weight"] = (f, h)
            out[p + f"block_sparse_moe.experts.{e}.w3.weight"] = (f, h)
            out[p + f"block_sparse_moe.experts.{e}.w2.weight"] = (h, f)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not shape.tied:
        out["lm_head.weight"] = (v, h)
    return out


def map_moe_key(key: str) -> str:
    """Our (DeepSpeed) parameter name -> the classic Mixtral name. ValueError when unmapped."""
    if m := _GATE.match(key):
        return f"model.layers.{m[1]}.block_sparse_moe.gate.weight"
    if m := _EXPERT.match(key):
        return f"model.layers.{m[1]}.block_sparse_moe.experts.{m[2]}.{CLASSIC[m[3]]}.weight"
    if _SHARED.match(key):
        return key
    raise ValueError(f"checkpoint tensor {key!r} has no Mixtral counterpart; refusing to drop it silently")


def _add_expert_copies(specs: dict, key_match, shape, load, num_experts: int, router) -> None:
    """Map one dense MLP weight onto ``num_experts`` identical expert weights; with the layer's
    gate_proj, also add its router, produced by ``router(layer)`` ([E, hidden])."""
    layer, proj = int(key_match[1]), key_match[2]
    for e in range(num_experts):
        name = f"model.layers.{layer}.block_sparse_moe.experts.{e}.{CLASSIC[proj]}.weight"
        specs[name] = TensorSpec(name, shape, load)
    if proj == "gate_proj":
        gate = f"model.layers.{layer}.block_sparse_moe.gate.weight"
        specs[gate] = TensorSpec(gate, (num_experts, shape[1]), lambda: router(layer))


def _finish_plan(specs: dict[str, TensorSpec], dense_cfg, num_experts: int) -> list[TensorSpec]:
    """Check the mapped tensors against the Mixtral contract; return them in canonical order."""
    expected = target_shapes(dense_cfg, num_experts)
    missing = [k for k in expected if k not in specs]
    if missing:
        raise ValueError(f"the source lacks {len(missing)} tensors Mixtral needs, e.g. {missing[0]!r}")
    extra = [k for k in specs if k not in expected]
    if extra:
        raise ValueError(f"the source has tensors Mixtral cannot hold, e.g. {extra[0]!r}")
    for k, spec in specs.items():
        if tuple(spec.shape) != expected[k]:
            raise ValueError(f"tensor {k} has shape {tuple(spec.shape)}, Mixtral needs {expected[k]}")
    return [specs[k] for k in expected]


# --------------------------------------------------------------------------------------------
# Output folders: never half-written, never over a model the user has
# --------------------------------------------------------------------------------------------


def _looks_like_model(p: Path) -> bool:
    return p.is_dir() and any(
        (p / n).exists() for n in ("config.json", "model.safetensors", "model.safetensors.index.json")
    )


def prepare_output(out: Path, overwrite: bool) -> Path:
    """A fresh temporary folder next to ``out``; :func:`commit_output` moves it into place."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output ({str(out)!r}) is a file; give a folder")
    if _looks_like_model(out) and not overwrite:
        raise ValueError(f"output ({str(out)!r}) already holds a model; choose another folder or pass --overwrite")
    if out.is_dir() and any(out.iterdir()) and not _looks_like_model(out) and not overwrite:
        raise ValueError(
            f"output ({str(out)!r}) is a non-empty folder; choose an empty or new folder, or pass --overwrite"
        )
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
# Reading our DeepSpeed checkpoints
# --------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path, tag: int | None = None) -> Path:
    """A run folder, its checkpoints/ folder, or one step folder -> the step folder to read."""
    from ds_upcycle import checkpoint

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"checkpoint ({str(path)!r}) is not a folder; give a run folder or its checkpoints/")
    if (p / checkpoint.STATE).is_file() or (p / checkpoint.MANIFEST).is_file():
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    if tag is not None:
        folder = root / checkpoint.tag_for(tag)
        if not folder.is_dir():
            have = sorted(q.name for q in root.glob("step_*"))
            raise ValueError(f"--tag {tag}: no {folder}; available: {', '.join(have) or 'none'}")
        return folder
    latest = checkpoint.latest_tag(root)
    if latest is None:
        raise ValueError(f"checkpoint ({str(path)!r}) holds no complete checkpoint (no {checkpoint.LATEST})")
    return root / latest


def load_checkpoint_meta(folder: Path, source: str | None = None):
    """(RunConfig, dense HF config, source model dir) of a verified checkpoint folder."""
    from ds_upcycle import checkpoint
    from ds_upcycle.loading import load_hf_config

    state = checkpoint.verify(folder)
    cfg: RunConfig = run_config_from_dict(state["config"])
    src = Path(source or cfg.model.path)
    field = "--source" if source else f"model.path recorded in {folder / checkpoint.STATE} (override with --source)"
    dense_cfg = load_hf_config(src, field=field)
    if getattr(dense_cfg, "model_type", "") == "mixtral":
        raise ValueError(f"{field} ({str(src)!r}) is a Mixtral folder; give the dense source checkpoint")
    return cfg, dense_cfg, src


def checkpoint_tensors(folder: Path) -> dict[str, tuple[tuple[int, ...], callable]]:
    """{our key: (shape, loader)} over the model-states file and every expert file; loaders read
    with ``torch.load(weights_only=True)``, one expert file at a time."""
    model_states = folder / "mp_rank_00_model_states.pt"
    if not model_states.is_file():
        raise ValueError(f"checkpoint {folder} has no mp_rank_00_model_states.pt")
    module = torch.load(model_states, map_location="cpu", weights_only=True)["module"]
    out = {k: (tuple(t.shape), (lambda t=t: t)) for k, t in module.items()}
    expert_files = sorted(folder.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    if any(_GATE.match(k) for k in module) and not expert_files:
        raise ValueError(f"checkpoint {folder} has MoE routers but no expert files (layer_*_expert_*_model_states.pt)")
    cache: dict[Path, dict] = {}

    def loader(path: Path, key: str):
        def load():
            if path not in cache:
                cache.clear()  # hold one expert file at a time
                cache[path] = torch.load(path, map_location="cpu", weights_only=True)
            return cache[path][key]

        return load

    for path in expert_files:
        for key, t in torch.load(path, map_location="meta", weights_only=True).items():
            out[key] = (tuple(t.shape), loader(path, key))
    return out


def load_moe_model(ckpt: str | Path, tag: int | None = None, source: str | None = None):
    """(model, run config, dense source folder): our trained MoE model from a checkpoint, rebuilt in
    one process (ep 1) whatever ep_size trained it: the dense skeleton, upcycled, then every tensor
    loaded strictly."""
    from ds_upcycle.loading import load_dense_model
    from ds_upcycle.upcycle import upcycle

    folder = resolve_checkpoint(ckpt, tag)
    cfg, _, src = load_checkpoint_meta(folder, source)
    model = upcycle(
        load_dense_model(src, "fp32", field="model.path"), dataclasses.replace(cfg.moe, ep_size=1), ep_rank=0
    )
    state = {k: load().float() for k, (_, load) in checkpoint_tensors(folder).items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, src


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
) -> dict:
    """A DeepSpeed checkpoint of ours (any ep_size) -> an HF Mixtral folder. Returns a report."""
    folder = resolve_checkpoint(ckpt, tag)
    cfg, dense_cfg, src = load_checkpoint_meta(folder, source)
    moe = cfg.moe
    if expand_dense_layers:
        moe = dataclasses.replace(moe, moe_layers="all")
    warnings = check_mixtral_representable(dense_cfg, moe, allow_inexact)
    out_dtype = OUT_DTYPES[dtype or cfg.model.dtype]
    tensors = checkpoint_tensors(folder)
    tied = bool(getattr(dense_cfg, "tie_word_embeddings", False))
    specs: dict[str, TensorSpec] = {}
    for key, (shape, load) in tensors.items():
        if tied and key == "lm_head.weight":
            continue  # the same tensor as the embedding; Mixtral ties it too
        if m := _DENSE_MLP.match(key):
            if not expand_dense_layers:
                raise ValueError(f"layer {m[1]} is dense in this checkpoint; pass --expand-dense-layers")
            # A zero router: uniform gates over identical experts compute exactly the dense MLP.
            zeros = (moe.num_experts, shape[1])
            _add_expert_copies(specs, m, shape, load, moe.num_experts, lambda _, z=zeros: torch.zeros(z))
            continue
        name = map_moe_key(key)
        specs[name] = TensorSpec(name, shape, load)
    plan = _finish_plan(specs, dense_cfg, moe.num_experts)
    config = mixtral_config(dense_cfg, moe)
    config["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[out_dtype]
    out = Path(out)
    tmp = prepare_output(out, overwrite)
    try:
        write_sharded(plan, tmp, out_dtype, max_shard_bytes)
        _write_side_files(tmp, src, config)
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "checkpoint": str(folder),
        "out": str(out),
        "tensors": len(plan),
        "dtype": str(out_dtype),
        "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------
# Offline conversion: dense HF -> HF Mixtral, streamed
# --------------------------------------------------------------------------------------------


def safetensors_tensors(src: Path, keep: int = 3) -> dict[str, tuple[tuple[int, ...], callable]]:
    """{name: (shape, loader)} over a folder's safetensors shards, read lazily.

    The last ``keep`` tensors read stay in memory: an upcycled MLP writes gate, up and down once
    per expert, so each is read from disk once, and peak memory stays at a few tensors.
    """
    from collections import OrderedDict

    from safetensors import safe_open

    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise ValueError(f"dense model ({str(src)!r}) has no *.safetensors weights")
    recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def loader(f: Path, k: str):
        def load() -> torch.Tensor:
            if k not in recent:
                with safe_open(str(f), framework="pt") as g:
                    recent[k] = g.get_tensor(k)
                while len(recent) > keep:
                    recent.popitem(last=False)
            recent.move_to_end(k)
            return recent[k]

        return load

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = (tuple(h.get_slice(k).get_shape()), loader(f, k))
    return out


def upcycle_offline(
    src: str | Path, out: str | Path, moe: MoEConfig, dtype: str | None = None, overwrite: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True,
) -> dict:  # fmt: skip
    """Dense HF checkpoint -> HF Mixtral checkpoint, tensor by tensor (peak memory ~ one tensor).

    The routers come from the same seeded init as online upcycling, so this output equals what
    `ds-upcycle train` builds in memory at step 0.
    """
    from tqdm import tqdm

    from ds_upcycle.loading import check_model_dir, load_hf_config
    from ds_upcycle.upcycle import SUPPORTED_ARCHITECTURES, router_init

    src = check_model_dir(src, field="dense model")
    dense_cfg = load_hf_config(src, field="dense model")
    arch = (getattr(dense_cfg, "architectures", None) or ["?"])[0]
    if arch not in SUPPORTED_ARCHITECTURES or getattr(dense_cfg, "hidden_act", None) != "silu":
        raise ValueError(
            f"dense model ({str(src)!r}) is {arch} with hidden_act={getattr(dense_cfg, 'hidden_act', None)!r}; "
            f"upcycle supports dense {', '.join(SUPPORTED_ARCHITECTURES)} with SiLU MLPs"
        )
    check_mixtral_representable(dense_cfg, moe, allow_inexact=False)
    if moe.expert_init != "copy":
        raise ValueError(f"moe.expert_init ({moe.expert_init!r}) is not supported offline; use 'copy'")
    tensors = safetensors_tensors(src)
    tied = bool(getattr(dense_cfg, "tie_word_embeddings", False))
    specs: dict[str, TensorSpec] = {}
    for key, (shape, load) in tensors.items():
        if tied and key == "lm_head.weight":
            continue
        if m := _DENSE_MLP.match(key):
            _add_expert_copies(
                specs, m, shape, load, moe.num_experts, lambda i: router_init(moe, i, dense_cfg.hidden_size)
            )
            continue
        if not _SHARED.match(key):
            raise ValueError(f"dense tensor {key!r} has no Mixtral counterpart; refusing to drop it silently")
        specs[key] = TensorSpec(key, shape, load)
    plan = _finish_plan(specs, dense_cfg, moe.num_experts)
    source_dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(
        str(getattr(dense_cfg, "dtype", "")).replace("torch.", ""), "fp32"
    )
    out_dtype = OUT_DTYPES[dtype or source_dtype]
    config = mixtral_config(dense_cfg, moe)
    config["dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[out_dtype]
    total = sum(torch.Size(s.shape).numel() for s in plan) * torch.empty((), dtype=out_dtype).element_size()
    out = Path(out)
    tmp = prepare_output(out, overwrite)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="upcycle", disable=not progress) as bar:
            write_sharded(plan, tmp, out_dtype, max_shard_bytes, progress=bar.update)
        _write_side_files(tmp, src, config)
        commit_output(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"source": str(src), "out": str(out), "tensors": len(plan), "bytes": total, "dtype": str(out_dtype)}


def check_mixtral_start(mixtral_cfg, moe: MoEConfig) -> None:
    """A Mixtral folder can seed training only with the MoE layout it has."""
    if (moe.num_experts, moe.top_k) != (mixtral_cfg.num_local_experts, mixtral_cfg.num_experts_per_tok):
        raise ValueError(
            f"moe.num_experts/top_k ({moe.num_experts}/{moe.top_k}) differ from the Mixtral model "
            f"({mixtral_cfg.num_local_experts}/{mixtral_cfg.num_experts_per_tok}); set them to match"
        )
    if moe.layer_indices(mixtral_cfg.num_hidden_layers) != list(range(mixtral_cfg.num_hidden_layers)):
        raise ValueError(f'moe.moe_layers ({moe.moe_layers!r}) must be "all" to start from a Mixtral model')


def load_mixtral_as_moe(src: str | Path, moe: MoEConfig, dtype: str = "fp32", ep_rank: int | None = None):
    """Our MoE model from an HF Mixtral folder (e.g. `ds-upcycle upcycle` output), reading only
    this rank's experts: the reverse of the export key map."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ds_upcycle.loading import DTYPES, load_hf_config
    from ds_upcycle.moe import moe_blocks
    from ds_upcycle.upcycle import expert_parallel_rank, upcycle

    src = Path(src)
    mcfg = load_hf_config(src, field="model.path")
    check_mixtral_start(mcfg, moe)
    d = mcfg.to_dict()
    for key in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
                "output_router_logits", "sliding_window", "model_type", "architectures"):  # fmt: skip
        d.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**d)).to(DTYPES[dtype])
    ep_rank = expert_parallel_rank(moe.ep_size) if ep_rank is None else ep_rank
    upcycle(model, moe, ep_rank=ep_rank)
    tensors = safetensors_tensors(src)
    num_local = moe.num_experts // moe.ep_size
    local = re.compile(
        r"^(model\.layers\.\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(\w+)\.weight$"
    )
    state = {}
    for key in model.state_dict():
        if m := local.match(key):
            name = f"{m[1]}.block_sparse_moe.experts.{ep_rank * num_local + int(m[2])}.{CLASSIC[m[3]]}.weight"
        elif key == "lm_head.weight" and mcfg.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        else:
            name = map_moe_key(key)
        if name not in tensors:
            raise ValueError(f"Mixtral folder {src} lacks {name!r} (needed for {key})")
        state[key] = tensors[name][1]().to(DTYPES[dtype])
    model.load_state_dict(state, strict=True)
    assert len(moe_blocks(model)) == mcfg.num_hidden_layers
    return model.eval()


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
    p.add_argument(
        "--dtype", choices=sorted(OUT_DTYPES), default=None, help="weights dtype (default: the training dtype)"
    )
    p.add_argument("--tag", type=int, default=None, help="export this step instead of the latest complete one")
    p.add_argument(
        "--source", default=None, help="dense source model folder (default: model.path recorded in the checkpoint)"
    )
    p.add_argument(
        "--allow-inexact", action="store_true", help="export top-1 or token-dropping runs anyway (LOUDLY inexact)"
    )
    p.add_argument("--expand-dense-layers", action="store_true", help="write dense layers as identical experts (exact)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in out_dir")
    args = p.parse_args(argv)
    try:
        report = export_checkpoint(
            args.checkpoint, args.out_dir, args.dtype, args.tag, args.allow_inexact,
            args.expand_dense_layers, args.overwrite, args.source,
        )  # fmt: skip
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for w in report["warnings"]:
        print(f"WARNING: INEXACT EXPORT: {w}", file=sys.stderr)
    print(f"exported {report['checkpoint']} -> {report['out']} ({report['tensors']} tensors, {report['dtype']})")
    return 0


def upcycle_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="ds-upcycle upcycle",
        description="Offline conversion: dense HF Llama/Mistral checkpoint -> HF Mixtral checkpoint whose experts "
        "are copies of each dense MLP and whose routers are new (the same seeded init as online upcycling). "
        "Streams tensor by tensor, so peak memory is a few tensors, not the model. `ds-upcycle train` can "
        "start from the output.",
    )
    p.add_argument("dense_dir", help="dense HF checkpoint folder (safetensors)")
    p.add_argument("out_dir", help="the HF Mixtral folder to write (written atomically)")
    p.add_argument("--num-experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--router-init", default="normal", help="normal (default) or zeros")
    p.add_argument("--router-init-std", type=float, default=0.02, help="std of the normal router init (default 0.02)")
    p.add_argument("--seed", type=int, default=1234, help="router init seed (default 1234, as MoEConfig)")
    p.add_argument("--dtype", choices=sorted(OUT_DTYPES), default=None, help="weights dtype (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in out_dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        moe = MoEConfig(num_experts=args.num_experts, top_k=args.top_k, router_init=args.router_init,
                        router_init_std=args.router_init_std, seed=args.seed)  # fmt: skip
        report = upcycle_offline(
            args.dense_dir, args.out_dir, moe, args.dtype, args.overwrite, progress=not args.no_progress
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"upcycled {report['source']} -> {report['out']} ({report['tensors']} tensors, {report['bytes'] / 1e9:.2f} GB)"
    )
    return 0
