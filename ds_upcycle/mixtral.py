"""The HF Mixtral contract, in one place: key map, target shapes, config, and what it can represent.

Export (`ds_upcycle.export`) writes it, the trainer starts from it (:func:`load_mixtral_as_moe`,
e.g. the output of `ds-upcycle upcycle`), and nothing else spells a Mixtral name.

Target names are the classic Mixtral ones, which transformers 4.x and 5.x and vLLM load:
``block_sparse_moe.gate`` for the router and ``experts.{e}.w1/w3/w2`` for gate/up/down_proj.

Exactness: Mixtral routes softmax -> top-k -> renormalise, which is DeepSpeed's top-k (k >= 2)
function exactly. It is dropless, has an MoE block in every layer, and has no biases.

Granular upcycling (moe.granularity G) maps onto a standard Mixtral too: num_experts experts of
width intermediate / G and num_experts_per_tok = top_k (both count fine-grained experts).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from ds_upcycle.config import MoEConfig
from ds_upcycle.plan import ModelShape
from ds_upcycle.safetensors_stream import TensorSpec

CLASSIC = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
"""Llama MLP projection -> classic Mixtral expert weight name."""

OUR_GATE = re.compile(r"^model\.layers\.(\d+)\.mlp\.moe\.deepspeed_moe\.gate\.wg\.weight$")
"""Our router parameter (DeepSpeed's TopKGate.wg) of layer group(1)."""
OUR_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.mlp\.moe\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$"
)
"""Our expert weight: layer, expert index (global in checkpoints, rank-local in a live model), projection."""
DENSE_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
"""A dense Llama MLP weight."""
SHARED = re.compile(
    r"^(model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight|"
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj\.weight|input_layernorm\.weight|post_attention_layernorm\.weight))$"
)
"""Tensors with the same name and meaning in Llama, our MoE and Mixtral."""


def check_representable(dense_cfg, moe: MoEConfig, allow_inexact: bool) -> list[str]:
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
        intermediate_size=shape.intermediate // moe.granularity,
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


def target_shapes(dense_cfg, num_experts: int, granularity: int = 1) -> dict[str, tuple[int, ...]]:
    """Every tensor a Mixtral checkpoint of this shape holds, in classic names, with its shape
    (experts of width intermediate / granularity)."""
    shape = ModelShape.from_hf_config(dense_cfg)
    h, v, heads, kv, hd = shape.hidden, shape.vocab, shape.heads, shape.kv_heads, shape.head_dim
    f = shape.intermediate // granularity
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


def expert_name(layer: int | str, expert: int | str, projection: str) -> str:
    """The classic Mixtral name of one expert weight (projection: gate_proj, up_proj or down_proj)."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{CLASSIC[projection]}.weight"


def router_name(layer: int | str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def map_key(key: str) -> str:
    """Our (DeepSpeed) parameter name -> the classic Mixtral name. ValueError when unmapped."""
    if m := OUR_GATE.match(key):
        return router_name(m[1])
    if m := OUR_EXPERT.match(key):
        return expert_name(m[1], m[2], m[3])
    if SHARED.match(key):
        return key
    raise ValueError(f"checkpoint tensor {key!r} has no Mixtral counterpart; refusing to drop it silently")


def check_against_contract(
    specs: dict[str, TensorSpec], dense_cfg, num_experts: int, granularity: int = 1
) -> list[TensorSpec]:
    """Check mapped tensors against the Mixtral contract (every tensor present, nothing extra,
    every shape right); return them in canonical order."""
    expected = target_shapes(dense_cfg, num_experts, granularity)
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
    from ds_upcycle.safetensors_stream import read_lazily
    from ds_upcycle.upcycle import expert_parallel_rank, upcycle

    src = Path(src)
    mcfg = load_hf_config(src, field="model.path")
    check_mixtral_start(mcfg, moe)
    d = mcfg.to_dict()
    for key in ("num_local_experts", "num_experts_per_tok", "router_aux_loss_coef", "router_jitter_noise",
                "output_router_logits", "sliding_window", "model_type", "architectures"):  # fmt: skip
        d.pop(key, None)
    # A dense skeleton that upcycling turns into the folder's layout (granular: G x the expert
    # width); its weights are all replaced below, so the experts are built as plain copies.
    d["intermediate_size"] = mcfg.intermediate_size * moe.granularity
    model = LlamaForCausalLM(LlamaConfig(**d)).to(DTYPES[dtype])
    ep_rank = expert_parallel_rank(moe.ep_size) if ep_rank is None else ep_rank
    upcycle(model, dataclasses.replace(moe, expert_init="copy"), ep_rank=ep_rank)
    tensors = read_lazily(src)
    num_local = moe.num_experts // moe.ep_size
    state = {}
    for key in model.state_dict():
        if m := OUR_EXPERT.match(key):  # a rank-local index in the live model
            name = expert_name(m[1], ep_rank * num_local + int(m[2]), m[3])
        elif key == "lm_head.weight" and mcfg.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        else:
            name = map_key(key)
        if name not in tensors:
            raise ValueError(f"Mixtral folder {src} lacks {name!r} (needed for {key})")
        state[key] = tensors[name][1]().to(DTYPES[dtype])
    model.load_state_dict(state, strict=True)
    assert len(moe_blocks(model)) == mcfg.num_hidden_layers
    return model.eval()
