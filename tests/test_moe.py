"""The balance loss: DeepSpeed's statistic and ours on hand-made inputs; scope apart from statistic."""

import pytest
import torch
from deepspeed.moe.sharded_moe import top1gating, top2gating

from ds_upcycle.config import MoEConfig
from ds_upcycle.moe import attach_process_groups, balance_loss, moe_blocks
from ds_upcycle.upcycle import upcycle

# Router probabilities of 4 tokens over 4 experts (logits = log p, so softmax gives them back).
PROBS = torch.tensor(
    [
        [0.4, 0.3, 0.2, 0.1],  # first choice e0, top-2 {e0, e1}
        [0.1, 0.5, 0.3, 0.1],  # e1, {e1, e2}
        [0.2, 0.1, 0.6, 0.1],  # e2, {e2, e0}
        [0.1, 0.2, 0.4, 0.3],  # e2, {e2, e3}
    ]
)
LOGITS = PROBS.log()
MEAN_PROB = [0.2, 0.275, 0.375, 0.15]
FIRST_CHOICE = [0.25, 0.25, 0.5, 0.0]  # DeepSpeed's statistic at k <= 2
ALL_ROUTES = [2 / 8, 2 / 8, 3 / 8, 1 / 8]  # every top-2 route


def _expected(frac):
    return 4 * sum(p * f for p, f in zip(MEAN_PROB, frac, strict=True))


def test_hand_made_values():
    assert _expected(FIRST_CHOICE) == pytest.approx(1.225) and _expected(ALL_ROUTES) == pytest.approx(1.1125)
    for scope in (False, True):  # a one-process world: global = local
        assert balance_loss(LOGITS, 2, "deepspeed", scope).item() == pytest.approx(1.225, abs=1e-6)
        assert balance_loss(LOGITS, 2, "all_routes", scope).item() == pytest.approx(1.1125, abs=1e-6)
        assert balance_loss(LOGITS, 1, "deepspeed", scope).item() == pytest.approx(1.225, abs=1e-6)
    uniform = torch.zeros(6, 4)  # every route counted the same at k = 4: perfect balance
    assert balance_loss(uniform, 4, "deepspeed", False).item() == pytest.approx(1.0)


def test_the_deepspeed_statistic_is_deepspeeds_l_aux():
    l_aux2 = top2gating(LOGITS.clone(), 1.0, 1, drop_tokens=False, top2_2nd_expert_sampling=False)[0]
    l_aux1 = top1gating(LOGITS.clone(), 1.0, 1, drop_tokens=False, use_rts=False)[0]
    assert l_aux2.item() == pytest.approx(balance_loss(LOGITS, 2, "deepspeed", False).item(), abs=1e-6)
    assert l_aux1.item() == pytest.approx(balance_loss(LOGITS, 1, "deepspeed", False).item(), abs=1e-6)


@pytest.mark.parametrize("top_k", [2, 4])
def test_global_scope_differs_in_scope_only(dist_world, tiny_llama, top_k):
    """In a one-rank world the global scope counts the same tokens as the local one, so with the
    default statistic each block's loss must equal DeepSpeed's own l_aux; the other statistic differs."""
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    losses = {}
    for balance, statistic in [
        ("micro_batch", "deepspeed"),
        ("global_batch", "deepspeed"),
        ("micro_batch", "all_routes"),
    ]:
        model = upcycle(tiny_llama(), MoEConfig(top_k=top_k, balance=balance, balance_statistic=statistic))
        attach_process_groups(model)
        model.train()(ids)
        losses[balance, statistic] = torch.stack([b.aux_loss for _, b in moe_blocks(model)])
        if (balance, statistic) != ("micro_batch", "deepspeed"):
            assert all(b.own_balance for _, b in moe_blocks(model))
    local, glob, routes = losses.values()
    torch.testing.assert_close(glob, local, rtol=1e-6, atol=1e-6)
    if top_k == 2:
        assert (routes - local).abs().max() > 1e-4  # first choices vs all routes: a different statistic
    else:
        torch.testing.assert_close(routes, local, rtol=1e-6, atol=1e-6)  # DeepSpeed counts all routes at k > 2
