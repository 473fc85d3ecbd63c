"""The chunk-local algebra of the chunked gated delta rule, shared by its PyTorch and Triton faces.

Within a chunk of C tokens everything that does not depend on the incoming state is computed at
once (`_chunk_intra`): the decayed Gram matrices (`_decayed_grams`, factored where the decay's span
allows, split into sub-chunks where it is steep), the WY/UT form by a triangular solve, and the
decayed queries and keys. `_to_chunks` / `_from_chunks` move between [B, T, H, ...] and chunked,
head-first fp32 [B, H, N, C, ...]. The maths is in docs/algorithms.md §3.3-3.4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SUB_CHUNK = 16  # sub-chunk size for per-channel decayed Gram matrices of steep chunks
# Largest decay (nats) inside a chunk or sub-chunk that is still one matmul: its factors
# reach exp(+-40) ~ 1e17 / 1e-18, far from fp32's overflow (e^88) and denormals (e^-87).
FACTOR_SPAN = 40.0


def _masked_exp(diff, mask):
    """exp(diff) where mask, else 0 — masking the exponent first, so no inf*0 = NaN."""
    return torch.where(mask, diff, torch.full_like(diff, -math.inf)).exp()


def _pairwise_gram(x, y, gam):
    """The definition, with a [C, C, D] decay tensor: G_ij = sum_c x_ic y_jc exp(gam_ic - gam_jc), i >= j.

    x, y, gam: [M, C, D]. Exact for any decay; used only for sub-chunks that decay too fast to factor.
    """
    C = x.shape[-2]
    tri = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    e = _masked_exp(gam[:, :, None, :] - gam[:, None, :, :], tri[..., None])
    return (x[:, :, None, :] * y[:, None, :, :] * e).sum(-1)


def _decayed_grams(xs, y, gam, per_head: bool, sub: int = SUB_CHUNK):
    """G_ij = sum_c x_ic y_jc exp(gam_ic - gam_jc) for i >= j, else 0, for each x in xs (sharing y and gam).

    xs: tuple of [..., C, D]; y: [..., C, D]; gam: [..., C, D] per channel or [..., C] per head
    (cumulative log-decays, non-increasing along C). Returns a list of [..., C, C].

    Per channel, with an anchor token a (the block's first), exp(gam_i - gam_j) =
    exp(gam_i - gam_a) exp(gam_a - gam_j): the first factor is <= 1, the second at most
    exp(span), span = how far the decay falls inside the block. Blocks (chunks) with span <=
    FACTOR_SPAN are one matmul, like per-head decay; steeper ones are cut into sub-chunks
    (`_split_grams`), down to sub-chunks so steep they are computed pairwise.
    """
    C = y.shape[-2]
    if per_head:
        idx = torch.arange(C, device=y.device)
        decay = _masked_exp(gam[..., :, None] - gam[..., None, :], idx[:, None] >= idx[None, :])
        return [(x @ y.mT) * decay for x in xs]
    grams = _anchored_grams(xs, y, gam, min(sub, C))
    return list(grams.reshape(*grams.shape[:-2], len(xs), C, C).unbind(-3))


def _anchored_grams(xs, y, gam, sub: int):
    """Per-channel `_decayed_grams` over blocks of C tokens, factored where the span allows, else split;
    returns every x's Gram matrix stacked along the rows, [..., len(xs) * C, C]."""
    lead, C, D, nx = y.shape[:-2], y.shape[-2], y.shape[-1], len(xs)
    rel = gam - gam[..., :1, :]  # <= 0: exponent relative to the block's first token
    e_x = rel.exp()
    # The clamp only keeps the steep blocks, recomputed below, finite.
    y_f = y * (-rel).clamp(max=FACTOR_SPAN).exp()
    x_f = torch.cat([x * e_x for x in xs], dim=-2)  # every x's rows stacked: one matmul serves all
    lower = torch.ones(C, C, dtype=torch.bool, device=y.device).tril()
    grams = (x_f @ y_f.mT) * lower.repeat(nx, 1)  # [..., nx * C, C]
    steep = (rel.abs().amax(dim=(-2, -1)) > FACTOR_SPAN).flatten().nonzero().squeeze(1)
    if steep.numel():
        def blocks(t):  # the steep blocks of t, as [M, C, D]
            return t.reshape(-1, C, D)[steep]

        xs_s, y_s, gam_s = [blocks(x) for x in xs], blocks(y), blocks(gam)
        if C > sub:
            exact = _split_grams(xs_s, y_s, gam_s, sub)
        else:
            exact = torch.cat([_pairwise_gram(x, y_s, gam_s) for x in xs_s], dim=-2)
        grams = grams.reshape(-1, nx * C, C).index_copy(0, steep, exact).reshape(*lead, nx * C, C)
    return grams


def _split_grams(xs, y, gam, sub: int):
    """`_anchored_grams` of steep blocks [M, C, D] from sub-chunks of `sub` tokens (FLA's secondary chunking).

    Below the diagonal, block (s, b), b < s: rows scaled to s's first token, columns to it too
    (exp(gam_a - gam_j) <= 1 for j before a): a plain matmul. On the diagonal: `_anchored_grams`.
    """
    M, C, D = y.shape
    ns, nx = C // sub, len(xs)
    ys, gs = y.reshape(M, ns, sub, D), gam.reshape(M, ns, sub, D)
    anchor = gs[..., :1, :]  # [M, ns, 1, D]
    e_x = (gs - anchor).exp()
    rows, cols = torch.tril_indices(ns, ns, -1, device=y.device)
    x_off = torch.cat([x.reshape(M, ns, sub, D)[:, rows] * e_x[:, rows] for x in xs], dim=-2)
    y_off = ys[:, cols] * (anchor[:, rows] - gs[:, cols]).exp()
    g_off = x_off @ y_off.mT  # [M, pairs, nx * sub, sub]
    g_diag = _anchored_grams([x.reshape(M, ns, sub, D) for x in xs], ys, gs, sub)  # [M, ns, nx * sub, sub]
    # Assemble the [ns, ns] grid of blocks (zeros above the diagonal) into [C, C] per x.
    diag = torch.arange(ns, device=y.device)
    grid = g_diag.new_zeros(M, ns * ns, nx * sub, sub).index_copy(
        1, torch.cat([rows * ns + cols, diag * ns + diag]), torch.cat([g_off, g_diag], dim=1)
    )
    grid = grid.reshape(M, ns, ns, nx, sub, sub).permute(0, 3, 1, 4, 2, 5)  # [M, nx, ns, sub, ns, sub]
    return grid.reshape(M, nx * C, C)


def _chunk_intra(q, k, v, g, beta, per_head: bool):
    """Everything inside a chunk that does not depend on the incoming state.

    Inputs are fp32, chunked, head-first: q, k [B, H, N, C, K] (q already scaled), v [B, H, N, C, V],
    g [B, H, N, C(, K)], beta [B, H, N, C]. Returns (Qg, Kd, e, W, U, P):
    Qg = exp(gamma) * Q, Kd = exp(gamma_C - gamma) * K, e = exp(gamma_C) [B, H, N(, K)],
    W, U the WY form, P the masked decayed q-k Gram matrix [B, H, N, C, C].
    """
    gam = g.cumsum(-1 if per_head else -2)
    gam_last = gam[..., -1] if per_head else gam[..., -1, :]
    gcol = gam[..., None] if per_head else gam  # broadcastable against [.., C, K]
    glast = gam_last[..., None, None] if per_head else gam_last[..., None, :]
    eg = gcol.exp()
    a, P = _decayed_grams((k, q), k, gam, per_head)
    rhs = torch.cat([beta[..., None] * eg * k, beta[..., None] * v], dim=-1)
    # (I + A) X = rhs by forward substitution: X = T rhs with T the UT transform. A is the strict
    # lower triangle of beta * Gram: unitriangular=True reads only that triangle (the unit diagonal
    # implied), so no mask or identity is needed, and A's gradient comes back strictly lower.
    wu = torch.linalg.solve_triangular(a * beta[..., :, None], rhs, upper=False, unitriangular=True)
    W, U = wu.split([k.shape[-1], v.shape[-1]], dim=-1)
    Qg = eg * q
    Kd = (glast - gcol).exp() * k
    return Qg, Kd, gam_last.exp(), W, U, P


def _to_chunks(x, T_pad: int, C: int):
    """[B, T, H, ...] -> fp32 [B, H, N, C, ...], zero-padded along T."""
    x = x.float()
    T = x.shape[1]
    if T_pad != T:
        pad = [0, 0] * (x.dim() - 2) + [0, T_pad - T]
        x = F.pad(x, pad)
    B, _, H = x.shape[:3]
    x = x.reshape(B, T_pad // C, C, H, *x.shape[3:])
    return x.movedim(3, 1)  # [B, H, N, C, ...]


def _from_chunks(x, T: int):
    """[B, H, N, C, ...] -> [B, T, H, ...]."""
    B, H, N, C = x.shape[:4]
    return x.movedim(1, 3).reshape(B, N * C, H, *x.shape[4:])[:, :T]
