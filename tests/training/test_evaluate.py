"""Evaluation metrics against hand computation and exact enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import SPECS

import archc
from archc.runtime.decoding import sample_next
from archc.training.evaluate import generate, pass_at_k, pass_at_k_report, perplexity, surprisal_report


def exact_pass_at_k(n: int, c: int, k: int) -> float:
    """Enumerate every k-subset of n samples (c correct) and count those with a pass."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_exact_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(exact_pass_at_k(n, c, k), abs=1e-12)


def test_pass_at_k_reference_vectors():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 0, 4) == 0.0
    assert pass_at_k(5, 5, 2) == 1.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    rows = pass_at_k_report({1: [3, 0], 2: [10]}, n=10, ks=[1, 5, 20])
    assert rows[0].pass_at == {1: pytest.approx(0.15), 5: pytest.approx((1 - 21 / 252) / 2)}
    assert rows[1].pass_at[1] == 1.0


@pytest.fixture(scope="module")
def tiny():
    compiled = archc.compile(str(SPECS / "llama.arch"), n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)
    torch.manual_seed(0)
    return compiled.build()


def test_perplexity_is_exp_of_the_token_mean_loss(tiny):
    windows = [torch.randint(0, 256, (2, 9)), torch.randint(0, 256, (3, 9))]
    result = perplexity(tiny, windows)
    with torch.no_grad():
        losses = []
        for w in windows:
            logits = tiny(w)["logits"]
            for b in range(w.shape[0]):
                for t in range(w.shape[1] - 1):
                    losses.append(-torch.log_softmax(logits[b, t], -1)[w[b, t + 1]].item())
    assert result.tokens == len(losses) == 5 * 8
    assert result.loss == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)


def test_sample_next_greedy_topk_topp():
    logits = torch.tensor([[0.0, 3.0, 2.0, -1.0]])
    assert sample_next(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    seen = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert seen == {1, 2}
    probs = torch.softmax(logits, -1)[0]  # 0.69, 0.25, ...: top_p 0.5 keeps only the first
    seen = {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)}
    assert probs[1] > 0.5 and seen == {1}


def test_generate_is_deterministic_by_seed_and_respects_length(tiny):
    a = generate(tiny, [1, 2, 3], 5, num_samples=3, seed=7)
    b = generate(tiny, [1, 2, 3], 5, num_samples=3, seed=7)
    assert a == b and all(len(row) == 5 for row in a)
    greedy = generate(tiny, [1, 2, 3], 4, temperature=0)
    with torch.no_grad():
        x = torch.tensor([[1, 2, 3]])
        for _ in range(4):
            x = torch.cat([x, tiny(x)["logits"][:, -1].argmax(-1, keepdim=True)], 1)
    assert greedy[0] == x[0, 3:].tolist()


def test_surprisal_report_lists_confident_mistakes(tiny):
    tokens = torch.randint(0, 256, (20,))
    report = surprisal_report(tiny, tokens, decode=lambda ids: bytes(ids).decode("latin-1"), top=5)
    assert 0 < len(report) <= 5
    assert all(r.predicted != r.expected for r in report)
    assert [r.predicted_prob for r in report] == sorted((r.predicted_prob for r in report), reverse=True)
