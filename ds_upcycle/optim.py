"""Optimizer parameter groups for DeepSpeed: which parameters train, and with what settings.

DeepSpeed builds the optimizer (type and hyper-parameters from the config's "optimizer" section)
over the groups given to ``deepspeed.initialize``. Expert parameters must sit in groups of their
own, reduced over expert-data-parallel ranks instead of all ranks:
``split_params_into_different_moe_groups_for_optimizer`` (deepspeed/moe/utils.py) splits every
group by expert group name and keeps each group's other keys.
"""

from __future__ import annotations

from torch import nn

from ds_upcycle.config import RunConfig


def param_groups(model: nn.Module, cfg: RunConfig) -> list[dict]:
    """The optimizer groups of ``model`` (every group has the "name" DeepSpeed's MoE split needs)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    from ds_upcycle.moe import moe_blocks

    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"}]
    if moe_blocks(model):
        groups = split_params_into_different_moe_groups_for_optimizer(groups[0])
    return groups
