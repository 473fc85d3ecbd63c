"""Triton kernels for the residual-lane mixes in :mod:`archc.kernels.lanes`.

Import this module only through `lanes` (which imports it lazily): whether
``@triton.jit`` builds compiled or interpreted kernels is decided from
TRITON_INTERPRET when the decorators run.

Every kernel runs one program per BLOCK_T tokens and loops over the channels
in BLOCK_D chunks; lanes are padded to NP (a power of two ≥ 2) and masked.
Per-token coefficients live in registers as [BLOCK_T, NP] (pre, post) and
[BLOCK_T, NP, NP] (res, rows i on axis 1, columns j on axis 2) tiles.

- `_lanes_pre_fwd`: the logits' activations (σ, 2σ, Sinkhorn–Knopp in its
  scaling form when MHC; as they are otherwise), post and res stored for the
  write, then u = Σ_i pre_i h_i chunk by chunk.
- `_lanes_pre_bwd`: dh = pre ⊗ du, dpre = <du, h_i> accumulated over the
  chunks, then the logits' gradient: the activations' derivatives and the
  Sinkhorn backward, which reruns the scaling steps once, keeping each
  step's a^{k-1} in a [BLOCK_T, ITP, NP] register tile, and walks them back.
- `_lanes_post_fwd`: h'_i = Σ_j res_ij h_j + post_i y.
- `_lanes_post_bwd`: dh_j = Σ_i res_ij dh'_i, dy = Σ_i post_i dh'_i, and
  dpost_i = <dh'_i, y>, dres_ij = <dh'_i, h_j> accumulated over the chunks.

Loads are converted to fp32 and all arithmetic is fp32; stores convert to the
output's dtype. Token offsets are int64.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits(l_ptr, t64, t_ok, lane, s_ln, s_lc, LANES: tl.constexpr):
    """pre [BT, NP], post [BT, NP], res [BT, NP, NP] logits (0 where masked)."""
    ok_lane = lane < LANES
    ok2 = t_ok[:, None] & ok_lane[None, :]
    ok3 = ok2[:, :, None] & ok_lane[None, None, :]
    row = l_ptr + t64[:, None] * s_ln
    pre = tl.load(row + lane[None, :] * s_lc, mask=ok2, other=0.0).to(tl.float32)
    post = tl.load(row + (LANES + lane[None, :]) * s_lc, mask=ok2, other=0.0).to(tl.float32)
    res_cols = 2 * LANES + lane[None, :, None] * LANES + lane[None, None, :]
    res = tl.load(l_ptr + t64[:, None, None] * s_ln + res_cols * s_lc, mask=ok3, other=0.0).to(tl.float32)
    return pre, post, res


@triton.jit
def _column_exp(res, lane, LANES: tl.constexpr):
    """K = exp(L - max of each column), 0 outside the n×n block (padded tokens get finite values)."""
    ok = (lane < LANES)[None, :, None] & (lane < LANES)[None, None, :]
    colmax = tl.max(tl.where(ok, res, float("-inf")), axis=1)
    return tl.where(ok, tl.exp(res - colmax[:, None, :]), 0.0)


@triton.jit
def _scaling_step(K, a, ok_i, ok_j):
    """One Sinkhorn step in scaling form: b = 1 / (Kᵀ a) (columns), a' = 1 / (K b) (rows); 0 on padded lanes."""
    b = tl.where(ok_j, 1.0 / tl.where(ok_j, tl.sum(K * a[:, :, None], axis=1), 1.0), 0.0)
    a_next = tl.where(ok_i, 1.0 / tl.where(ok_i, tl.sum(K * b[:, None, :], axis=2), 1.0), 0.0)
    return b, a_next


@triton.jit
def _sinkhorn(K, lane, iters, LANES: tl.constexpr, BLOCK_T: tl.constexpr, NP: tl.constexpr):
    ok = (lane < LANES)[None, :]
    a = tl.where(ok, 1.0, 0.0) + tl.zeros([BLOCK_T, NP], tl.float32)
    b = tl.zeros([BLOCK_T, NP], tl.float32)
    for _ in range(iters):
        b, a = _scaling_step(K, a, ok, ok)
    return a[:, :, None] * K * b[:, None, :]


@triton.jit
def _sinkhorn_backward(K, G, lane, iters, LANES: tl.constexpr, BLOCK_T: tl.constexpr, NP: tl.constexpr,
                       ITP: tl.constexpr):
    """dL for M = Sinkhorn(L) given G = dM (K = exp(L - colmax), as in the forward)."""
    ok = (lane < LANES)[None, :]
    step = tl.arange(0, ITP)[None, :, None]
    history = tl.zeros([BLOCK_T, ITP, NP], tl.float32)  # a^{k-1} of step k
    a = tl.where(ok, 1.0, 0.0) + tl.zeros([BLOCK_T, NP], tl.float32)
    b = tl.zeros([BLOCK_T, NP], tl.float32)
    for k in range(iters):
        history = tl.where(step == k, a[:, None, :], history)
        b, a = _scaling_step(K, a, ok, ok)
    dK = a[:, :, None] * G * b[:, None, :]
    GK = G * K
    da = tl.sum(GK * b[:, None, :], axis=2)
    db = tl.sum(GK * a[:, :, None], axis=1)
    for kk in range(iters):
        k = iters - 1 - kk
        a_prev = tl.sum(tl.where(step == k, history, 0.0), axis=1)
        b_k, a_k = _scaling_step(K, a_prev, ok, ok)
        dr = -da * a_k * a_k
        dK += dr[:, :, None] * b_k[:, None, :]
        db = db + tl.sum(K * dr[:, :, None], axis=1)
        ds = -db * b_k * b_k
        dK += a_prev[:, :, None] * ds[:, None, :]
        da = tl.sum(K * ds[:, None, :], axis=2)
        db = tl.zeros([BLOCK_T, NP], tl.float32)
    return dK * K


@triton.jit
def _lanes_pre_fwd(
    h_ptr, l_ptr, u_ptr, post_ptr, res_ptr,
    N, D, iters,
    s_hn, s_hl, s_hd, s_ln, s_lc, s_un, s_ud,
    LANES: tl.constexpr, NP: tl.constexpr, MHC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    t64 = t.to(tl.int64)
    lane = tl.arange(0, NP)
    pre, post, res = _logits(l_ptr, t64, t_ok, lane, s_ln, s_lc, LANES)
    if MHC:
        pre = tl.sigmoid(pre)
        post = 2.0 * tl.sigmoid(post)
        res = _sinkhorn(_column_exp(res, lane, LANES), lane, iters, LANES, BLOCK_T, NP)
    ok2 = t_ok[:, None] & (lane < LANES)[None, :]
    ok3 = ok2[:, :, None] & (lane < LANES)[None, None, :]
    tl.store(post_ptr + t64[:, None] * LANES + lane[None, :], post, mask=ok2)
    tl.store(res_ptr + t64[:, None, None] * (LANES * LANES) + lane[None, :, None] * LANES + lane[None, None, :],
             res, mask=ok3)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        h = tl.load(h_ptr + t64[:, None, None] * s_hn + lane[None, :, None] * s_hl + d[None, None, :] * s_hd,
                    mask=ok2[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        u = tl.sum(pre[:, :, None] * h, axis=1)
        tl.store(u_ptr + t64[:, None] * s_un + d[None, :] * s_ud, u.to(u_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _lanes_pre_bwd(
    h_ptr, l_ptr, du_ptr, dpost_ptr, dres_ptr, dh_ptr, dl_ptr,
    N, D, iters,
    s_hn, s_hl, s_hd, s_ln, s_lc, s_dun, s_dud, s_dhn, s_dhl, s_dhd,
    LANES: tl.constexpr, NP: tl.constexpr, MHC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ITP: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    t64 = t.to(tl.int64)
    lane = tl.arange(0, NP)
    ok2 = t_ok[:, None] & (lane < LANES)[None, :]
    ok3 = ok2[:, :, None] & (lane < LANES)[None, None, :]
    pre_l, post_l, res_l = _logits(l_ptr, t64, t_ok, lane, s_ln, s_lc, LANES)
    pre = pre_l
    if MHC:
        pre = tl.sigmoid(pre_l)
    dpre = tl.zeros([BLOCK_T, NP], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        m3 = ok2[:, :, None] & d_ok[None, None, :]
        du = tl.load(du_ptr + t64[:, None] * s_dun + d[None, :] * s_dud, mask=t_ok[:, None] & d_ok[None, :],
                     other=0.0).to(tl.float32)
        h = tl.load(h_ptr + t64[:, None, None] * s_hn + lane[None, :, None] * s_hl + d[None, None, :] * s_hd,
                    mask=m3, other=0.0).to(tl.float32)
        dpre += tl.sum(h * du[:, None, :], axis=2)
        dh = pre[:, :, None] * du[:, None, :]
        tl.store(dh_ptr + t64[:, None, None] * s_dhn + lane[None, :, None] * s_dhl + d[None, None, :] * s_dhd,
                 dh.to(dh_ptr.dtype.element_ty), mask=m3)
    dpost = tl.load(dpost_ptr + t64[:, None] * LANES + lane[None, :], mask=ok2, other=0.0)
    dres = tl.load(dres_ptr + t64[:, None, None] * (LANES * LANES) + lane[None, :, None] * LANES
                   + lane[None, None, :], mask=ok3, other=0.0)
    if MHC:
        s_pre = tl.sigmoid(pre_l)
        dpre = dpre * s_pre * (1.0 - s_pre)
        s_post = tl.sigmoid(post_l)
        dpost = dpost * 2.0 * s_post * (1.0 - s_post)
        dres = _sinkhorn_backward(_column_exp(res_l, lane, LANES), dres, lane, iters, LANES, BLOCK_T, NP, ITP)
    width = 2 * LANES + LANES * LANES
    row = dl_ptr + t64[:, None] * width
    tl.store(row + lane[None, :], dpre, mask=ok2)
    tl.store(row + LANES + lane[None, :], dpost, mask=ok2)
    tl.store(dl_ptr + t64[:, None, None] * width + 2 * LANES + lane[None, :, None] * LANES + lane[None, None, :],
             dres, mask=ok3)


@triton.jit
def _lanes_post_fwd(
    h_ptr, y_ptr, post_ptr, res_ptr, o_ptr,
    N, D,
    s_hn, s_hl, s_hd, s_yn, s_yd, s_on, s_ol, s_od,
    LANES: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    t64 = t.to(tl.int64)
    lane = tl.arange(0, NP)
    ok2 = t_ok[:, None] & (lane < LANES)[None, :]
    ok3 = ok2[:, :, None] & (lane < LANES)[None, None, :]
    post = tl.load(post_ptr + t64[:, None] * LANES + lane[None, :], mask=ok2, other=0.0)
    res = tl.load(res_ptr + t64[:, None, None] * (LANES * LANES) + lane[None, :, None] * LANES + lane[None, None, :],
                  mask=ok3, other=0.0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        m2 = t_ok[:, None] & d_ok[None, :]
        y = tl.load(y_ptr + t64[:, None] * s_yn + d[None, :] * s_yd, mask=m2, other=0.0).to(tl.float32)
        acc = post[:, :, None] * y[:, None, :]
        for j in tl.static_range(LANES):
            res_j = tl.sum(tl.where(lane[None, None, :] == j, res, 0.0), axis=2)  # column j: res[:, i, j]
            h_j = tl.load(h_ptr + t64[:, None] * s_hn + j * s_hl + d[None, :] * s_hd, mask=m2, other=0.0)
            acc += res_j[:, :, None] * h_j.to(tl.float32)[:, None, :]
        tl.store(o_ptr + t64[:, None, None] * s_on + lane[None, :, None] * s_ol + d[None, None, :] * s_od,
                 acc.to(o_ptr.dtype.element_ty), mask=ok2[:, :, None] & d_ok[None, None, :])


@triton.jit
def _lanes_post_bwd(
    h_ptr, y_ptr, post_ptr, res_ptr, g_ptr, dh_ptr, dy_ptr, dpost_ptr, dres_ptr,
    N, D,
    s_hn, s_hl, s_hd, s_yn, s_yd, s_gn, s_gl, s_gd, s_dhn, s_dhl, s_dhd, s_dyn, s_dyd,
    LANES: tl.constexpr, NP: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < N
    t64 = t.to(tl.int64)
    lane = tl.arange(0, NP)
    ok2 = t_ok[:, None] & (lane < LANES)[None, :]
    ok3 = ok2[:, :, None] & (lane < LANES)[None, None, :]
    post = tl.load(post_ptr + t64[:, None] * LANES + lane[None, :], mask=ok2, other=0.0)
    res = tl.load(res_ptr + t64[:, None, None] * (LANES * LANES) + lane[None, :, None] * LANES + lane[None, None, :],
                  mask=ok3, other=0.0)
    dpost = tl.zeros([BLOCK_T, NP], tl.float32)
    dres = tl.zeros([BLOCK_T, NP, NP], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        m2 = t_ok[:, None] & d_ok[None, :]
        g = tl.load(g_ptr + t64[:, None, None] * s_gn + lane[None, :, None] * s_gl + d[None, None, :] * s_gd,
                    mask=ok2[:, :, None] & d_ok[None, None, :], other=0.0).to(tl.float32)
        y = tl.load(y_ptr + t64[:, None] * s_yn + d[None, :] * s_yd, mask=m2, other=0.0).to(tl.float32)
        tl.store(dy_ptr + t64[:, None] * s_dyn + d[None, :] * s_dyd,
                 tl.sum(post[:, :, None] * g, axis=1).to(dy_ptr.dtype.element_ty), mask=m2)
        dpost += tl.sum(g * y[:, None, :], axis=2)
        for j in tl.static_range(LANES):
            h_j = tl.load(h_ptr + t64[:, None] * s_hn + j * s_hl + d[None, :] * s_hd, mask=m2,
                          other=0.0).to(tl.float32)
            dres_j = tl.sum(g * h_j[:, None, :], axis=2)  # [BT, NP]: dres[:, i, j]
            dres += tl.where(lane[None, None, :] == j, dres_j[:, :, None], 0.0)
            res_j = tl.sum(tl.where(lane[None, None, :] == j, res, 0.0), axis=2)
            dh_j = tl.sum(res_j[:, :, None] * g, axis=1)
            tl.store(dh_ptr + t64[:, None] * s_dhn + j * s_dhl + d[None, :] * s_dhd,
                     dh_j.to(dh_ptr.dtype.element_ty), mask=m2)
    tl.store(dpost_ptr + t64[:, None] * LANES + lane[None, :], dpost, mask=ok2)
    tl.store(dres_ptr + t64[:, None, None] * (LANES * LANES) + lane[None, :, None] * LANES + lane[None, None, :],
             dres, mask=ok3)
