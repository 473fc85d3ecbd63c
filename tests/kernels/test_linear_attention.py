"""Causal linear attention: the chunked PyTorch form against the token-by-token reference.

Bounds (errors are relative to the reference's largest magnitude, or relative norms):
- fp32 chunked vs fp32 reference: max |a - b| <= 1e-5 * max |b| for outputs,
  final states and the gradients of every input (q, k, v, S0, z0);
- bf16 inputs: chunked(bf16) vs the fp32 reference on the same (bf16-rounded)
  values: ||a - b|| / ||b|| <= 5e-3 for outputs and gradients (both compute in
  fp32; the error is the rounding of the bf16 results).
The Triton face is tested in test_ssd_triton.py (in a child process under the interpreter).
"""

from __future__ import annotations

import os

import pytest
import torch

from archc.kernels.linear_attention import (
    elu_plus_one,
    linear_attention,
    linear_attention_chunked,
    linear_attention_reference,
)

FP32_TOL = 1e-5
BF16_TOL = 5e-3


def _max_rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _norm_rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _inputs(T, D, dtype=torch.float32, init=False, normalize=True, Bsz=2, H=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = elu_plus_one(torch.randn(Bsz, T, H, D, generator=g)).to(dtype)
    k = elu_plus_one(torch.randn(Bsz, T, H, D, generator=g)).to(dtype)
    v = torch.randn(Bsz, T, H, D, generator=g).to(dtype)
    state = None
    if init:  # a real state: the one a random 8-token prefix leaves
        kp = elu_plus_one(torch.randn(Bsz, 8, H, D, generator=g))
        vp = torch.randn(Bsz, 8, H, D, generator=g)
        S = torch.einsum("bthk,bthv->bhkv", kp, vp)
        state = (S, kp.sum(1)) if normalize else S
    return q, k, v, state


def _leaves(q, k, v, state):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    if state is None:
        return q, k, v, None, []
    if isinstance(state, tuple):
        state = tuple(s.detach().clone().requires_grad_() for s in state)
        return q, k, v, state, list(state)
    state = state.detach().clone().requires_grad_()
    return q, k, v, state, [state]


def _run(fn, q, k, v, state, normalize, **kw):
    """Forward with final state; gradients of sum(o * w) + sum(S_T * w_S) (+ z_T term) w.r.t. every input."""
    q, k, v, state, extra = _leaves(q, k, v, state)
    o, final = fn(q, k, v, state, True, normalize, **kw)
    g = torch.Generator().manual_seed(123)
    S_T = final[0] if normalize else final
    loss = (o.float() * torch.randn(o.shape, generator=g)).sum() + (S_T * torch.randn(S_T.shape, generator=g)).sum()
    if normalize:
        loss = loss + (final[1] * torch.randn(final[1].shape, generator=g)).sum()
    grads = torch.autograd.grad(loss, [q, k, v, *extra])
    finals = list(final) if normalize else [final]
    return o, finals, grads


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("init", [False, True], ids=["no_init", "init"])
@pytest.mark.parametrize("T", [64, 100], ids=["T64", "T100"])
@pytest.mark.parametrize("D", [32, 64], ids=["d32", "d64"])
def test_chunked_matches_reference_fp32(D, T, init, normalize):
    q, k, v, state = _inputs(T, D, init=init, normalize=normalize)
    o_r, f_r, g_r = _run(linear_attention_reference, q, k, v, state, normalize)
    o_c, f_c, g_c = _run(linear_attention_chunked, q, k, v, state, normalize, chunk_size=32)
    assert _max_rel(o_c, o_r) <= FP32_TOL
    for a, b in zip(f_c, f_r):
        assert a.dtype == torch.float32 and _max_rel(a, b) <= FP32_TOL
    assert len(g_c) == (3 + (2 if init and normalize else 1 if init else 0))
    for name, a, b in zip(["q", "k", "v", "S0", "z0"], g_c, g_r):
        assert _max_rel(a, b) <= FP32_TOL, name


@pytest.mark.parametrize("init", [False, True], ids=["no_init", "init"])
@pytest.mark.parametrize("D", [32, 64], ids=["d32", "d64"])
def test_chunked_matches_reference_bf16(D, init):
    q, k, v, state = _inputs(100, D, dtype=torch.bfloat16, init=init)
    o_r, f_r, g_r = _run(linear_attention_reference, q.float(), k.float(), v.float(), state, True)
    o_c, f_c, g_c = _run(linear_attention_chunked, q, k, v, state, True, chunk_size=32)
    assert o_c.dtype == torch.bfloat16 and _norm_rel(o_c, o_r) <= BF16_TOL
    for a, b in zip(f_c, f_r):
        assert _norm_rel(a, b) <= 1e-5  # states are fp32 sums of the same bf16 values
    for name, a, b in zip(["q", "k", "v", "S0", "z0"], g_c, g_r):
        assert _norm_rel(a, b) <= BF16_TOL, name


def test_default_chunk_and_short_sequences():
    for T in (1, 5, 64, 65, 130):
        q, k, v, state = _inputs(T, 32, init=True)
        o_r, f_r = linear_attention_reference(q, k, v, state, True)
        o_c, f_c = linear_attention_chunked(q, k, v, state, True)
        assert _max_rel(o_c, o_r) <= FP32_TOL
        assert _max_rel(f_c[0], f_r[0]) <= FP32_TOL and _max_rel(f_c[1], f_r[1]) <= FP32_TOL


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_token_by_token_continuation(impl, normalize):
    """Prompt -> final state -> one token at a time == the full-sequence output."""
    q, k, v, _ = _inputs(70, 32)
    full, f_full = linear_attention(q, k, v, None, True, normalize, impl="chunked", chunk_size=32)
    o, state = linear_attention(q[:, :50], k[:, :50], v[:, :50], None, True, normalize, impl="chunked", chunk_size=32)
    outs = [o]
    for t in range(50, 70):
        o_t, state = linear_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state, True, normalize, impl=impl)
        outs.append(o_t)
    assert _max_rel(torch.cat(outs, 1), full) <= FP32_TOL
    for a, b in zip(state if normalize else [state], f_full if normalize else [f_full]):
        assert _max_rel(a, b) <= FP32_TOL


def test_scale_and_eps_semantics():
    q, k, v, _ = _inputs(20, 16)
    # default scale K**-0.5 (FLA); with normalisation it cancels up to eps
    o1, _ = linear_attention_reference(q, k, v, scale=None)
    o2, _ = linear_attention_reference(q, k, v, scale=1.0)
    assert torch.allclose(o1, o2, atol=1e-5)
    o3, _ = linear_attention_reference(q, k, v, normalize=False, scale=None)
    o4, _ = linear_attention_reference(q, k, v, normalize=False, scale=1.0)
    assert torch.allclose(o3 * 4.0, o4, atol=1e-5)  # K = 16
    # explicit formula for one token
    t = 7
    qs = q[:, t] * 0.25
    num = torch.einsum("bshk,bshv,bhk->bhv", k[:, : t + 1], v[:, : t + 1], qs)
    den = torch.einsum("bshk,bhk->bh", k[:, : t + 1], qs)
    assert torch.allclose(o1[:, t], num / (den[..., None] + 1e-6), atol=1e-5)


def test_elu_plus_one():
    x = torch.tensor([-10.0, -1.0, 0.0, 2.0])
    y = elu_plus_one(x)
    assert torch.all(y > 0)
    assert torch.allclose(y, torch.cat([torch.exp(x[:2]), torch.tensor([1.0, 3.0])]), atol=1e-6)


def test_dispatcher_and_errors():
    q, k, v, state = _inputs(40, 16, init=True)
    o_a, f_a = linear_attention(q, k, v, state, True)  # auto on CPU = chunked
    o_c, f_c = linear_attention_chunked(q, k, v, state, True)
    assert torch.equal(o_a, o_c) and torch.equal(f_a[0], f_c[0])
    o_n, f_n = linear_attention(q, k, v)
    assert f_n is None
    with pytest.raises(ValueError, match="impl"):
        linear_attention(q, k, v, impl="fast")
    with pytest.raises(ValueError, match=r"\(S, z\)"):
        linear_attention(q, k, v, state[0], normalize=True)
    with pytest.raises(ValueError, match="S \\[B, H, K, V\\]"):
        linear_attention(q, k, v, state, normalize=False)
    with pytest.raises(ValueError, match="sequence-first"):
        linear_attention(q[0], k[0], v[0])
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(RuntimeError, match="CUDA"):
            linear_attention(q, k, v, impl="triton")
