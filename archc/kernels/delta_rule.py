"""The gated delta rule, shared by Gated DeltaNet (GDN) and Kimi Delta Attention (KDA).

GDN is KDA with one decay per head instead of one per key channel, so both run
through the same three faces (docs/algorithms.md §3.3, §3.4; FLA conventions §3.0):

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

Numerics: no exponent can overflow for any g <= 0. For per-channel decay the
C×C "decayed Gram" matrices A and P cannot simply be one matmul of exp(gamma)Q by
exp(-gamma)K (that overflows once a chunk decays by more than ~88 nats). With an
anchor token a (a block's first), exp(gamma_i - gamma_j) = exp(gamma_i - gamma_a)
exp(gamma_a - gamma_j), both factors within exp(+-span), span = how far the decay
falls inside the block. The PyTorch path makes a chunk one matmul when its span is
at most FACTOR_SPAN nats; steeper chunks are cut into sub-chunks of 16 (FLA's
secondary chunking): blocks below the diagonal anchor at the row sub-chunk's
first token, so both factors are <= 1 and each block is a matmul; diagonal blocks
are matmuls again up to FACTOR_SPAN, and computed pairwise (exactly, with a
[16, 16, K] decay tensor) only beyond it. A and P share one pass. The Triton
kernels build them one column at a time with masked exponents (see
`_triton_delta_rule.py`).

Padding: T is padded up to a multiple of C with q = k = v = g = beta = 0.
Such tokens leave the state untouched (decay exp(0) = 1, k = 0) and their
outputs are dropped, so no other masking is needed.
"""

from __future__ import annotations

import os

import torch

from archc.kernels import registry
from archc.kernels.delta_rule_chunks import _chunk_intra, _from_chunks, _to_chunks

__all__ = [
    "delta_rule",
    "delta_rule_reference",
    "delta_rule_chunked",
    "delta_rule_triton",
    "check_delta_rule_inputs",
]

CHUNK_SIZES = (16, 32, 64)


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
    # Per-token slices taken once with unbind: indexing x[:, t] inside the loop would make the
    # backward write a full-size zero gradient per token (quadratic in T).
    steps = zip(*(x.unbind(1) for x in (q * scale, k, v, g.exp(), beta)))
    for q_t, k_t, v_t, decay_t, beta_t in steps:  # q_t [B, H, K], decay_t [B, H, K or 1], beta_t [B, H]
        q_t, k_t, v_t = q_t[..., None, :], k_t[..., None, :], v_t[..., None, :]  # [B, H, 1, K|V]
        S = S * decay_t[..., None]  # decay the rows (key channels)
        u_t = beta_t[..., None, None] * (v_t - k_t @ S)  # beta (v_t - S^T k_t)
        S = S + k_t.mT * u_t  # + k_t u_t^T
        outs.append(q_t @ S)  # (S^T q_t)^T
    o = torch.cat(outs, dim=2).transpose(1, 2).to(out_dtype)  # [B, H, T, V] -> [B, T, H, V]
    return o, (S if output_final_state else None)


# ----------------------------------------------------------------------------- chunked


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
    states, v_news = [], []
    # Unbind once: indexing [:, :, n] inside the loop makes each backward write a full-size
    # zero tensor per chunk, which is quadratic in the number of chunks.
    chunks = zip(*(t.unbind(2) for t in (U, W, e, Kd)))
    for Un, Wn, en, Kn in chunks:  # inter-chunk recurrence: the only sequential part
        v_new = Un - Wn @ S
        states.append(S)
        v_news.append(v_new)
        S = en * S + Kn.mT @ v_new
    # The outputs need only each chunk's entering state and errors: one batched matmul for all chunks.
    o = Qg @ torch.stack(states, dim=2) + P @ torch.stack(v_news, dim=2)
    o = _from_chunks(o, T).to(v.dtype)
    return o, (S if output_final_state else None)


# ----------------------------------------------------------------------------- triton


def delta_rule_triton(
    q, k, v, g, beta, initial_state=None, output_final_state=False, scale=None, chunk_size: int = 64
):
    """Chunked gated delta rule through Triton kernels (see `_triton_delta_rule.py` for what runs where)."""
    per_head = check_delta_rule_inputs(q, k, v, g, beta, initial_state)
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"delta rule: chunk_size must be one of {CHUNK_SIZES}, got {chunk_size}")
    why = registry.head_dims_unfit(K=q.shape[-1], V=v.shape[-1])
    if why:
        raise ValueError(f"delta rule: {why}; use impl='chunked'")
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

    impl: "auto" (triton on CUDA when triton is installed and K, V fit its limits; chunked otherwise:
    archc.kernels.registry), "reference", "chunked", "triton". chunk_size (16, 32 or 64) applies to chunked
    and triton.
    """
    impl = registry.face("delta_rule", impl, cuda=q.is_cuda, head_dim=q.shape[-1], value_dim=v.shape[-1])
    if impl == "reference":
        return delta_rule_reference(q, k, v, g, beta, initial_state, output_final_state, scale)
    fn = delta_rule_chunked if impl == "chunked" else delta_rule_triton
    return fn(q, k, v, g, beta, initial_state, output_final_state, scale, chunk_size)
