"""The W&B workspace of an ablation group, as code (the `wandb-workspaces` package).

:func:`build_workspace` lays out, for the runs of one W&B group: loss, router load per MoE layer,
the upcycling-health metrics and throughput. Every panel names keys the trainer logs
(README, metrics glossary); :func:`panel_keys` lists them so a run's history can be checked
against it where no W&B server is reachable. Needs ``pip install wandb-workspaces`` (the
``workspace`` extra); without it ablate skips the workspace and says so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def workspace_keys(layers: list[int], num_experts: int, health: bool = True, margin: bool = True) -> dict:
    """{section: [one panel's y keys, ...]} for MoE layers ``layers`` and up to ``num_experts``
    experts. ``health``: some run measures upcycling health (log.health_every > 0); ``margin``: one
    does so after a training step (the router margin needs training forwards)."""
    health_panels = [
        ["health/dense_sim_mean", "health/dense_sim_min"],
        ["health/expert_sim_mean"],
        [f"health/layer_{layer:02d}/dense_sim_mean" for layer in layers],
        *([["health/router_margin"]] if margin else []),
    ]
    return {
        "Loss": [["loss/lm"], ["eval/loss"], ["loss/aux"]],
        **({"Upcycling health": health_panels} if health else {}),
        "Router load per layer": [
            [f"router/layer_{layer:02d}/expert_{e:02d}" for e in range(num_experts)] for layer in layers
        ],
        "Router balance": [["router/max_over_mean_worst"], ["router/entropy_mean"], ["router/dead_frac_mean"]],
        "Throughput": [["throughput/tokens_per_s"], ["throughput/mfu"], ["memory/peak_gib"]],
    }


def build_workspace(
    group: str, layers: list[int], num_experts: int, project: str = "ds_upcycle", entity: str = "",
    health: bool = True, margin: bool = True,
):  # fmt: skip
    """A ``wandb_workspaces.workspaces.Workspace`` over the runs of W&B group ``group``."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces import expr

    sections = [
        ws.Section(name=name, is_open=True, panels=[wr.LinePlot(title=_title(keys), y=keys) for keys in panels])
        for name, panels in workspace_keys(layers, num_experts, health, margin).items()
    ]
    return ws.Workspace(
        entity=entity or os.environ.get("WANDB_ENTITY", ""),
        project=project,
        name=f"ablation {group}",
        sections=sections,
        runset_settings=ws.RunsetSettings(filters=[expr.Metric("Group") == group]),
    )


def _title(keys: list[str]) -> str:
    if len(keys) == 1:
        return keys[0]
    head = os.path.commonprefix(keys).rstrip("/_")
    return f"{head} ({len(keys)} series)" if head else ", ".join(keys)


def panel_keys(workspace) -> set[str]:
    """Every metric key a panel of ``workspace`` plots."""
    return {key for section in workspace.sections for panel in section.panels for key in panel.y}


def write_workspace(workspace, out: Path, logged: set[str], online: bool) -> dict:
    """Check every panel against the keys the runs logged, write the workspace's spec to
    ``out/wandb_workspace.json`` and, when online, save it to W&B. Returns a report."""
    missing = sorted(panel_keys(workspace) - logged)
    if missing:
        raise ValueError(f"W&B workspace panels name keys no run logged, e.g. {missing[0]!r}")
    path = out / "wandb_workspace.json"
    # The view W&B stores (Workspace.save uploads this model); written so it can be saved later.
    view = workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)
    path.write_text(json.dumps(view, indent=2))
    url = ""
    if online and workspace.entity:
        url = workspace.save().url
    return {"spec": str(path), "panels": sum(len(s.panels) for s in workspace.sections), "url": url}
