"""The MoE block that replaces a dense Llama MLP: a thin wrapper around deepspeed.moe.layer.MoE.

Architecture only: no I/O, no logging, no config files. The forward reads as
route -> dispatch -> experts -> combine, all inside DeepSpeed's MOELayer; this module only
adapts its (out, l_aux, exp_counts) tuple to the plain tensor a decoder layer expects, and keeps
the per-forward router statistics for the trainer.

Shape legend: B batch, S sequence, D hidden, T = B*S tokens, E experts (global).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from torch import nn

from ds_upcycle.config import MoEConfig


class MoEBlock(nn.Module):
    """Drop-in replacement for ``LlamaMLP`` whose experts start as copies of ``expert``.

    After each forward, ``aux_loss`` (scalar, with grad), ``z_loss`` (scalar or None),
    ``exp_counts`` (local routed-token counts per expert before any dropping, [E]) and
    ``num_tokens`` (local T) and ``dropped_tokens`` (routes past capacity, 0 when dropless)
    describe that forward. Training forwards also add to the router-margin sums that
    :meth:`pop_margin` hands over (the upcycling-health metrics).
    """

    def __init__(self, hidden_size: int, expert: nn.Module, cfg: MoEConfig) -> None:
        super().__init__()
        # NOTE: DeepSpeed's Experts deep-copies `expert` num_experts/ep_size times
        # (deepspeed/moe/experts.py), so each rank builds only its local experts straight from
        # the dense MLP: the paper's "online upcycling".
        self.moe = MoE(
            hidden_size,
            expert,
            num_experts=cfg.num_experts,
            ep_size=cfg.ep_size,
            k=cfg.top_k,
            capacity_factor=cfg.capacity_factor,
            eval_capacity_factor=cfg.eval_capacity_factor,
            min_capacity=cfg.min_capacity,
            drop_tokens=cfg.drop_tokens,
            use_rts=False,  # random token selection only affects top-1 drops; keep runs deterministic
            # NOTE: DeepSpeed defaults this to True and then adds Gumbel noise to the 2nd expert's
            # choice even in eval() (deepspeed/moe/sharded_moe.py top2gating; upstream PR #8620).
            # Off: exactness at step 0, determinism, and parity with HF Mixtral.
            top2_2nd_expert_sampling=False,
        )
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.drop_tokens = cfg.drop_tokens
        self.capacity_factors = (cfg.eval_capacity_factor, cfg.capacity_factor)  # (eval, train)
        self.min_capacity = cfg.min_capacity
        self.global_balance = cfg.balance == "global_batch"
        self.balance_statistic = cfg.balance_statistic
        # DeepSpeed's own l_aux is the local-scope, "deepspeed"-statistic loss; anything else is recomputed.
        self.own_balance = self.global_balance or cfg.balance_statistic != "deepspeed"
        self.with_z_loss = cfg.z_loss_coef > 0
        self.aux_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.exp_counts: torch.Tensor | None = None
        self.dropped_tokens: torch.Tensor | int = 0
        self.num_tokens = 0
        self.granularity = cfg.granularity
        self._margin = torch.zeros(2, dtype=torch.float64)  # (sum of top-k margins, tokens)

    @property
    def gate_weight(self) -> nn.Parameter:
        """Router weight, [E, D]; identical on every rank."""
        return self.moe.deepspeed_moe.gate.wg.weight

    @property
    def local_experts(self) -> nn.ModuleList:
        """This rank's experts: global ids ep_rank * len(local_experts) + i."""
        return self.moe.deepspeed_moe.experts.deepspeed_experts

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        if self.training and self.top_k < self.num_experts:
            self._record_margin(x_BSD)
        out_BSD, l_aux, exp_counts = self.moe(x_BSD)
        self.exp_counts = exp_counts
        self.num_tokens = x_BSD.numel() // x_BSD.shape[-1]
        self.aux_loss = l_aux
        if self.drop_tokens:
            # Capacity as DeepSpeed computes it from the local token count (sharded_moe.py
            # _capacity with capacity_factor * k); routes past it are dropped.
            cf = self.capacity_factors[int(self.training)]
            capacity = max(math.ceil(self.num_tokens / self.num_experts * cf * self.top_k), self.min_capacity)
            self.dropped_tokens = (exp_counts - capacity).clamp(min=0).sum()
        if self.own_balance or self.with_z_loss:
            # DeepSpeed's gate does not expose its logits; recompute them (E columns: cheap).
            logits_TE = F.linear(x_BSD.reshape(-1, x_BSD.shape[-1]).float(), self.gate_weight.float())
            if self.own_balance:
                self.aux_loss = balance_loss(logits_TE, self.top_k, self.balance_statistic, self.global_balance)
            if self.with_z_loss:
                self.z_loss = torch.logsumexp(logits_TE, dim=-1).square().mean()
        return out_BSD

    @torch.no_grad()
    def _record_margin(self, x_BSD: torch.Tensor) -> None:
        """Add this forward's router margins: the gap between the k-th and (k+1)-th gate value
        (softmax over all experts in fp32, as deepspeed/moe/sharded_moe.py topkgating computes it)."""
        logits_TE = F.linear(x_BSD.reshape(-1, x_BSD.shape[-1]).float(), self.gate_weight.float())
        top_TK = logits_TE.softmax(dim=-1).topk(self.top_k + 1, dim=-1).values
        margin = (top_TK[:, -2] - top_TK[:, -1]).double().sum()
        self._margin = self._margin.to(margin.device) + torch.stack([margin, margin.new_tensor(top_TK.shape[0])])

    def pop_margin(self) -> torch.Tensor:
        """(sum of router margins, tokens) since the last call, as a float64 [2] tensor; resets."""
        out, self._margin = self._margin, torch.zeros_like(self._margin)
        return out


def balance_loss(logits_TE: torch.Tensor, top_k: int, statistic: str, global_scope: bool) -> torch.Tensor:
    """Load-balancing loss E * sum_e mean_prob_e * frac_e (1 under perfect balance).

    mean_prob_e is the mean router probability of expert e over this rank's tokens (it carries the
    gradient). frac_e is the share of counted routes that go to expert e, with no gradient:

    - statistic "deepspeed" counts what DeepSpeed's gate counts: each token's first choice for
      top_k <= 2, all top_k routes for top_k > 2 (deepspeed/moe/sharded_moe.py: top1gating and
      top2gating use mask1, topkgating the full mask), so with global_scope False this equals
      DeepSpeed's own l_aux; "all_routes" counts all top_k routes at every k.
    - global_scope all-reduces the counts over every rank of the default process group (the whole
      world: every rank routes its own tokens) before the division, for this micro-batch only.
    """
    probs_TE = logits_TE.softmax(dim=-1)
    num_experts = probs_TE.shape[-1]
    if statistic == "deepspeed" and top_k <= 2:
        routes_TK = probs_TE.argmax(dim=-1, keepdim=True)  # argmax, as DeepSpeed: the same tie-breaking
    else:
        routes_TK = probs_TE.topk(top_k, dim=-1).indices
    counts_E = torch.zeros(num_experts, device=probs_TE.device, dtype=torch.float32)
    counts_E.scatter_add_(0, routes_TK.reshape(-1), torch.ones(routes_TK.numel(), device=probs_TE.device))
    if global_scope and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts_E)
    frac_E = counts_E / counts_E.sum()
    return num_experts * (probs_TE.mean(dim=0) * frac_E).sum()


def moe_blocks(model: nn.Module) -> list[tuple[int, MoEBlock]]:
    """(decoder layer index, block) for every MoE block of an upcycled HF causal LM."""
    return [(i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoEBlock)]


def attach_process_groups(model: nn.Module) -> None:
    """Create/attach the expert-parallel groups for use outside ``deepspeed.initialize``.

    The engine does this itself (engine.py, ``set_deepspeed_parallelism`` on every module); call
    this only for engine-less inference. Needs ``deepspeed.init_distributed()`` first. Safe to
    call twice (DeepSpeed's TopKGate asserts if its group is set twice).
    """
    for _, block in moe_blocks(model):
        if block.moe.deepspeed_moe.ep_group is None:
            block.moe.set_deepspeed_parallelism()
