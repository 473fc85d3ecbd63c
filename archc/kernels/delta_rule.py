"""The gated delta rule, shared by Gated DeltaNet (GDN) and Kimi Delta Attention (KDA).

GDN is KDA with one decay per head instead of one per key channel, so both run
through the same three faces (algorithms.md §5.3, §5.4; FLA conventions §5.0):

- `delta_rule_reference`: the recurrent form, one token at a time, in fp32.
- `delta_rule_chunked`: the chunkwise-parallel WY/UT form in PyTorch,
  differentiable by autograd; the fast path on the CPU.
- `delta_rule_triton`: Triton kernels (`_triton_delta_rule.py`) behind a
  `torch.autograd.Function`; the path on CUDA.
- `delta_rule(..., impl="auto")` picks triton on CUDA, chunked elsewhere.

Conventions (FLA's, so FLA checkpoints and tests carry over):
- Sequence-first layout: q, k [B, T, H, K], v [B, T, H, V]; beta [B, T, H];
  the state per head is K×V: [B, H, K, V]; the final state is returned in fp32.
- `g` is the natural-log decay per token (g <= 0): [B, T, H, K] per key channel
  (KDA) or [B, T, H] per head (GDN, broadcast over K).
- `scale` multiplies q and defaults to K ** -0.5.
- q and k are used as given (no L2 norm inside; the layer normalises them).
- Every path computes in fp32 and returns o in v's dtype.

Recurrence, per head and token t (this exact order; §5.3's naive algorithm):

    S   <- diag(exp(g_t)) S                 decay first (rows = key channels)
    u_t  = beta_t (v_t - S^T k_t)           delta-rule error on the decayed state
    S   <- S + k_t u_t^T                    i.e. S_t = (I - b k k^T) D_t S + b k v^T
    o_t  = S^T (scale q_t)                  read-out after the update

Chunkwise form, chunk of C tokens r = 1..C (§5.4; GDN is the same with a
scalar gamma), gamma_r = sum_{i<=r} g_i (cumulative log-decay inside the
chunk), Q already scaled, S the state entering the chunk:

    A_ij  = beta_i sum_c k_ic k_jc exp(gamma_ic - gamma_jc)   for i > j, else 0
    T     = (I + A)^-1                     (unit lower-triangular "UT transform")
    W     = T diag(beta) (exp(gamma) * K)   U = T diag(beta) V    (WY form)
    Vn    = U - W S                        (the chunk's true delta-rule errors u_t)
    P_ij  = sum_c q_ic k_jc exp(gamma_ic - gamma_jc)          for i >= j, else 0
    O     = (exp(gamma) * Q) S + P Vn
    S'    = diag(exp(gamma_C)) S + (exp(gamma_C - gamma) * K)^T Vn

Numerics: every exponent used is <= 0 (no overflow for any g <= 0). For
per-channel decay the C×C "decayed Gram" matrices A and P cannot be one
matmul of exp(gamma)Q by exp(-gamma)K (that overflows once a chunk decays by
more than ~88 nats). The PyTorch path builds them from sub-chunks of 16: blocks
below the diagonal use an anchor token a between i and j, exp(gamma_i - gamma_a)
and exp(gamma_a - gamma_j) both <= 1, so they are plain matmuls; the 16×16
blocks on the diagonal are computed pairwise. The Triton kernels build them one
column at a time with masked exponents (see `_triton_delta_rule.py`).

Padding: T is padded up to a multiple of C with q = k = v = g = beta = 0.
Such tokens leave the state untouched (decay exp(0) = 1, k = 0) and their
outputs are dropped, so no other masking is needed.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

__all__ = [
    "delta_rule",
    "delta_rule_reference",
    "delta_rule_chunked",
    "delta_rule_triton",
    "check_delta_rule_inputs",
]

CHUNK_SIZES = (16, 32, 64)
SUB_CHUNK = 16  # diagonal block size for per-channel decayed Gram matrices
TRITON_MAX_HEAD_DIM = 256  # the kernels hold whole K×V states and C×K tiles in registers


# ----------------------------------------------------------------------------- checks


def check_delta_rule_inputs(q, k, v, g, beta, initial_state=None) -> bool:
    """Validate shapes; return True for per-head (GDN) decay, False for per-channel (KDA)."""
    if q.dim() != 4:
        raise ValueError(
            f"delta rule: q must be [B, T, H, K] (sequence-first, like FLA), got shape {tuple(q.shape)}"
        )
    B, T, H, K = q.shape
    V = v.shape[-1]
    if tuple(k.shape) != (B, T, H, K):
        raise ValueError(f"delta rule: k must match q's shape [B, T, H, K] = {(B, T, H, K)}, got {tuple(k.shape)}")
    if tuple(v.shape) != (B, T, H, V):
        raise ValueError(f"delta rule: v must be [B, T, H, V] with B, T, H = {(B, T, H)}, got {tuple(v.shape)}")
    if tuple(beta.shape) != (B, T, H):
        raise ValueError(f"delta rule: beta must be [B, T, H] = {(B, T, H)}, got {tuple(beta.shape)}")
    if tuple(g.shape) == (B, T, H):
        per_head = True
    elif tuple(g.shape) == (B, T, H, K):
        per_head = False
    else:
        raise ValueError(
            "delta rule: g must be [B, T, H] (per-head decay, GDN) or [B, T, H, K] (per-channel, KDA) = "
            f"{(B, T, H)} or {(B, T, H, K)}, got {tuple(g.shape)}"
        )
    if initial_state is not None and tuple(initial_state.shape) != (B, H, K, V):
        raise ValueError(
            f"delta rule: initial_state must be [B, H, K, V] = {(B, H, K, V)}, got {tuple(initial_state.shape)}"
        )
    return per_head


def _default_scale(scale, K: int) -> float:
    return K**-0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------- reference


def delta_rule_reference(q, k, v, g, beta, initial_state=None, output_final_state=False, scale=None):
    """Recurrent gated delta rule, one token at a time, in fp32 (obviously right, slow).

    Returns (o [B, T, H, V] in v's dtype, final state [B, H, K, V] fp32 or None).
    """
    per_head = check_delta_rule_inputs(q, k, v, g, beta, initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = _default_scale(scale, K)
    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if per_head:
        g = g[..., None]  # [B, T, H, 1]: the same decay for every key channel
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outs = []
    q = q * scale
    decay = g.exp()[..., None]  # [B, T, H, K or 1, 1]
    for t in range(T):
        q_t, k_t, v_t = q[:, t, :, None, :], k[:, t, :, None, :], v[:, t, :, None, :]  # [B, H, 1, K|V]
        S = S * decay[:, t]  # decay the rows (key channels)
        u_t = beta[:, t, :, None, None] * (v_t - k_t @ S)  # beta (v_t - S^T k_t)
        S = S + k_t.mT * u_t  # + k_t u_t^T
        outs.append(q_t @ S)  # (S^T q_t)^T
    o = torch.cat(outs, dim=2).transpose(1, 2).to(out_dtype)  # [B, H, T, V] -> [B, T, H, V]
    return o, (S if output_final_state else None)


# ----------------------------------------------------------------------------- chunked


def _masked_exp(diff, mask):
    """exp(diff) where mask, else 0 — masking the exponent first, so no inf*0 = NaN."""
    return torch.where(mask, diff, torch.full_like(diff, -math.inf)).exp()


def _decayed_gram(x, y, gam, per_head: bool, sub: int = SUB_CHUNK):
    """G_ij = sum_c x_ic y_jc exp(gam_ic - gam_jc) for i >= j, else 0.

    x, y: [..., C, D]; gam: [..., C, D] per channel or [..., C] per head (cumulative log-decays,
    non-increasing along C). Returns [..., C, C], computed without any positive exponent.
    """
    C = x.shape[-2]
    idx = torch.arange(C, device=x.device)
    lower = idx[:, None] >= idx[None, :]
    if per_head:
        return (x @ y.mT) * _masked_exp(gam[..., :, None] - gam[..., None, :], lower)
    sub = min(sub, C)
    assert C % sub == 0, (C, sub)
    ns = C // sub
    D = x.shape[-1]
    lead = x.shape[:-2]
    xs = x.reshape(*lead, ns, sub, D)
    ys = y.reshape(*lead, ns, sub, D)
    gs = gam.reshape(*lead, ns, sub, D)
    # Below-diagonal blocks: rows in sub-chunk a, anchor = first token of a, columns before it.
    anchor = gs[..., :, :1, :]  # [..., ns, 1, D]
    x_a = xs * (gs - anchor).exp()  # exponent <= 0: i >= anchor
    before = idx[None, :] < (torch.arange(ns, device=x.device) * sub)[:, None]  # [ns, C]
    y_a = y[..., None, :, :] * _masked_exp(anchor - gam[..., None, :, :], before[..., None])  # [..., ns, C, D]
    g_off = (x_a @ y_a.mT).reshape(*lead, C, C)  # rows of block a only see columns before a
    # Diagonal blocks, pairwise: [..., ns, sub, sub, D].
    tri = lower[:sub, :sub]
    e = _masked_exp(gs[..., :, None, :] - gs[..., None, :, :], tri[..., None])
    g_diag = torch.einsum("...aic,...ajc,...aijc->...aij", xs, ys, e)  # [..., ns, sub, sub]
    eye = torch.eye(ns, device=x.device, dtype=x.dtype)
    g_diag = (g_diag[..., :, :, None, :] * eye[:, None, :, None]).reshape(*lead, C, C)
    return g_off + g_diag


def _chunk_intra(q, k, v, g, beta, per_head: bool):
    """Everything inside a chunk that does not depend on the incoming state.

    Inputs are fp32, chunked, head-first: q, k [B, H, N, C, K] (q already scaled), v [B, H, N, C, V],
    g [B, H, N, C(, K)], beta [B, H, N, C]. Returns (Qg, Kd, e, W, U, P):
    Qg = exp(gamma) * Q, Kd = exp(gamma_C - gamma) * K, e = exp(gamma_C) [B, H, N(, K)],
    W, U the WY form, P the masked decayed q-k Gram matrix [B, H, N, C, C].
    """
    C = q.shape[-2]
    gam = g.cumsum(-1 if per_head else -2)
    gam_last = gam[..., -1] if per_head else gam[..., -1, :]
    gcol = gam[..., None] if per_head else gam  # broadcastable against [.., C, K]
    glast = gam_last[..., None, None] if per_head else gam_last[..., None, :]
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    a = _decayed_gram(k, k, gam, per_head) * strict * beta[..., :, None]
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * gcol.exp() * k, beta[..., None] * v], dim=-1)
    # (I + A) X = rhs by forward substitution: X = T rhs with T the UT transform.
    wu = torch.linalg.solve_triangular(eye + a, rhs, upper=False, unitriangular=True)
    W, U = wu.split([k.shape[-1], v.shape[-1]], dim=-1)
    P = _decayed_gram(q, k, gam, per_head)
    Qg = gcol.exp() * q
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


def delta_rule_chunked(
    q, k, v, g, beta, initial_state=None, output_final_state=False, scale=None, chunk_size: int = 64
):
    """Chunkwise-parallel gated delta rule (WY/UT form) in PyTorch, differentiable by autograd."""
    per_head = check_delta_rule_inputs(q, k, v, g, beta, initial_state)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"delta rule: chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = _default_scale(scale, K)
    N = max(1, -(-T // C))
    T_pad = N * C
    qc, kc, vc, gc, bc = (_to_chunks(x, T_pad, C) for x in (q, k, v, g, beta))
    Qg, Kd, e, W, U, P = _chunk_intra(qc * scale, kc, vc, gc, bc, per_head)
    e = e[..., None, None] if per_head else e[..., None]  # broadcast over the state's rows / columns
    S = q.new_zeros(B, H, K, V, dtype=torch.float32) if initial_state is None else initial_state.float()
    outs = []
    # Unbind once: indexing [:, :, n] inside the loop makes each backward write a full-size
    # zero tensor per chunk, which is quadratic in the number of chunks.
    chunks = zip(*(t.unbind(2) for t in (U, W, Qg, P, e, Kd)))
    for Un, Wn, Qn, Pn, en, Kn in chunks:  # inter-chunk recurrence: the only sequential part
        v_new = Un - Wn @ S
        outs.append(Qn @ S + Pn @ v_new)
        S = en * S + Kn.mT @ v_new
    o = _from_chunks(torch.stack(outs, dim=2), T).to(v.dtype)
    return o, (S if output_final_state else None)


# ----------------------------------------------------------------------------- triton


def delta_rule_triton(
    q, k, v, g, beta, initial_state=None, output_final_state=False, scale=None, chunk_size: int = 64
):
    """Chunked gated delta rule through Triton kernels (see `_triton_delta_rule.py` for what runs where)."""
    per_head = check_delta_rule_inputs(q, k, v, g, beta, initial_state)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"delta rule: chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    if max(q.shape[-1], v.shape[-1]) > TRITON_MAX_HEAD_DIM:
        raise ValueError(
            f"delta rule: the Triton kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got K={q.shape[-1]}, "
            f"V={v.shape[-1]}; use impl='chunked'"
        )
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "delta rule: impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)"
        )
    from archc.kernels._triton_delta_rule import DeltaRuleTritonFunction

    scale = _default_scale(scale, q.shape[-1])
    o, final = DeltaRuleTritonFunction.apply(
        q, k, v, g, beta, initial_state, bool(output_final_state), scale, chunk_size, per_head
    )
    return o, (final if output_final_state else None)


# ----------------------------------------------------------------------------- dispatcher


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def delta_rule(
    q,
    k,
    v,
    g,
    beta,
    initial_state=None,
    output_final_state=False,
    scale=None,
    chunk_size: int = 64,
    impl: str = "auto",
):
    """Gated delta rule (GDN with g [B, T, H], KDA with g [B, T, H, K]); returns (o, final_state or None).

    impl: "auto" (triton on CUDA when triton imports and K, V <= 256; chunked otherwise), "reference",
    "chunked", "triton". chunk_size (16, 32 or 64) applies to chunked and triton.
    """
    if impl == "auto":
        small_heads = max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_HEAD_DIM
        impl = "triton" if q.is_cuda and small_heads and _triton_available() else "chunked"
    if impl == "reference":
        return delta_rule_reference(q, k, v, g, beta, initial_state, output_final_state, scale)
    if impl == "chunked":
        return delta_rule_chunked(q, k, v, g, beta, initial_state, output_final_state, scale, chunk_size)
    if impl == "triton":
        return delta_rule_triton(q, k, v, g, beta, initial_state, output_final_state, scale, chunk_size)
    raise ValueError(f'delta rule: impl must be "auto", "reference", "chunked" or "triton", got {impl!r}')
