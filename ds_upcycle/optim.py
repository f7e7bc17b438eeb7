"""Optimizer parameter groups for DeepSpeed: which parameters train, and with what settings.

DeepSpeed builds the optimizer (type and hyper-parameters from the config's "optimizer" section)
over the groups given to ``deepspeed.initialize``. Expert parameters must sit in groups of their
own, reduced over expert-data-parallel ranks instead of all ranks:
``split_params_into_different_moe_groups_for_optimizer`` (deepspeed/moe/utils.py) splits every
group by expert group name and keeps each group's other keys.

Router controls (``moe.freeze_router``, ``moe.router_lr_scale``): the routers get no gradient, or a
group of their own whose ``"lr"`` is the scaled peak. The LR schedule (train.py, a LambdaLR over
DeepSpeed's optimizer) multiplies each group's own initial lr, so the ratio holds at every step.
"""

from __future__ import annotations

from torch import nn

from ds_upcycle.config import RunConfig

ROUTER_GROUP = "router"


def router_params(model: nn.Module) -> list[nn.Parameter]:
    """Every MoE layer's router weight (DeepSpeed's TopKGate.wg), in layer order."""
    from ds_upcycle.moe import moe_blocks

    return [block.gate_weight for _, block in moe_blocks(model)]


def apply_router_controls(model: nn.Module, cfg: RunConfig) -> list[dict]:
    """Freeze the routers (moe.freeze_router), or return their own group when moe.router_lr_scale
    is not 1 (empty list otherwise: they stay with the other parameters)."""
    routers = router_params(model)
    if cfg.moe.freeze_router:
        for p in routers:
            p.requires_grad_(False)
        return []
    if not routers or cfg.moe.router_lr_scale == 1.0:
        return []
    peak = cfg.ds["optimizer"]["params"]["lr"]  # preflight.check_optimizer has checked it
    return [{"params": routers, "name": ROUTER_GROUP, "lr": peak * cfg.moe.router_lr_scale}]


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict]:
    """The optimizer groups of ``model`` (every group has the "name" DeepSpeed's MoE split needs)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from ds_upcycle.moe import moe_blocks

    router_groups = apply_router_controls(model, cfg)
    own_group = {id(p) for g in router_groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own_group]
    groups = [{"params": rest, "name": "parameters"}, *router_groups]
    if moe_blocks(model):
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups
