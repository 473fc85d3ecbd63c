"""Triton kernels for the chunked gated delta rule (GDN / KDA); math in `delta_rule.py`.

What runs in Triton (one program per (chunk, batch·head) or per (value block, batch·head)):

forward
  1. `_chunk_cumsum_kernel`  gamma = cumulative log-decay inside each chunk (fp32).
  2. `_intra_fwd_kernel`     per chunk, in parallel: the decayed Gram matrices
     A = beta * strict_tril(K K^T ⊙ decay) and P = tril(Q K^T ⊙ decay), the UT transform
     T = (I + A)^-1 by forward substitution, and the WY form W = T diag(beta)(exp(gamma)K),
     U = T diag(beta)V. Per-head decay (GDN) uses one tensor-core matmul for the Gram
     matrices; per-channel decay (KDA) builds them column by column with masked
     exponents (exact, no positive exponent).
  3. `_inter_fwd_kernel`     per value block, sequential over chunks: the state recurrence
     V_new = U - W S, O = (exp(gamma)Q) S + P V_new, S <- exp(gamma_C) S + (exp(gamma_C - gamma)K)^T V_new;
     writes o, the final state, and (for the backward) the state entering each chunk.

backward
  4. `_inter_bwd_kernel`     the reverse recurrence through the chunks in Triton: dS, and the
     gradients of V_new's inputs U and W and of the per-chunk terms (exp(gamma)Q, decayed K,
     exp(gamma_C), P); contractions over the value dimension are written per value block and
     summed in PyTorch.
  5. `_intra_bwd_kernel`     the backward of step 2 (and of the exp(gamma) factors) per chunk:
     through the UT transform (dA = -T^T dT T^T), the decayed Gram matrices and the cumulative
     sum of g, giving dq, dk, dv, dg, dbeta.

All arithmetic is fp32 (inputs may be bf16/fp16; they are upcast on load). `tl.dot` runs with
`input_precision="ieee"` for fp32 inputs and "tf32" for 16-bit inputs (the inputs carry less
precision than tf32 anyway).

Layouts: q, k [B, T, H, K]; v, o [B, T, H, V]; g [B, T, H(, K)]; beta [B, T, H]; W like k,
U like v, P [B, T, H, C] (row t holds its chunk's row); states [B, H, N, K, V].
Tokens past T load as zeros, which leave the state unchanged (see delta_rule.py). Their gamma
also loads as 0 (not the chunk's running sum, as in the PyTorch path), so for such a row i
gamma_i - gamma_j = -gamma_j > 0, which overflows exp in a steeply decaying chunk (and inf times
the row's zero k or q is NaN): the decayed Gram matrices mask rows past T *before* the exp,
together with the causal mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from archc.kernels.delta_rule_chunks import _chunk_intra, _to_chunks

# ============================================================================ forward kernels


@triton.jit
def _chunk_cumsum_kernel(g, gam, T, H: tl.constexpr, K: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                         PER_HEAD: tl.constexpr):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    t = i_n * C + rows
    mt = t < T
    if PER_HEAD:
        off = (i_b * T + t) * H + i_h
        b_g = tl.load(g + off, mask=mt, other=0.0).to(tl.float32)
        tl.store(gam + off, tl.cumsum(b_g, axis=0), mask=mt)
    else:
        ck = tl.arange(0, BK)
        off = ((i_b * T + t[:, None]) * H + i_h) * K + ck[None, :]
        m = mt[:, None] & (ck[None, :] < K)
        b_g = tl.load(g + off, mask=m, other=0.0).to(tl.float32)
        tl.store(gam + off, tl.cumsum(b_g, axis=0), mask=m)


@triton.jit
def _intra_fwd_kernel(q, k, v, gam, beta, W, U, P, Tm, scale, T, H: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BVF: tl.constexpr,
                      PER_HEAD: tl.constexpr, DOT_PREC: tl.constexpr):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BVF)
    t = i_n * C + rows
    mt = t < T
    mk = ck < K
    off_k = ((i_b * T + t[:, None]) * H + i_h) * K + ck[None, :]
    off_v = ((i_b * T + t[:, None]) * H + i_h) * V + cv[None, :]
    m_k = mt[:, None] & mk[None, :]
    m_v = mt[:, None] & (cv[None, :] < V)
    b_q = tl.load(q + off_k, mask=m_k, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + off_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + off_v, mask=m_v, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + (i_b * T + t) * H + i_h, mask=mt, other=0.0).to(tl.float32)
    # exp(gamma_i - gamma_j) <= 1 on and below the diagonal for rows before T; masked before exp
    # above it and on rows past T (gamma loaded as 0 there: the exponent would be positive).
    lower = (rows[:, None] >= cols[None, :]) & mt[:, None]
    if PER_HEAD:
        b_g = tl.load(gam + (i_b * T + t) * H + i_h, mask=mt, other=0.0)
        b_d = tl.exp(tl.where(lower, b_g[:, None] - b_g[None, :], float("-inf")))
        b_a = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PREC) * b_d
        b_p = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * b_d
        b_kg = b_k * tl.exp(b_g)[:, None]
    else:
        b_g = tl.load(gam + off_k, mask=m_k, other=0.0)
        b_a = tl.zeros([C, C], dtype=tl.float32)
        b_p = tl.zeros([C, C], dtype=tl.float32)
        # Column j of both Gram matrices: sum_c x_ic k_jc exp(gamma_ic - gamma_jc), rows i >= j.
        for j in range(0, C):
            t_j = i_n * C + j
            m_j = mk & ((t_j + 0 * ck) < T)
            off_j = ((i_b * T + t_j) * H + i_h) * K + ck
            b_kj = tl.load(k + off_j, mask=m_j, other=0.0).to(tl.float32)
            b_gj = tl.load(gam + off_j, mask=m_j, other=0.0)
            b_e = tl.exp(tl.where(((rows >= j) & mt)[:, None], b_g - b_gj[None, :], float("-inf")))
            b_ke = b_kj[None, :] * b_e
            sel = cols[None, :] == j
            b_a = tl.where(sel, tl.sum(b_k * b_ke, axis=1)[:, None], b_a)
            b_p = tl.where(sel, tl.sum(b_q * b_ke, axis=1)[:, None], b_p)
        b_kg = b_k * tl.exp(b_g)
    b_a = tl.where(rows[:, None] > cols[None, :], b_a * b_beta[:, None], 0.0)
    # UT transform T = (I + A)^-1, row by row: T_i = e_i - sum_{j<i} A_ij T_j.
    b_t = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
    for i in range(1, C):
        sel_i = rows[:, None] == i
        a_i = tl.sum(tl.where(sel_i, b_a, 0.0), axis=0)  # row i of A, indexed by column
        upd = tl.sum(a_i[:, None] * b_t, axis=0)
        b_t = tl.where(sel_i, b_t - upd[None, :], b_t)
    b_w = tl.dot(b_t, b_kg * b_beta[:, None], input_precision=DOT_PREC)
    b_u = tl.dot(b_t, b_v * b_beta[:, None], input_precision=DOT_PREC)
    tl.store(W + off_k, b_w, mask=m_k)
    tl.store(U + off_v, b_u, mask=m_v)
    off_p = ((i_b * T + t[:, None]) * H + i_h) * C + cols[None, :]
    tl.store(P + off_p, b_p, mask=mt[:, None])
    tl.store(Tm + off_p, b_t, mask=mt[:, None])


@triton.jit
def _chunk_factors(q, k, gam, i_b, i_h, i_n, scale, T, H: tl.constexpr, K: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, PER_HEAD: tl.constexpr):
    """Load a chunk and return (exp(gamma)·scale·q, exp(gamma_C - gamma)·k, exp(gamma_C) as [BK, 1])."""
    rows = tl.arange(0, C)
    ck = tl.arange(0, BK)
    t = i_n * C + rows
    mt = t < T
    mk = ck < K
    off_k = ((i_b * T + t[:, None]) * H + i_h) * K + ck[None, :]
    m_k = mt[:, None] & mk[None, :]
    b_q = tl.load(q + off_k, mask=m_k, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + off_k, mask=m_k, other=0.0).to(tl.float32)
    t_last = tl.minimum(i_n * C + C, T) - 1
    if PER_HEAD:
        b_g = tl.load(gam + (i_b * T + t) * H + i_h, mask=mt, other=0.0)
        g_last = tl.load(gam + (i_b * T + t_last) * H + i_h)
        b_qg = b_q * tl.exp(b_g)[:, None]
        b_kd = b_k * tl.exp(g_last - b_g)[:, None]
        b_e = tl.zeros([BK, 1], dtype=tl.float32) + tl.exp(g_last)
    else:
        b_g = tl.load(gam + off_k, mask=m_k, other=0.0)
        g_last = tl.load(gam + ((i_b * T + t_last) * H + i_h) * K + ck, mask=mk, other=0.0)
        b_qg = b_q * tl.exp(b_g)
        b_kd = b_k * tl.exp(g_last[None, :] - b_g)
        b_e = tl.exp(g_last)[:, None]
    return b_qg, b_kd, b_e


@triton.jit
def _inter_fwd_kernel(q, k, gam, W, U, P, o, h0, ht, hs, scale, T, N, H: tl.constexpr, K: tl.constexpr,
                      V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                      PER_HEAD: tl.constexpr, USE_H0: tl.constexpr, STORE_STATES: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    off_s = ck[:, None] * V + cv[None, :]
    m_s = mk[:, None] & mv[None, :]
    b_s = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_H0:
        b_s += tl.load(h0 + i_bh * K * V + off_s, mask=m_s, other=0.0).to(tl.float32)
    for i_n in range(0, N):
        if STORE_STATES:
            tl.store(hs + (i_bh * N + i_n) * K * V + off_s, b_s, mask=m_s)
        t = i_n * C + rows
        mt = t < T
        off_k = ((i_b * T + t[:, None]) * H + i_h) * K + ck[None, :]
        off_v = ((i_b * T + t[:, None]) * H + i_h) * V + cv[None, :]
        m_k = mt[:, None] & mk[None, :]
        m_v = mt[:, None] & mv[None, :]
        b_w = tl.load(W + off_k, mask=m_k, other=0.0)
        b_u = tl.load(U + off_v, mask=m_v, other=0.0)
        b_p = tl.load(P + ((i_b * T + t[:, None]) * H + i_h) * C + cols[None, :], mask=mt[:, None], other=0.0)
        b_qg, b_kd, b_e = _chunk_factors(q, k, gam, i_b, i_h, i_n, scale, T, H, K, C, BK, PER_HEAD)
        b_vn = b_u - tl.dot(b_w, b_s, input_precision=DOT_PREC)
        b_o = tl.dot(b_qg, b_s, input_precision=DOT_PREC) + tl.dot(b_p, b_vn, input_precision=DOT_PREC)
        tl.store(o + off_v, b_o.to(o.dtype.element_ty), mask=m_v)
        b_s = b_s * b_e + tl.dot(tl.trans(b_kd), b_vn, input_precision=DOT_PREC)
    tl.store(ht + i_bh * K * V + off_s, b_s, mask=m_s)


# ============================================================================ backward kernels


@triton.jit
def _inter_bwd_kernel(q, k, gam, W, U, P, hs, do, dht, dU, dW, dP, dQg, dKd, de, dh0, scale, T, N, B,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, PER_HEAD: tl.constexpr, USE_DHT: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """Reverse recurrence. dW, dP, dQg, dKd, de are partial sums over this value block: [NV, ...]."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    mk = ck < K
    mv = cv < V
    off_s = ck[:, None] * V + cv[None, :]
    m_s = mk[:, None] & mv[None, :]
    part_k = i_v * B * T * H * K  # offset of this value block's partial sums
    part_c = i_v * B * T * H * C
    b_ds = tl.zeros([BK, BV], dtype=tl.float32)
    if USE_DHT:
        b_ds += tl.load(dht + i_bh * K * V + off_s, mask=m_s, other=0.0).to(tl.float32)
    for i_r in range(0, N):
        i_n = N - 1 - i_r
        b_s = tl.load(hs + (i_bh * N + i_n) * K * V + off_s, mask=m_s, other=0.0)
        t = i_n * C + rows
        mt = t < T
        off_k = ((i_b * T + t[:, None]) * H + i_h) * K + ck[None, :]
        off_v = ((i_b * T + t[:, None]) * H + i_h) * V + cv[None, :]
        off_p = ((i_b * T + t[:, None]) * H + i_h) * C + cols[None, :]
        m_k = mt[:, None] & mk[None, :]
        m_v = mt[:, None] & mv[None, :]
        b_w = tl.load(W + off_k, mask=m_k, other=0.0)
        b_u = tl.load(U + off_v, mask=m_v, other=0.0)
        b_p = tl.load(P + off_p, mask=mt[:, None], other=0.0)
        b_do = tl.load(do + off_v, mask=m_v, other=0.0).to(tl.float32)
        b_qg, b_kd, b_e = _chunk_factors(q, k, gam, i_b, i_h, i_n, scale, T, H, K, C, BK, PER_HEAD)
        b_vn = b_u - tl.dot(b_w, b_s, input_precision=DOT_PREC)
        b_dvn = tl.dot(tl.trans(b_p), b_do, input_precision=DOT_PREC) + tl.dot(b_kd, b_ds, input_precision=DOT_PREC)
        tl.store(dU + off_v, b_dvn, mask=m_v)
        tl.store(dP + part_c + off_p, tl.dot(b_do, tl.trans(b_vn), input_precision=DOT_PREC), mask=mt[:, None])
        tl.store(dQg + part_k + off_k, tl.dot(b_do, tl.trans(b_s), input_precision=DOT_PREC), mask=m_k)
        tl.store(dKd + part_k + off_k, tl.dot(b_vn, tl.trans(b_ds), input_precision=DOT_PREC), mask=m_k)
        tl.store(dW + part_k + off_k, -tl.dot(b_dvn, tl.trans(b_s), input_precision=DOT_PREC), mask=m_k)
        tl.store(de + i_v * B * H * N * K + (i_bh * N + i_n) * K + ck, tl.sum(b_s * b_ds, axis=1), mask=mk)
        b_ds = (tl.dot(tl.trans(b_qg), b_do, input_precision=DOT_PREC) + b_ds * b_e
                - tl.dot(tl.trans(b_w), b_dvn, input_precision=DOT_PREC))
    tl.store(dh0 + i_bh * K * V + off_s, b_ds, mask=m_s)


@triton.jit
def _intra_bwd_kernel(q, k, v, gam, beta, Tm, dQg, dKd, de, dW, dU, dP, dq, dk, dv, dg, dbeta, scale, T, N,
                      H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, C: tl.constexpr, BK: tl.constexpr,
                      BVF: tl.constexpr, PER_HEAD: tl.constexpr, DOT_PREC: tl.constexpr):
    """Backward of `_intra_fwd_kernel` and of the factors exp(gamma)Q, exp(gamma_C - gamma)K, exp(gamma_C).

    Takes the gradients of W, U, P, Qg, Kd, e (summed over value blocks) and gives dq, dk, dv, dg, dbeta:
        dT = dW (beta kg)^T + dU (beta v)^T,   d(beta kg) = T^T dW,   d(beta v) = T^T dU,
        dA = -T^T dT T^T (strictly lower),     dGk = beta dA,
    then the decayed Gram matrices G_ij = sum_c x_ic y_jc exp(gamma_ic - gamma_jc) send
    dx_i += sum_j dG_ij y_j E_ij, dy_j += sum_i dG_ij x_i E_ij, dgamma += x*dx_G - y*dy_G,
    and dg is the reverse cumulative sum of dgamma inside the chunk.
    """
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    rows = tl.arange(0, C)
    cols = tl.arange(0, C)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BVF)
    t = i_n * C + rows
    mt = t < T
    mk = ck < K
    off_k = ((i_b * T + t[:, None]) * H + i_h) * K + ck[None, :]
    off_v = ((i_b * T + t[:, None]) * H + i_h) * V + cv[None, :]
    off_p = ((i_b * T + t[:, None]) * H + i_h) * C + cols[None, :]
    off_h = (i_b * T + t) * H + i_h
    m_k = mt[:, None] & mk[None, :]
    m_v = mt[:, None] & (cv[None, :] < V)
    lower = (rows[:, None] >= cols[None, :]) & mt[:, None]  # rows past T excluded before exp, as forward
    strict = rows[:, None] > cols[None, :]
    t_last = tl.minimum(i_n * C + C, T) - 1
    is_last = t == t_last

    b_q = tl.load(q + off_k, mask=m_k, other=0.0).to(tl.float32) * scale
    b_k = tl.load(k + off_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + off_v, mask=m_v, other=0.0).to(tl.float32)
    b_beta = tl.load(beta + off_h, mask=mt, other=0.0).to(tl.float32)
    b_t = tl.load(Tm + off_p, mask=mt[:, None], other=0.0)
    b_dqg = tl.load(dQg + off_k, mask=m_k, other=0.0)
    b_dkd = tl.load(dKd + off_k, mask=m_k, other=0.0)
    b_dw = tl.load(dW + off_k, mask=m_k, other=0.0)
    b_du = tl.load(dU + off_v, mask=m_v, other=0.0)
    b_dp = tl.where(lower, tl.load(dP + off_p, mask=mt[:, None], other=0.0), 0.0)
    b_de = tl.load(de + (i_bh * N + i_n) * K + ck, mask=mk, other=0.0)

    if PER_HEAD:
        b_g = tl.load(gam + off_h, mask=mt, other=0.0)
        g_last = tl.load(gam + (i_b * T + t_last) * H + i_h)
        b_eg = tl.exp(b_g)[:, None]
        b_ed = tl.exp(g_last - b_g)[:, None]
    else:
        b_g = tl.load(gam + off_k, mask=m_k, other=0.0)
        g_last = tl.load(gam + ((i_b * T + t_last) * H + i_h) * K + ck, mask=mk, other=0.0)
        b_eg = tl.exp(b_g)
        b_ed = tl.exp(g_last[None, :] - b_g)
    b_kg = b_k * b_eg
    b_qg = b_q * b_eg
    b_kd = b_k * b_ed

    # Through the WY form and the UT transform.
    b_dt = (tl.dot(b_dw, tl.trans(b_kg * b_beta[:, None]), input_precision=DOT_PREC)
            + tl.dot(b_du, tl.trans(b_v * b_beta[:, None]), input_precision=DOT_PREC))
    b_dbw = tl.dot(tl.trans(b_t), b_dw, input_precision=DOT_PREC)
    b_dbu = tl.dot(tl.trans(b_t), b_du, input_precision=DOT_PREC)
    b_da = -tl.dot(tl.dot(tl.trans(b_t), b_dt, input_precision=DOT_PREC), tl.trans(b_t), input_precision=DOT_PREC)
    b_da = tl.where(strict, b_da, 0.0)
    b_dbeta = tl.sum(b_dbw * b_kg, axis=1) + tl.sum(b_dbu * b_v, axis=1)
    b_dv = b_dbu * b_beta[:, None]
    b_dkg = b_dbw * b_beta[:, None]
    b_dga = b_kg * b_dkg + b_qg * b_dqg - b_kd * b_dkd  # d gamma from the exp(gamma) factors
    b_dk = b_eg * b_dkg + b_ed * b_dkd
    b_dq = b_eg * b_dqg
    b_dgk = b_da * b_beta[:, None]

    if PER_HEAD:
        b_d = tl.exp(tl.where(lower, b_g[:, None] - b_g[None, :], float("-inf")))
        b_gk = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PREC) * b_d
        b_p = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC) * b_d
        b_dbeta += tl.sum(b_da * b_gk, axis=1)
        b_dgd = b_dgk * b_d
        b_dpd = b_dp * b_d
        b_dk += (tl.dot(b_dgd, b_k, input_precision=DOT_PREC) + tl.dot(tl.trans(b_dgd), b_k, input_precision=DOT_PREC)
                 + tl.dot(tl.trans(b_dpd), b_q, input_precision=DOT_PREC))
        b_dq += tl.dot(b_dpd, b_k, input_precision=DOT_PREC)
        b_gg = b_dgk * b_gk + b_dp * b_p
        b_dgam = tl.sum(b_dga, axis=1) + tl.sum(b_gg, axis=1) - tl.sum(b_gg, axis=0)
        d_last = tl.sum(tl.sum(b_kd * b_dkd, axis=1), axis=0) + tl.exp(g_last) * tl.sum(b_de, axis=0)
        b_dgam = tl.where(is_last, b_dgam + d_last, b_dgam)
        b_dg = tl.sum(b_dgam, axis=0) - tl.cumsum(b_dgam, axis=0) + b_dgam  # reverse cumsum
        tl.store(dg + off_h, b_dg, mask=mt)
    else:
        b_dk_row = tl.zeros([C, BK], dtype=tl.float32)
        b_dq_row = tl.zeros([C, BK], dtype=tl.float32)
        b_dk_col = tl.zeros([C, BK], dtype=tl.float32)
        for j in range(0, C):
            t_j = i_n * C + j
            m_j = mk & ((t_j + 0 * ck) < T)
            off_j = ((i_b * T + t_j) * H + i_h) * K + ck
            b_kj = tl.load(k + off_j, mask=m_j, other=0.0).to(tl.float32)
            b_gj = tl.load(gam + off_j, mask=m_j, other=0.0)
            b_e = tl.exp(tl.where(((rows >= j) & mt)[:, None], b_g - b_gj[None, :], float("-inf")))
            sel = cols[None, :] == j
            c_dgk = tl.sum(tl.where(sel, b_dgk, 0.0), axis=1)  # column j of dGk, dA, dP
            c_da = tl.sum(tl.where(sel, b_da, 0.0), axis=1)
            c_dp = tl.sum(tl.where(sel, b_dp, 0.0), axis=1)
            b_ke = b_kj[None, :] * b_e
            b_dbeta += c_da * tl.sum(b_k * b_ke, axis=1)  # dA_ij * Gk_ij
            b_dk_row += c_dgk[:, None] * b_ke
            b_dq_row += c_dp[:, None] * b_ke
            d_kj = tl.sum((c_dgk[:, None] * b_k + c_dp[:, None] * b_q) * b_e, axis=0)
            b_dk_col = tl.where(rows[:, None] == j, d_kj[None, :], b_dk_col)
        b_dk += b_dk_row + b_dk_col
        b_dq += b_dq_row
        b_dgam = b_dga + b_k * b_dk_row + b_q * b_dq_row - b_k * b_dk_col
        d_last = tl.sum(b_kd * b_dkd, axis=0) + tl.exp(g_last) * b_de
        b_dgam = tl.where(is_last[:, None], b_dgam + d_last[None, :], b_dgam)
        b_dg = tl.sum(b_dgam, axis=0)[None, :] - tl.cumsum(b_dgam, axis=0) + b_dgam  # reverse cumsum
        tl.store(dg + off_k, b_dg, mask=m_k)
    tl.store(dq + off_k, b_dq * scale, mask=m_k)
    tl.store(dk + off_k, b_dk, mask=m_k)
    tl.store(dv + off_v, b_dv, mask=m_v)
    tl.store(dbeta + off_h, b_dbeta, mask=mt)


# ============================================================================ autograd glue


# "triton": `_intra_bwd_kernel`; "torch": autograd through `delta_rule._chunk_intra` (cross-check only).
INTRA_BACKWARD = "triton"


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _num_warps(C: int, BK: int, BVF: int, BV: int) -> tuple[int, int]:
    """Warps for the per-chunk kernels (C×BK, C×BVF and C×C fp32 tiles) and the state kernels (BK×BV)."""
    w_intra = 8 if C * max(BK, BVF) >= 64 * 128 else 4
    w_inter = 8 if BK * BV >= 128 * 64 else 4
    return w_intra, w_inter


def _dot_precision(*tensors) -> str:
    return "ieee" if all(x.dtype == torch.float32 for x in tensors) else "tf32"


class DeltaRuleTritonFunction(torch.autograd.Function):
    """(q, k, v, g, beta, initial_state, output_final_state, scale, chunk_size, per_head) -> (o, final_state)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, output_final_state, scale, chunk_size, per_head):
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        B, T, H, K = q.shape
        V = v.shape[-1]
        C = chunk_size
        N = triton.cdiv(T, C)
        BK, BVF = _pow2(K), _pow2(V)
        BV = min(BVF, 64)
        NV = triton.cdiv(V, BV)
        prec = _dot_precision(q, k, v)
        w_intra, w_inter = _num_warps(C, BK, BVF, BV)
        dev = q.device
        gam = torch.empty(g.shape, dtype=torch.float32, device=dev)
        _chunk_cumsum_kernel[(N, B * H)](g, gam, T, H, K, C, BK, per_head)
        W = torch.empty(B, T, H, K, dtype=torch.float32, device=dev)
        U = torch.empty(B, T, H, V, dtype=torch.float32, device=dev)
        P = torch.empty(B, T, H, C, dtype=torch.float32, device=dev)
        Tm = torch.empty(B, T, H, C, dtype=torch.float32, device=dev)
        _intra_fwd_kernel[(N, B * H)](q, k, v, gam, beta, W, U, P, Tm, scale, T, H, K, V, C, BK, BVF, per_head,
                                      prec, num_warps=w_intra)
        o = torch.empty_like(v)
        ht = torch.empty(B, H, K, V, dtype=torch.float32, device=dev)
        store_states = any(ctx.needs_input_grad[:6])
        hs = torch.empty(B, H, N, K, V, dtype=torch.float32, device=dev) if store_states else ht
        h0 = initial_state.contiguous() if initial_state is not None else ht
        _inter_fwd_kernel[(NV, B * H)](q, k, gam, W, U, P, o, h0, ht, hs, scale, T, N, H, K, V, C, BK, BV,
                                       per_head, initial_state is not None, store_states, prec, num_warps=w_inter)
        if store_states:
            ctx.save_for_backward(q, k, v, g, beta, initial_state, gam, W, U, P, Tm, hs)
        ctx.meta = (scale, C, per_head, BK, BVF, BV, NV, prec)
        if not output_final_state:
            ctx.mark_non_differentiable(ht)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, gam, W, U, P, Tm, hs = ctx.saved_tensors
        scale, C, per_head, BK, BVF, BV, NV, prec = ctx.meta
        w_intra, w_inter = _num_warps(C, BK, BVF, BV)
        B, T, H, K = q.shape
        V = v.shape[-1]
        N = triton.cdiv(T, C)
        dev = q.device
        do = do.contiguous()
        f32 = dict(dtype=torch.float32, device=dev)
        dU = torch.empty(B, T, H, V, **f32)
        dW = torch.empty(NV, B, T, H, K, **f32)
        dP = torch.empty(NV, B, T, H, C, **f32)
        dQg = torch.empty(NV, B, T, H, K, **f32)
        dKd = torch.empty(NV, B, T, H, K, **f32)
        de = torch.empty(NV, B, H, N, K, **f32)
        dh0 = torch.empty(B, H, K, V, **f32)
        use_dht = dht is not None
        dht_arg = dht.contiguous() if use_dht else dh0
        _inter_bwd_kernel[(NV, B * H)](q, k, gam, W, U, P, hs, do, dht_arg, dU, dW, dP, dQg, dKd, de, dh0, scale,
                                       T, N, B, H, K, V, C, BK, BV, per_head, use_dht, prec, num_warps=w_inter)
        dW, dP, dQg, dKd, de = (x.sum(0) for x in (dW, dP, dQg, dKd, de))
        if INTRA_BACKWARD == "torch":
            dq, dk, dv, dg, dbeta = _intra_backward_torch(q, k, v, g, beta, scale, C, per_head,
                                                          dQg, dKd, de, dW, dU, dP)
        else:
            dq, dk, dv, dg, dbeta = (torch.empty(x.shape, **f32) for x in (q, k, v, g, beta))
            _intra_bwd_kernel[(N, B * H)](q, k, v, gam, beta, Tm, dQg, dKd, de, dW, dU, dP, dq, dk, dv, dg, dbeta,
                                          scale, T, N, H, K, V, C, BK, BVF, per_head, prec, num_warps=w_intra)
            dq, dk, dv, dg, dbeta = (d.to(x.dtype) for d, x in zip((dq, dk, dv, dg, dbeta), (q, k, v, g, beta)))
        dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
        return dq, dk, dv, dg, dbeta, dh0, None, None, None, None


def _intra_backward_torch(q, k, v, g, beta, scale, C, per_head, dQg, dKd, de, dW, dU, dP):
    """Backward of the intra-chunk step by autograd through its PyTorch form (recomputed).

    Not the default (`INTRA_BACKWARD = "triton"` runs `_intra_bwd_kernel`); kept as an independent
    cross-check of that kernel in the tests.
    """
    T = q.shape[1]
    N = triton.cdiv(T, C)
    T_pad = N * C
    with torch.enable_grad():
        xs = [x.detach().float().requires_grad_() for x in (q, k, v, g, beta)]
        qc, kc, vc, gc, bc = (_to_chunks(x, T_pad, C) for x in xs)
        outs = _chunk_intra(qc * scale, kc, vc, gc, bc, per_head)
        grads_out = [_to_chunks(x, T_pad, C) for x in (dQg, dKd)]
        grads_out.append(de.sum(-1) if per_head else de)
        grads_out += [_to_chunks(x, T_pad, C) for x in (dW, dU, dP)]
        grads = torch.autograd.grad(outs, xs, grads_out)
    return [gr.to(x.dtype) for gr, x in zip(grads, (q, k, v, g, beta))]
