"""Triton kernels for the chunked scalar-decay linear recurrence.

One recurrence serves both Mamba-2/SSD and causal linear attention
(docs/algorithms.md §3.1, §3.2): per batch b and head h, with a *scalar* log-decay
g_t <= 0 per token and head (g = 0, i.e. no decay, for linear attention),

    S_t = exp(g_t) S_{t-1} + k_t v_t^T        S_t in R^{K x V} (fp32)
    o_t = scale * S_t^T q_t

- linear attention: q, k = feature-mapped queries/keys, v = values, g absent
  (the kernels are specialised with HAS_G=False: no exp at all);
- SSD: q = C, k = B, v = dt * x, g = dt * A, scale = 1; SSD's state
  h [P, N] is S^T.

Layouts (contiguous, sequence-first): q, k [B, T, HK, K] with H % HK == 0
(head h reads q/k head h // (H // HK): SSD's B/C groups, no expansion in
memory), v, o [B, T, H, V], g [B, T, H] fp32, states [B, H, K, V] fp32.

Chunked form (chunk of BT tokens, gc = cumulative g *inside* the chunk,
gL = gc of the chunk's last valid token, S = state entering the chunk):

    O   = scale * ( exp(gc) * (Q S) + (Q K^T * M) V ),  M_ij = exp(gc_i - gc_j), i >= j, else 0
    S'  = exp(gL) S + (exp(gL - gc) * K)^T V

Every exponent is <= 0 when g <= 0, and the causal mask is applied *before*
the exp (exp(-inf) = 0), so nothing overflows. Rows past T in the last chunk
load gc = 0, so for them gc_i - gc_j = -gc_j > 0 (exp(120) = inf for a steep
chunk, and inf * 0 = NaN against their zero q); the mask therefore also
excludes those rows (i < T), so M is 0 there, never inf.

What runs in Triton and what in PyTorch
---------------------------------------
Triton (three kernels):
  * `_fwd_kernel`       grid (cdiv(V, BV), B*H): walks the chunks in order, keeps
                        S [K, BV] in registers, writes O; optionally stores the
                        state entering every chunk (`hs`, for the backward) and
                        the final state.
  * `_bwd_dh_kernel`    grid (cdiv(V, BV), B*H): walks the chunks backwards and
                        stores dS_end for every chunk (gradient w.r.t. the state
                        leaving it) and dS_0 (gradient of the initial state):
                        dS_start = exp(gL) dS_end + scale * (exp(gc) * Q)^T dO.
  * `_bwd_dqkv_kernel`  grid (NT, B*H), chunks in parallel: dq, dk, dv and
                        dG_t = q_t . dq_t - k_t . dk_t (per head).
PyTorch (all O(B*T*H) elementwise/cumsum work, no matmuls):
  * the chunk-local cumsum of g (forward) and, in the backward, the reverse
    cumsum over the whole sequence that turns dG into dg
    (dg_s = sum_{t >= s} dG_t, plus <S_T, dS_T> for the final state);
  * summing dq/dk over the heads of a q/k group when HK < H.
The backward recomputes the per-chunk states with `_fwd_kernel`
(COMPUTE_O=False, STORE_STATES=True) instead of saving them in the forward.

Precision: matmul operands are in the input dtype (bf16/fp16 use the tensor
cores; the fp32 state is rounded to the input dtype for Q S, as FLA does),
accumulation and the state are fp32. fp32 inputs use `input_precision="ieee"`
unless `torch.backends.cuda.matmul.allow_tf32` is set. Under the Triton
interpreter (TRITON_INTERPRET=1) bf16 `tl.dot` multiplies raw bit patterns
(triton-lang/triton#11584, "not supported yet"), so there every operand is
rounded to its dtype and then upcast to fp32 before `tl.dot` (DOT_F32).

Tiles: K is one block (BK = next power of two, K <= 256), V is split in
blocks of <= 64. The chunk size is also the tile BT and is capped to fit the
shared memory of an H100/H200 (see `_config`); it changes rounding, not results.
All kernels were compiled for sm_90 (no device run yet) to check that they
build and fit; they have been *run* only under the interpreter.

Parallelism: the forward and dh kernels walk the chunks sequentially, one
program per (batch, head, V block), as in Mamba/FLA's state-passing kernels but
fused with the output; at very small B*H this under-fills a GPU. The dqkv
kernel is parallel over chunks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from archc.kernels.registry import TRITON_MAX_HEAD_DIM

__all__ = ["chunk_scalar_decay", "ChunkScalarDecayFunction", "chunk_local_cumsum"]

CHUNK_SIZES = (16, 32, 64, 128)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _fwd_kernel(
    q, k, v, gc, h0, o, ht, hs,
    scale, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    STORE_STATES: tl.constexpr, COMPUTE_O: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_hk = i_h // (H // HK)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]
    causal = o_t[:, None] >= o_t[None, :]

    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bh.to(tl.int64) * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)

    for i_t in range(0, NT):
        t = i_t * BT + o_t
        m_t = t < T
        row = i_b * T + t
        if STORE_STATES:
            tl.store(hs + ((i_b * NT + i_t) * H + i_h) * K * V + p_state, b_h, mask=m_kv)
        b_k = tl.load(k + (row * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(v + (row * H + i_h)[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_G:
            b_g = tl.load(gc + row * H + i_h, mask=m_t, other=0.0)
            t_last = tl.minimum(i_t * BT + BT, T) - 1
            b_gl = tl.load(gc + (i_b * T + t_last) * H + i_h)
        if COMPUTE_O:
            b_q = tl.load(q + (row * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :],
                          other=0.0)
            b_s = _dot(b_q, tl.trans(b_k), DOT_F32, PREC)
            b_o = _dot(b_q, b_h.to(b_q.dtype), DOT_F32, PREC)
            if HAS_G:
                b_o = b_o * tl.exp(b_g)[:, None]
                # rows past T (gc loaded as 0) are masked too: their gc_i - gc_j > 0 could overflow
                valid = causal & m_t[:, None]
                b_s = b_s * tl.exp(tl.where(valid, b_g[:, None] - b_g[None, :], float("-inf")))
            else:
                b_s = tl.where(causal, b_s, 0.0)
            b_o += _dot(b_s.to(b_v.dtype), b_v, DOT_F32, PREC)
            tl.store(o + (row * H + i_h)[:, None] * V + o_v[None, :], (b_o * scale).to(o.dtype.element_ty),
                     mask=m_t[:, None] & m_v[None, :])
        if HAS_G:
            b_kd = (b_k * tl.exp(b_gl - b_g)[:, None]).to(b_v.dtype)
            b_h = b_h * tl.exp(b_gl) + _dot(tl.trans(b_kd), b_v, DOT_F32, PREC)
        else:
            b_h += _dot(tl.trans(b_k.to(b_v.dtype)), b_v, DOT_F32, PREC)

    if STORE_FINAL:
        tl.store(ht + i_bh.to(tl.int64) * K * V + p_state, b_h, mask=m_kv)


@triton.jit
def _bwd_dh_kernel(
    q, do, gc, dht, dh0, dhs,
    scale, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
    DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    i_v = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_hk = i_h // (H // HK)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_state = o_k[:, None] * V + o_v[None, :]

    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + i_bh.to(tl.int64) * K * V + p_state, mask=m_kv, other=0.0).to(tl.float32)

    for i_r in range(0, NT):
        i_t = NT - 1 - i_r
        t = i_t * BT + o_t
        m_t = t < T
        row = i_b * T + t
        # gradient w.r.t. the state leaving chunk i_t
        tl.store(dhs + ((i_b * NT + i_t) * H + i_h) * K * V + p_state, b_dh, mask=m_kv)
        b_q = tl.load(q + (row * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_do = tl.load(do + (row * H + i_h)[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0)
        if HAS_G:
            b_g = tl.load(gc + row * H + i_h, mask=m_t, other=0.0)
            t_last = tl.minimum(i_t * BT + BT, T) - 1
            b_gl = tl.load(gc + (i_b * T + t_last) * H + i_h)
            b_qd = (b_q * tl.exp(b_g)[:, None]).to(b_q.dtype)
            b_dh = b_dh * tl.exp(b_gl) + scale * _dot(tl.trans(b_qd), b_do.to(b_q.dtype), DOT_F32, PREC)
        else:
            b_dh += scale * _dot(tl.trans(b_q), b_do.to(b_q.dtype), DOT_F32, PREC)

    if STORE_DH0:
        tl.store(dh0 + i_bh.to(tl.int64) * K * V + p_state, b_dh, mask=m_kv)


@triton.jit
def _bwd_dqkv_kernel(
    q, k, v, gc, hs, dhs, do, dq, dk, dv, dg,
    scale, T, NT,
    H: tl.constexpr, HK: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_G: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = i_bh % H
    i_hk = i_h // (H // HK)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    t = i_t * BT + o_t
    m_t = t < T
    m_tk = m_t[:, None] & m_k[None, :]
    row = i_b * T + t
    # i >= j, and row i before T: rows past T load gc = 0, and exp(0 - gc_j) of a steep chunk is inf
    # (times their zero q or dO: NaN in dk, dv), so they are excluded before the exp, like j > i.
    causal = (o_t[:, None] >= o_t[None, :]) & m_t[:, None]

    b_q = tl.load(q + (row * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + (row * HK + i_hk)[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
    if HAS_G:
        b_g = tl.load(gc + row * H + i_h, mask=m_t, other=0.0)
        t_last = tl.minimum(i_t * BT + BT, T) - 1
        b_gl = tl.load(gc + (i_b * T + t_last) * H + i_h)
        b_m = tl.exp(tl.where(causal, b_g[:, None] - b_g[None, :], float("-inf")))
        b_kd = (b_k * tl.exp(b_gl - b_g)[:, None]).to(b_k.dtype)
    else:
        b_m = tl.where(causal, 1.0, 0.0)
        b_kd = b_k
    # A_ij = scale * (q_i . k_j) * M_ij: the intra-chunk "attention" matrix
    b_a = _dot(b_q, tl.trans(b_k), DOT_F32, PREC) * b_m * scale

    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_ds = tl.zeros([BT, BT], dtype=tl.float32)
    p_state0 = ((i_b * NT + i_t) * H + i_h) * K * V
    for i_v in range(0, (V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_state = p_state0 + o_k[:, None] * V + o_v[None, :]
        b_v = tl.load(v + (row * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0)
        b_do = tl.load(do + (row * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(b_v.dtype)
        b_hh = tl.load(hs + p_state, mask=m_kv, other=0.0)    # state entering the chunk
        b_dh = tl.load(dhs + p_state, mask=m_kv, other=0.0)   # gradient of the state leaving it
        b_ds += _dot(b_do, tl.trans(b_v), DOT_F32, PREC)
        b_dq += _dot(b_do, tl.trans(b_hh.to(b_v.dtype)), DOT_F32, PREC)
        b_dk += _dot(b_v, tl.trans(b_dh.to(b_v.dtype)), DOT_F32, PREC)
        b_dv = _dot(tl.trans(b_a.to(b_v.dtype)), b_do, DOT_F32, PREC)
        b_dv += _dot(b_kd.to(b_v.dtype), b_dh.to(b_v.dtype), DOT_F32, PREC)
        tl.store(dv + (row * H + i_h)[:, None] * V + o_v[None, :], b_dv.to(dv.dtype.element_ty), mask=m_tv)

    if HAS_G:
        b_dq = b_dq * tl.exp(b_g)[:, None]
        b_dk = b_dk * tl.exp(b_gl - b_g)[:, None]
    b_dq = b_dq * scale
    b_ds = b_ds * b_m * scale
    b_dq += _dot(b_ds.to(b_k.dtype), b_k, DOT_F32, PREC)
    b_dk += _dot(tl.trans(b_ds.to(b_q.dtype)), b_q, DOT_F32, PREC)
    p_out = (row * H + i_h)[:, None] * K + o_k[None, :]
    tl.store(dq + p_out, b_dq.to(dq.dtype.element_ty), mask=m_tk)
    tl.store(dk + p_out, b_dk.to(dk.dtype.element_ty), mask=m_tk)
    if HAS_G:
        b_dgt = tl.sum(b_q.to(tl.float32) * b_dq, axis=1) - tl.sum(b_k.to(tl.float32) * b_dk, axis=1)
        tl.store(dg + row * H + i_h, b_dgt, mask=m_t)


# ----------------------------------------------------------------------------- launchers


def chunk_local_cumsum(g: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Cumulative sum of g [B, T, H] restarted at every chunk of `chunk_size` tokens (fp32)."""
    Bsz, T, H = g.shape
    NT = -(-T // chunk_size)
    gp = torch.nn.functional.pad(g.float(), (0, 0, 0, NT * chunk_size - T))
    return gp.view(Bsz, NT, chunk_size, H).cumsum(2).view(Bsz, NT * chunk_size, H)[:, :T].contiguous()


def _config(q: torch.Tensor, K: int, V: int, chunk_size: int):
    """Tiles (BT, BK, BV for the forward/dh kernels, BV for the dqkv kernel) and dot settings.

    The tile BT is the chunk size, capped so the kernels fit the 227 KiB of shared
    memory of an H100/H200 (sizes checked by compiling for sm_90; the chunk size
    does not change the result, only the rounding): bf16/fp16 BT <= 128 (<= 64
    for K > 128); fp32 BT <= 64 (<= 32 for K > 128). The dqkv kernel keeps two
    fp32 [K, BV] state tiles, so its BV drops to 16 for K > 128, and runs with num_stages=1.
    """
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(64, triton.next_power_of_2(V)))
    fp32 = q.dtype == torch.float32
    BT = min(chunk_size, (64 if BK <= 128 else 32) if fp32 else (128 if BK <= 128 else 64))
    BV_dqkv = BV if BK <= 128 else 16
    dot_f32 = fp32 or _interpreting()
    prec = "tf32" if (fp32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    return BT, BK, BV, BV_dqkv, dot_f32, prec


def _fwd(q, k, v, gc, h0, scale, BT, *, compute_o, store_final, store_states, out_dtype):
    Bsz, T, HK, K = q.shape
    H, V = v.shape[2], v.shape[3]
    NT = triton.cdiv(T, BT)
    _, BK, BV, _, dot_f32, prec = _config(q, K, V, BT)
    o = torch.empty(Bsz, T, H, V, device=v.device, dtype=out_dtype) if compute_o else None
    ht = torch.empty(Bsz, H, K, V, device=v.device, dtype=torch.float32) if store_final else None
    hs = torch.empty(Bsz, NT, H, K, V, device=v.device, dtype=torch.float32) if store_states else None
    grid = (triton.cdiv(V, BV), Bsz * H)
    _fwd_kernel[grid](
        q, k, v, gc, h0, o, ht, hs, float(scale), T, NT,
        H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV,
        HAS_G=gc is not None, HAS_H0=h0 is not None, STORE_FINAL=store_final,
        STORE_STATES=store_states, COMPUTE_O=compute_o, DOT_F32=dot_f32, PREC=prec,
        num_warps=4,
    )
    return o, ht, hs


def _bwd(q, k, v, gc, h0, do, dht, scale, BT, need_dh0):
    Bsz, T, HK, K = q.shape
    H, V = v.shape[2], v.shape[3]
    NT = triton.cdiv(T, BT)
    _, BK, BV, BV_dqkv, dot_f32, prec = _config(q, K, V, BT)
    has_g = gc is not None
    _, ht, hs = _fwd(q, k, v, gc, h0, scale, BT, compute_o=False, store_final=has_g and dht is not None,
                     store_states=True, out_dtype=v.dtype)
    dhs = torch.empty(Bsz, NT, H, K, V, device=v.device, dtype=torch.float32)
    dh0 = torch.empty(Bsz, H, K, V, device=v.device, dtype=torch.float32) if need_dh0 else None
    _bwd_dh_kernel[(triton.cdiv(V, BV), Bsz * H)](
        q, do, gc, dht, dh0, dhs, float(scale), T, NT,
        H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV,
        HAS_G=has_g, HAS_DHT=dht is not None, STORE_DH0=need_dh0, DOT_F32=dot_f32, PREC=prec,
        num_warps=4,
    )
    grouped = HK != H
    dq = torch.empty(Bsz, T, H, K, device=q.device, dtype=torch.float32 if grouped else q.dtype)
    dk = torch.empty(Bsz, T, H, K, device=q.device, dtype=torch.float32 if grouped else k.dtype)
    dv = torch.empty_like(v)
    dG = torch.empty(Bsz, T, H, device=v.device, dtype=torch.float32) if has_g else None
    _bwd_dqkv_kernel[(NT, Bsz * H)](
        q, k, v, gc, hs, dhs, do, dq, dk, dv, dG, float(scale), T, NT,
        H=H, HK=HK, K=K, V=V, BT=BT, BK=BK, BV=BV_dqkv,
        HAS_G=has_g, DOT_F32=dot_f32, PREC=prec,
        # dq, dk [BT, BK] fp32 accumulators live across the V loop; no software pipelining of that
        # loop (num_stages=1): multi-buffered [K, BV] state tiles overflow shared memory for V > 64
        num_warps=8 if BK >= 128 else 4, num_stages=1,
    )
    if grouped:
        dq = dq.view(Bsz, T, HK, H // HK, K).sum(3).to(q.dtype)
        dk = dk.view(Bsz, T, HK, H // HK, K).sum(3).to(k.dtype)
    dg = None
    if has_g:
        if dht is not None:  # G_T multiplies the whole final state: d<S_T, dS_T>/dG_T = <S_T, dS_T>
            dG[:, T - 1] += (ht * dht).sum((-2, -1))
        dg = dG.flip(1).cumsum(1).flip(1)  # g_s enters every G_t with t >= s
    return dq, dk, dv, dg, dh0


class ChunkScalarDecayFunction(torch.autograd.Function):
    """(q, k, v, g|None, h0|None) -> (o, final state|None); see the module docstring."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, chunk_size, output_final_state, out_dtype):
        gc = chunk_local_cumsum(g, chunk_size) if g is not None else None
        o, ht, _ = _fwd(q, k, v, gc, h0, scale, chunk_size, compute_o=True, store_final=output_final_state,
                        store_states=False, out_dtype=out_dtype)
        ctx.save_for_backward(q, k, v, gc, h0)
        ctx.scale, ctx.chunk_size, ctx.has_g = scale, chunk_size, g is not None
        ctx.set_materialize_grads(False)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, h0 = ctx.saved_tensors
        do = torch.zeros_like(v) if do is None else do.to(v.dtype).contiguous()
        dht = None if dht is None else dht.float().contiguous()
        need_dh0 = h0 is not None and ctx.needs_input_grad[4]
        dq, dk, dv, dg, dh0 = _bwd(q, k, v, gc, h0, do, dht, ctx.scale, ctx.chunk_size, need_dh0)
        return dq, dk, dv, dg, dh0, None, None, None, None


def chunk_scalar_decay(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    out_dtype: torch.dtype | None = None,
):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale * S_t^T q_t, chunked, in Triton.

    q, k [B, T, HK, K]; v [B, T, H, V] (H % HK == 0); g [B, T, H] natural-log
    decay (<= 0) or None for no decay; initial_state [B, H, K, V].
    chunk_size in (16, 32, 64, 128) is the tile; it is capped for large K / fp32 (see `_config`).
    Returns (o [B, T, H, V] in out_dtype (default v's dtype), final state [B, H, K, V] fp32 or None).
    """
    if not (q.is_cuda or _interpreting()):
        raise RuntimeError("triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter)")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"chunk_scalar_decay: expected q, k [B, T, HK, K] and v [B, T, H, V], got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    Bsz, T, HK, K = q.shape
    H, V = v.shape[2], v.shape[3]
    if H % HK:
        raise ValueError(f"chunk_scalar_decay: v heads ({H}) must be a multiple of q/k heads ({HK})")
    if K > TRITON_MAX_HEAD_DIM:
        raise ValueError(f"chunk_scalar_decay: key dim {K} > {TRITON_MAX_HEAD_DIM} is not supported")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_scalar_decay: chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    if g is not None and g.shape != (Bsz, T, H):
        raise ValueError(f"chunk_scalar_decay: g must be [B, T, H] = {(Bsz, T, H)}, got {tuple(g.shape)}")
    if initial_state is not None and initial_state.shape != (Bsz, H, K, V):
        raise ValueError(f"chunk_scalar_decay: initial_state must be [B, H, K, V] = {(Bsz, H, K, V)}, "
                         f"got {tuple(initial_state.shape)}")
    dtype = v.dtype
    q, k, v = (t.to(dtype).contiguous() for t in (q, k, v))
    BT = _config(v, K, V, int(chunk_size))[0]
    g = None if g is None else g.float().contiguous()
    h0 = None if initial_state is None else initial_state.float().contiguous()
    return ChunkScalarDecayFunction.apply(q, k, v, g, h0, float(scale), BT, bool(output_final_state),
                                          out_dtype or dtype)
