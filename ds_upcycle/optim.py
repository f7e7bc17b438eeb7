"""Optimizer parameter groups for DeepSpeed: which parameters train, and with what settings.

DeepSpeed builds the optimizer (type and hyper-parameters from the config's "optimizer" section)
over the groups given to ``deepspeed.initialize``; a key set on a group (e.g. ``weight_decay``,
``lr``) overrides the section's value for that group.

Each trainable parameter gets a *kind* from :func:`param_kind`, and each kind its group settings
from :func:`kind_settings`:

- ``decay``: 2-D weights (projections, embeddings, experts): the optimizer's own weight_decay;
- ``no_decay``: 1-D parameters (RMSNorm gains) and biases (Qwen2's q/k/v): no weight decay, as
  Megatron-Core and the HF Trainer do;
- ``router``: the MoE routers' weights: ``moe.router_weight_decay`` (default 0), and with
  ``moe.router_lr_scale`` != 1 an ``"lr"`` of the scaled peak. The LR schedule (train.py, a LambdaLR
  over DeepSpeed's optimizer) multiplies each group's own initial lr, so the ratio holds at every
  step. ``moe.freeze_router`` takes the routers out of training altogether (no gradient).

Expert parameters must then sit in groups of their own, reduced over expert-data-parallel ranks
instead of all ranks: ``split_params_into_different_moe_groups_for_optimizer``
(deepspeed/moe/utils.py) splits every group by expert group name and keeps each group's other keys,
so expert groups inherit their kind's settings. Every group carries its ``kind``.
"""

from __future__ import annotations

from torch import nn

from ds_upcycle.config import RunConfig

KINDS = ("decay", "no_decay", "router")
ROUTER_WEIGHT = "deepspeed_moe.gate.wg.weight"
"""The name ending of a router weight inside deepspeed.moe.layer.MoE (TopKGate.wg)."""


def param_kind(name: str, param: nn.Parameter) -> str:
    """The group a parameter belongs to: "router", "no_decay" or "decay"."""
    if name.endswith(ROUTER_WEIGHT):
        return "router"
    if param.ndim < 2 or name.endswith(".bias"):
        return "no_decay"
    return "decay"


def kind_settings(kind: str, cfg: RunConfig) -> dict:
    """The optimizer settings of one kind's group (absent keys: the optimizer section's values)."""
    if kind == "no_decay":
        return {"weight_decay": 0.0}
    if kind == "router":
        settings = {"weight_decay": cfg.moe.router_weight_decay}
        if cfg.moe.router_lr_scale != 1.0:
            peak = cfg.ds["optimizer"]["params"]["lr"]  # preflight.check_optimizer has checked it
            settings["lr"] = peak * cfg.moe.router_lr_scale
        return settings
    return {}


def router_params(model: nn.Module) -> list[nn.Parameter]:
    """Every MoE layer's router weight (DeepSpeed's TopKGate.wg), in layer order."""
    from ds_upcycle.moe import moe_blocks

    return [block.gate_weight for _, block in moe_blocks(model)]


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict]:
    """The optimizer groups of ``model`` (every group has the "name" DeepSpeed's MoE split needs)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from ds_upcycle.moe import moe_blocks

    if cfg.moe.freeze_router:
        for p in router_params(model):
            p.requires_grad_(False)
    params: dict[str, list[nn.Parameter]] = {kind: [] for kind in KINDS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            params[param_kind(name, p)].append(p)
    groups = [
        {"params": ps, "name": kind, "kind": kind, **kind_settings(kind, cfg)} for kind, ps in params.items() if ps
    ]
    if moe_blocks(model):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return [g for g in groups if g["params"]]
