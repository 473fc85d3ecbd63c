"""Routers against per-token loop references; balance losses; capacity; aux-free bias update."""

from __future__ import annotations

import math

import pytest
import torch

from archc.runtime.moe import (
    Router,
    combine_rows,
    dispatch_rows,
    sequence_balance_loss,
    switch_balance_loss,
    update_expert_biases,
)


def per_token_reference(router: Router, x: torch.Tensor):
    """Route one token at a time with plain Python: the obviously-right version."""
    experts, weights = [], []
    for t in range(x.shape[0]):
        logits = [float(v) for v in (router.gate.weight.detach().double() @ x[t].double())]
        E, k = len(logits), router.top_k
        if router.kind == "deepseek_v3":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
            bias = router.expert_bias.tolist() if router.balance == "aux_free" else [0.0] * E
            biased = [s + b for s, b in zip(scores, bias)]
            size = E // router.groups
            blocks = [biased[g * size:(g + 1) * size] for g in range(router.groups)]
            group_score = [sum(sorted(b, reverse=True)[:2]) if router.balance == "aux_free" else max(b) for b in blocks]
            kept_groups = sorted(range(router.groups), key=lambda g: -group_score[g])[:router.top_groups]
            allowed = [i for i in range(E) if i // size in kept_groups]
            chosen = sorted(allowed, key=lambda i: -biased[i])[:k]
            total = sum(scores[i] for i in chosen) if router.norm_topk_prob else 1.0
            w = [scores[i] / total * router.route_scale for i in chosen]
        elif router.kind == "switch":
            m = max(logits)
            probs = [math.exp(v - m) for v in logits]
            probs = [p / sum(probs) for p in probs]
            chosen = sorted(range(E), key=lambda i: -probs[i])[:k]
            total = sum(probs[i] for i in chosen) if router.norm_topk_prob else 1.0
            w = [probs[i] / total for i in chosen]
        elif not router.norm_topk_prob:  # softmax over all experts, the top k kept as they are
            m = max(logits)
            probs = [math.exp(v - m) for v in logits]
            probs = [p / sum(probs) for p in probs]
            chosen = sorted(range(E), key=lambda i: -probs[i])[:k]
            w = [probs[i] for i in chosen]
        else:
            chosen = sorted(range(E), key=lambda i: -logits[i])[:k]
            top = [logits[i] for i in chosen]
            m = max(top)
            w = [math.exp(v - m) / sum(math.exp(u - m) for u in top) for v in top]
        experts.append(chosen)
        weights.append(w)
    return torch.tensor(experts), torch.tensor(weights, dtype=torch.float64)


CASES = {
    "softmax": dict(kind="softmax"),
    "switch_top1": dict(kind="switch", top_k=1),
    "switch_top2": dict(kind="switch"),
    "deepseek": dict(kind="deepseek_v3", balance="aux_free", route_scale=2.5),
    "deepseek_groups": dict(kind="deepseek_v3", balance="aux_free", groups=4, top_groups=2),
    "deepseek_seq_aux": dict(kind="deepseek_v3", balance="seq_aux", groups=2, top_groups=1),
    # norm_topk_prob overriding each router's own rule (Qwen2-MoE / OLMoE: softmax, not renormalised)
    "softmax_unnormalised": dict(kind="softmax", norm_topk_prob=False),
    "switch_renormalised": dict(kind="switch", norm_topk_prob=True),
    "deepseek_unnormalised": dict(kind="deepseek_v3", balance="aux_free", route_scale=2.0, norm_topk_prob=False),
}


def test_norm_topk_prob_defaults_follow_each_router():
    assert Router(4, 4, 2).norm_topk_prob and Router(4, 4, 2, "deepseek_v3", balance="aux_free").norm_topk_prob
    assert not Router(4, 4, 2, "switch").norm_topk_prob
    torch.manual_seed(0)
    router, x = Router(8, 6, 3, norm_topk_prob=False), torch.randn(5, 8)
    weights = router(x).weights
    assert (weights.sum(-1) < 1 - 1e-3).all()  # the top 3 of 6 probabilities, as they are


@pytest.mark.parametrize("case", list(CASES))
def test_router_matches_per_token_loop(case):
    torch.manual_seed(0)
    kw = {"top_k": 2, **CASES[case]}
    router = Router(16, 8, **kw)
    if router.balance == "aux_free":
        router.expert_bias.copy_(torch.randn(8) * 0.05)
    x = torch.randn(40, 16)
    routing = router(x, seq_len=10)
    experts, weights = per_token_reference(router, x)
    assert torch.equal(routing.experts, experts)
    torch.testing.assert_close(routing.weights.double(), weights, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_moe_output_and_gradients_match_per_token_loop(case):
    torch.manual_seed(1)
    router = Router(12, 8, **{"top_k": 2, **CASES[case]})
    experts = torch.nn.ModuleList(torch.nn.Linear(12, 12) for _ in range(8))
    x = torch.randn(15, 12, requires_grad=True)
    routing = router(x, seq_len=5)
    rows = dispatch_rows(x, routing)
    outs = torch.cat([e(r) for e, r in zip(experts, rows.split(routing.split_sizes()))])
    fast = combine_rows(outs, routing)
    slow = torch.stack([sum(routing.weights[t, j] * experts[routing.experts[t, j]](x[t])
                            for j in range(routing.top_k)) for t in range(15)])
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    g_fast = torch.autograd.grad(fast.square().sum(), [x, router.gate.weight, experts[0].weight], allow_unused=True,
                                 materialize_grads=True, retain_graph=True)
    g_slow = torch.autograd.grad(slow.square().sum(), [x, router.gate.weight, experts[0].weight], allow_unused=True,
                                 materialize_grads=True)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_balance_losses_equal_their_weight_under_perfect_balance():
    E, N = 4, 16
    experts = torch.stack([torch.arange(N) % E, (torch.arange(N) + 1) % E], dim=1)
    uniform = torch.full((N, E), 1.0 / E)
    assert switch_balance_loss(uniform, experts, E).item() == pytest.approx(1.0)
    assert sequence_balance_loss(uniform, experts, E, seq_len=8).item() == pytest.approx(1.0)
    router = Router(8, E, top_k=1, kind="switch", aux_weight=0.01)
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 5.0  # every token sure of expert 0: the worst imbalance
    router(torch.ones(8, 8))
    assert router.aux_loss.item() == pytest.approx(0.01 * E, rel=1e-6)


def test_capacity_drops_exactly_the_overflow_in_priority_order():
    router = Router(4, 2, top_k=2, kind="switch", capacity_factor=0.5)  # C = ceil(2*4/2*0.5) = 2
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[3.0, 0, 0, 0], [2.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    routing = router(x)
    # first choices: tokens 0,1,2 -> expert 0, token 3 -> expert 1; expert 0 admits tokens 0 and 1 only.
    # second choices (after all first choices): tokens 0,1,2 -> expert 1 (admits one more: token 0), 3 -> 0 (full)
    assert routing.experts[:, 0].tolist() == [0, 0, 0, 1]
    assert routing.kept.tolist() == [[True, True], [True, False], [False, False], [True, False]]
    assert (routing.weights[~routing.kept] == 0).all()
    assert router.stats["dropped_fraction"] == pytest.approx(4 / 8)


def test_aux_free_bias_moves_load_toward_uniform():
    torch.manual_seed(0)
    router = Router(8, 8, top_k=2, kind="deepseek_v3", balance="aux_free", bias_rate=0.02)
    with torch.no_grad():
        router.gate.weight.add_(torch.linspace(0, 1, 8)[:, None] * 0.5)  # skew toward the last experts
    x = torch.randn(256, 8).abs()
    imbalance = []
    for _ in range(60):
        router(x)
        imbalance.append(router.stats["max_over_mean_load"])
        update_expert_biases(router)
    assert imbalance[-1] < imbalance[0] * 0.7
    assert router.expert_bias.requires_grad is False and "expert_bias" in router.state_dict()


def test_bad_router_options():
    with pytest.raises(ValueError, match="top_k"):
        Router(4, 2, top_k=3)
    with pytest.raises(ValueError, match="groups"):
        Router(4, 6, top_k=1, groups=4)
