"""Triton kernel for NSA's selection branch (math and the other faces in `nsa.py`).

Group-centric, as the paper's kernel: one program per (query position t, batch · KV head) loads
the queries of all G query heads of that KV group ([G, K], padded to a tile of at least 16 rows),
then streams the group's selected blocks — each block's keys and values loaded once for all G
heads — with an online softmax (running max m, running sum l, fp32 accumulator). Tokens past t,
past T, or of a padding slot (block index -1) are masked. It writes o [B, T, HQ, V] (fp32) and
the log-sum-exp lse [B, T, HQ] of each row's scores.

Backward: `nsa.SelectionAttention.backward` recomputes the branch with the PyTorch gather path
(`nsa.selection_attention_gather`, whose own backward recomputes each chunk) and differentiates that; the
selection itself is discrete and gets no gradient. A Triton backward is left for later.

All arithmetic is fp32 (16-bit inputs are upcast on load); `tl.dot` uses "ieee" precision for fp32
inputs and "tf32" for 16-bit ones (which carry less precision than tf32 anyway), as the delta-rule
kernels do. Limits (checked by `registry.nsa_triton_unfit`): G <= 64, K, V <= 256, l' <= 128.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _selection_fwd_kernel(q, k, v, idx, o, lse, scale, T, H: tl.constexpr, G: tl.constexpr, K: tl.constexpr,
                          V: tl.constexpr, N: tl.constexpr, L: tl.constexpr, BG: tl.constexpr, BK: tl.constexpr,
                          BV: tl.constexpr, BL: tl.constexpr, DOT_PREC: tl.constexpr):
    t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    HQ = H * G
    rg = tl.arange(0, BG)
    ck = tl.arange(0, BK)
    cv = tl.arange(0, BV)
    cl = tl.arange(0, BL)
    mg = rg < G
    q_rows = (i_b * T + t) * HQ + i_h * G + rg  # the group's query heads at position t
    b_q = tl.load(q + q_rows[:, None] * K + ck[None, :], mask=mg[:, None] & (ck[None, :] < K), other=0.0)
    b_q = b_q.to(tl.float32) * scale
    m_i = tl.full([BG], -1e30, dtype=tl.float32)  # finite, so fully masked blocks give exp(0 - 0) weights of 0
    l_i = tl.zeros([BG], dtype=tl.float32)
    acc = tl.zeros([BG, BV], dtype=tl.float32)
    for i in range(N):
        blk = tl.load(idx + ((i_b * T + t) * H + i_h) * N + i)
        s_pos = blk * L + cl
        ms = ((blk + 0 * cl) >= 0) & (cl < L) & (s_pos <= t) & (s_pos < T)
        kv_rows = (i_b * T + s_pos) * H + i_h
        b_k = tl.load(k + kv_rows[:, None] * K + ck[None, :], mask=ms[:, None] & (ck[None, :] < K),
                      other=0.0).to(tl.float32)
        b_v = tl.load(v + kv_rows[:, None] * V + cv[None, :], mask=ms[:, None] & (cv[None, :] < V),
                      other=0.0).to(tl.float32)
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PREC)  # [BG, BL]
        b_s = tl.where(ms[None, :], b_s, -1e30)
        m_new = tl.maximum(m_i, tl.max(b_s, axis=1))
        b_p = tl.where(ms[None, :], tl.exp(b_s - m_new[:, None]), 0.0)
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(b_p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(b_p, b_v, input_precision=DOT_PREC)
        m_i = m_new
    # every query's own block is always selected, so l_i > 0 for real rows
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    tl.store(o + q_rows[:, None] * V + cv[None, :], acc / l_safe[:, None], mask=mg[:, None] & (cv[None, :] < V))
    tl.store(lse + q_rows, m_i + tl.log(l_safe), mask=mg)


def _tile(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def selection_forward(q, k, v, block_indices, select_block: int, scale: float):
    """o [B, T, HQ, V] fp32 and lse [B, T, HQ] fp32 of the selection branch, by the Triton kernel."""
    B, T, HQ, K = q.shape
    H, V, N = k.shape[2], v.shape[-1], block_indices.shape[-1]
    G = HQ // H
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    idx = block_indices.to(torch.int32).contiguous()
    o = torch.empty(B, T, HQ, V, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, T, HQ, device=q.device, dtype=torch.float32)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _selection_fwd_kernel[(T, B * H)](q, k, v, idx, o, lse, scale, T, H=H, G=G, K=K, V=V, N=N, L=select_block,
                                      BG=_tile(G), BK=_tile(K), BV=_tile(V), BL=_tile(select_block),
                                      DOT_PREC=prec)
    return o, lse
