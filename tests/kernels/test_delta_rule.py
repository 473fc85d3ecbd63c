"""Gated delta rule (GDN / KDA): the chunked PyTorch form against the recurrent reference.

Recipe (docs/algorithms.md §3.5): L2-normalised q and k, beta in (0, 1), g = logsigmoid(randn)
clamped to [-5, 0) (per head for GDN, per key channel for KDA), T a multiple of the chunk and
not, with and without an initial state, head dims 32 and 64. Errors are relative L2 errors
||a - b|| / ||b|| against the fp32 reference:
- fp32 inputs: 1e-5 for outputs, final state and all gradients (observed ~1e-7);
- bf16 inputs: 1e-2 (the chunked path computes in fp32 from the same bf16 values, so the
  error is the bf16 rounding of o and of the gradients, ~3e-3); the final state is fp32 and
  stays at 1e-5.
- very strong decay (g ~ -20 per token, or -50 with a mostly padded last chunk): the same 1e-5
  for everything but the gradient of g, whose true size is ~exp(g) while the chunked form gets
  it as a sum of cancelling terms the size of k's gradient (the cumulative sum's backward, as
  in FLA); its error is bounded by 1e-6 * max |dk| (observed ~1e-9).
The Triton kernels are tested in test_delta_rule_triton.py (in a subprocess, interpreted).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from archc.kernels.delta_rule import delta_rule, delta_rule_chunked, delta_rule_reference
from archc.kernels.delta_rule_chunks import FACTOR_SPAN, SUB_CHUNK, _decayed_grams
from archc.kernels.linear_attention import linear_attention_reference
from archc.kernels.ssd import ssd_reference

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def make_inputs(B, T, H, K, V, *, per_head, init, seed=0, g_min=-5.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen)
    g_shape = (B, T, H) if per_head else (B, T, H, K)
    g = F.logsigmoid(torch.randn(*g_shape, generator=gen)).clamp(min=g_min)
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(B, H, K, V, generator=gen) if init else None
    return [x.to(dtype) if x is not None else None for x in (q, k, v, g, beta, h0)]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_with_grads(fn, xs, do, dht, **kw):
    """Run fn(q, k, v, g, beta, initial_state) and return (o, final_state, grads of every input)."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in xs]
    o, ht = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True, **kw)
    ((o.float() * do).sum() + (ht * dht).sum()).backward()
    return o.detach(), ht.detach(), [x.grad if x is not None else None for x in leaves]


GRAD_NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def compare(xs, *, dtype, chunk_size, tol_o, tol_s, tol_grad, tol_dg_vs_dk=None):
    """Chunked on `xs` cast to dtype vs the fp32 reference on the same (rounded) values.

    tol_dg_vs_dk: if given, g's gradient is checked as max |error| <= tol * max |dk| instead.
    """
    xs_lo = [x.to(dtype) if x is not None else None for x in xs]
    xs_ref = [x.float() if x is not None else None for x in xs_lo]
    gen = torch.Generator().manual_seed(1)
    B, T, H, _ = xs[0].shape
    V, K = xs[2].shape[-1], xs[0].shape[-1]
    do = torch.randn(B, T, H, V, generator=gen)
    dht = torch.randn(B, H, K, V, generator=gen)
    o_ref, s_ref, g_ref = run_with_grads(delta_rule_reference, xs_ref, do, dht)
    o, s, grads = run_with_grads(delta_rule_chunked, xs_lo, do, dht, chunk_size=chunk_size)
    assert o.dtype == dtype and s.dtype == torch.float32
    assert rel(o, o_ref) < tol_o, rel(o, o_ref)
    assert rel(s, s_ref) < tol_s, rel(s, s_ref)
    for name, a, b in zip(GRAD_NAMES, grads, g_ref):
        if b is None:
            continue
        assert a.dtype == dtype
        assert torch.isfinite(a).all(), name
        if name == "g" and tol_dg_vs_dk is not None:
            err = (a.double() - b.double()).abs().max().item()
            assert err <= tol_dg_vs_dk * g_ref[1].abs().max().item(), (name, err)
            continue
        assert rel(a, b) < tol_grad, (name, rel(a, b))


# ----------------------------------------------------------------------------- chunked vs reference


@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
@pytest.mark.parametrize("T", [64, 100])
@pytest.mark.parametrize("D", [32, 64])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_matches_reference_fp32(decay, T, D, init):
    xs = make_inputs(2, T, 2, D, D, per_head=decay == "per_head", init=init, seed=T + D)
    compare(xs, dtype=torch.float32, chunk_size=64, tol_o=FP32_TOL, tol_s=FP32_TOL, tol_grad=FP32_TOL)


@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
@pytest.mark.parametrize("chunk_size", [16, 32])
def test_chunked_other_chunk_sizes(decay, chunk_size):
    # T = 70: several chunks and a ragged last one; K != V.
    xs = make_inputs(1, 70, 2, 32, 48, per_head=decay == "per_head", init=True, seed=chunk_size)
    compare(xs, dtype=torch.float32, chunk_size=chunk_size, tol_o=FP32_TOL, tol_s=FP32_TOL, tol_grad=FP32_TOL)


@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
@pytest.mark.parametrize("init", [False, True])
def test_chunked_matches_reference_bf16(decay, init):
    xs = make_inputs(2, 100, 2, 32, 32, per_head=decay == "per_head", init=init, seed=7)
    compare(xs, dtype=torch.bfloat16, chunk_size=64, tol_o=BF16_TOL, tol_s=FP32_TOL, tol_grad=BF16_TOL)


@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
def test_chunked_strong_decay_is_finite_and_exact(decay):
    # Up to -30 nats per token (~-1900 per chunk): any exp(+gamma) would overflow to inf.
    xs = make_inputs(1, 96, 2, 32, 32, per_head=decay == "per_head", init=True, seed=3, g_min=-100.0)
    xs[3] = xs[3] * 6
    compare(xs, dtype=torch.float32, chunk_size=64, tol_o=FP32_TOL, tol_s=FP32_TOL, tol_grad=FP32_TOL)


@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
def test_chunked_very_strong_decay(decay):
    # g ~ -20 per token: every diagonal sub-chunk block takes the exact pairwise path, and the
    # chunk's decay (~-1300 nats) would overflow any exp(+gamma); T = 100 has a ragged chunk.
    xs = make_inputs(1, 100, 2, 32, 32, per_head=decay == "per_head", init=True, seed=4)
    gen = torch.Generator().manual_seed(9)
    xs[3] = (-20 + torch.randn(xs[3].shape, generator=gen)).clamp(max=0)
    compare(xs, dtype=torch.float32, chunk_size=64, tol_o=FP32_TOL, tol_s=FP32_TOL, tol_grad=FP32_TOL,
            tol_dg_vs_dk=1e-6)


@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
@pytest.mark.parametrize("T", [1, 17, 20])
def test_chunked_steep_partial_last_chunk(decay, T):
    # g = -50 per token with T = 1, C + 1, 20 for C = 16: the last chunk is mostly padding and any
    # exp(gamma_pad - gamma_j) of a padded row would overflow (issue 17); every gradient must match.
    xs = make_inputs(1, T, 2, 16, 16, per_head=decay == "per_head", init=True, seed=T)
    xs[3] = torch.full_like(xs[3], -50.0)
    compare(xs, dtype=torch.float32, chunk_size=16, tol_o=FP32_TOL, tol_s=FP32_TOL, tol_grad=FP32_TOL,
            tol_dg_vs_dk=1e-6)


def test_chunked_decay_gentle_then_steep():
    # Per-channel decay that turns steep (~-4 nats per token, ~60 per sub-chunk) at token 40 and
    # only in half the channels: one call mixes factored and pairwise diagonal blocks.
    xs = make_inputs(2, 100, 2, 32, 32, per_head=False, init=True, seed=12)
    steep = (torch.arange(100)[:, None] >= 40) & (torch.arange(32)[None, :] % 2 == 0)
    xs[3] = torch.where(steep[:, None, :], xs[3] * 4 - 1, xs[3])
    compare(xs, dtype=torch.float32, chunk_size=64, tol_o=FP32_TOL, tol_s=FP32_TOL, tol_grad=FP32_TOL)


def _gram_by_definition(x, y, gam):
    """sum_c x_ic y_jc exp(gam_ic - gam_jc) for i >= j, else 0, with an explicit [C, C, D] decay tensor."""
    C = x.shape[-2]
    lower = torch.ones(C, C, dtype=torch.bool).tril()[..., None]
    diff = gam[..., :, None, :] - gam[..., None, :, :]
    decay = torch.where(lower, diff, torch.full_like(diff, -math.inf)).exp()
    return torch.einsum("...ic,...jc,...ijc->...ij", x, y, decay)


def _spans(gam, block):
    """How far the cumulative decay falls inside each block of `block` tokens (max over channels)."""
    g = gam.reshape(*gam.shape[:-2], -1, block, gam.shape[-1])
    return (g[..., :1, :] - g).amax(dim=(-2, -1))


@pytest.mark.parametrize("C", [16, 32, 64])
def test_decayed_grams_match_definition(C):
    # Sub-chunks gentle or steep (~6 nats per token), so every path runs in one call: whole
    # chunks as one matmul, chunks split into sub-chunks whose diagonal blocks are matmuls, and
    # sub-chunks computed pairwise. float64, so that any discrepancy is the method, not rounding.
    gen = torch.Generator().manual_seed(C)
    k, q = (torch.randn(3, 2, C, 24, generator=gen, dtype=torch.float64) for _ in range(2))
    ns = C // SUB_CHUNK
    steep = torch.rand(6, ns, generator=gen) < 0.5
    steep[0], steep[1], steep[2, 0] = False, True, False  # one all-gentle chunk, one all-steep, one mixed
    steep[2, -1] = True
    steep = steep.reshape(3, 2, ns, 1, 1).expand(3, 2, ns, SUB_CHUNK, 24).reshape(3, 2, C, 24)
    g = -torch.rand(3, 2, C, 24, generator=gen, dtype=torch.float64) * torch.where(steep, 12.0, 0.5)
    gam = g.cumsum(-2)
    for block in (C, SUB_CHUNK):
        assert (_spans(gam, block) > FACTOR_SPAN).any() and (_spans(gam, block) <= FACTOR_SPAN).any()
    leaves = [t.clone().requires_grad_() for t in (k, q, gam)]
    a, p = _decayed_grams((leaves[0], leaves[1]), leaves[0], leaves[2], per_head=False)
    a_ref, p_ref = _gram_by_definition(k, k, gam), _gram_by_definition(q, k, gam)
    torch.testing.assert_close(a, a_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p, p_ref, rtol=1e-12, atol=1e-12)
    # Gradients too (the chunked path is trained through autograd).
    w1, w2 = torch.randn(a.shape, generator=gen, dtype=torch.float64), torch.randn(a.shape, generator=gen,
                                                                                 dtype=torch.float64)
    grads = torch.autograd.grad((a * w1).sum() + (p * w2).sum(), leaves)
    ref_leaves = [t.clone().requires_grad_() for t in (k, q, gam)]
    a_r = _gram_by_definition(ref_leaves[0], ref_leaves[0], ref_leaves[2])
    p_r = _gram_by_definition(ref_leaves[1], ref_leaves[0], ref_leaves[2])
    ref_grads = torch.autograd.grad((a_r * w1).sum() + (p_r * w2).sum(), ref_leaves)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def _autograd_ops(t):
    """Names of every node in t's autograd graph."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("face", ["delta_rule", "ssd", "linear_attention"])
def test_references_backward_is_linear_in_T(face):
    """The per-token loops take their slices with one unbind: a Select/Slice per token would make
    each backward step write a full-size zero gradient (quadratic in T)."""
    gen = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 9, 2, 4, generator=gen, requires_grad=True) for _ in range(3)]
    gate = torch.rand(1, 9, 2, generator=gen, requires_grad=True)
    if face == "delta_rule":
        o, _ = delta_rule_reference(*x, -gate, gate)
    elif face == "ssd":
        A = torch.rand(2, generator=gen).neg().requires_grad_()
        Bm, Cm = (torch.randn(1, 9, 1, 4, generator=gen, requires_grad=True) for _ in range(2))
        o, _ = ssd_reference(x[0], gate, A, Bm, Cm)
    else:
        o, _ = linear_attention_reference(*x)
    ops = _autograd_ops(o)
    assert "UnbindBackward0" in ops
    assert not ops & {"SelectBackward0", "SliceBackward0", "IndexBackward0"}, ops


def test_per_head_decay_equals_broadcast_per_channel_decay():
    q, k, v, g, beta, h0 = make_inputs(1, 50, 2, 32, 32, per_head=True, init=True)
    g_kda = g[..., None].expand(*g.shape, 32)
    for fn in (delta_rule_reference, delta_rule_chunked):
        o1, s1 = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True)
        o2, s2 = fn(q, k, v, g_kda, beta, initial_state=h0, output_final_state=True)
        assert rel(o1, o2) < FP32_TOL and rel(s1, s2) < FP32_TOL


def test_reference_single_step_by_hand():
    # One token, per-channel decay: S' = (I - b k k^T) diag(a) S + b k v^T, o = S'^T q * scale.
    q, k, v, g, beta, h0 = make_inputs(1, 1, 1, 4, 3, per_head=False, init=True, g_min=-1.0)
    S = h0[0, 0]
    kt, vt, qt, b, a = k[0, 0, 0], v[0, 0, 0], q[0, 0, 0], beta[0, 0, 0], g[0, 0, 0].exp()
    S_new = (torch.eye(4) - b * torch.outer(kt, kt)) @ torch.diag(a) @ S + b * torch.outer(kt, vt)
    o, s = delta_rule_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True, scale=0.5)
    torch.testing.assert_close(s[0, 0], S_new)
    torch.testing.assert_close(o[0, 0, 0], S_new.T @ qt * 0.5)


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
def test_generation_consistency(decay):
    """Decoding token by token from the state a prompt leaves equals running the whole sequence."""
    q, k, v, g, beta, h0 = make_inputs(2, 45, 2, 32, 32, per_head=decay == "per_head", init=True, seed=11)
    P = 30
    o_full, s_full = delta_rule_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    for prompt_impl in (delta_rule_reference, delta_rule_chunked):
        o_prompt, state = prompt_impl(
            q[:, :P], k[:, :P], v[:, :P], g[:, :P], beta[:, :P], initial_state=h0, output_final_state=True
        )
        outs = [o_prompt]
        for t in range(P, 45):
            step = slice(t, t + 1)
            o_t, state = delta_rule_reference(
                q[:, step], k[:, step], v[:, step], g[:, step], beta[:, step],
                initial_state=state, output_final_state=True,
            )
            outs.append(o_t)
        assert rel(torch.cat(outs, dim=1), o_full) < FP32_TOL
        assert rel(state, s_full) < FP32_TOL
    # The chunked form also resumes from a state (decode in chunks of 5).
    _, state = delta_rule_chunked(q[:, :P], k[:, :P], v[:, :P], g[:, :P], beta[:, :P], h0, True, chunk_size=16)
    tail = []
    for t in range(P, 45, 5):
        s_ = slice(t, t + 5)
        o_t, state = delta_rule_chunked(q[:, s_], k[:, s_], v[:, s_], g[:, s_], beta[:, s_], state, True)
        tail.append(o_t)
    assert rel(torch.cat(tail, dim=1), o_full[:, P:]) < FP32_TOL
    assert rel(state, s_full) < FP32_TOL


# ----------------------------------------------------------------------------- API


def test_dispatcher_and_defaults():
    q, k, v, g, beta, h0 = make_inputs(1, 20, 2, 16, 16, per_head=False, init=True)
    o_auto, s_auto = delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_ch, s_ch = delta_rule_chunked(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert torch.equal(o_auto, o_ch) and torch.equal(s_auto, s_ch)  # CPU: auto -> chunked
    o_ref, none = delta_rule(q, k, v, g, beta, initial_state=h0, impl="reference")
    assert none is None and rel(o_ref, o_ch) < FP32_TOL
    # scale defaults to K ** -0.5
    o_sc, _ = delta_rule(q, k, v, g, beta, initial_state=h0, scale=16**-0.5, impl="reference")
    assert torch.equal(o_sc, o_ref)
    with pytest.raises(ValueError, match="impl must be"):
        delta_rule(q, k, v, g, beta, impl="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        delta_rule(q, k, v, g, beta, chunk_size=48)


def test_shape_errors_name_the_tensor():
    q, k, v, g, beta, h0 = make_inputs(1, 8, 2, 16, 16, per_head=False, init=True)
    with pytest.raises(ValueError, match=r"g must be \[B, T, H\]"):
        delta_rule_reference(q, k, v, g[..., :4], beta)
    with pytest.raises(ValueError, match="beta must be"):
        delta_rule_chunked(q, k, v, g, beta[..., None])
    with pytest.raises(ValueError, match="initial_state must be"):
        delta_rule_chunked(q, k, v, g, beta, initial_state=h0.transpose(-1, -2)[..., :8])
    with pytest.raises(ValueError, match="sequence-first"):
        delta_rule_chunked(q[0], k, v, g, beta)


# ----------------------------------------------------------------------------- FLA (CUDA only)


@pytest.mark.skipif(
    importlib.util.find_spec("fla") is None or not torch.cuda.is_available(),
    reason="needs flash-linear-attention and CUDA",
)
@pytest.mark.parametrize("decay", ["per_head", "per_channel"])
def test_matches_fla_chunk_kernels(decay):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.kda import chunk_kda

    xs = make_inputs(2, 100, 2, 64, 64, per_head=decay == "per_head", init=True, seed=5)
    q, k, v, g, beta, h0 = (x.cuda() for x in xs)
    fla_fn = chunk_gated_delta_rule if decay == "per_head" else chunk_kda
    # Keywords only: FLA's positional orders differ between functions (docs/algorithms.md §3.0).
    o_fla, s_fla = fla_fn(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0, output_final_state=True)
    o, s = delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, impl="triton")
    o_ref, s_ref = delta_rule_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert rel(o, o_ref) < 1e-4 and rel(s, s_ref) < 1e-4
    assert rel(o_fla.float(), o_ref) < 5e-3 and rel(s_fla.float(), s_ref) < 5e-3
