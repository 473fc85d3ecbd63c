"""Causal linear attention (Katharopoulos et al. 2020; docs/algorithms.md §3.1).

Three faces and a dispatcher:

- `linear_attention_reference`: the recurrent form, one token at a time, fp32.
- `linear_attention_chunked`: the chunkwise-parallel form in PyTorch (fp32,
  differentiable by autograd); the path on the CPU.
- `linear_attention_triton`: the numerator runs through the shared Triton
  kernel for the chunked scalar-decay recurrence (`_triton_ssd.py`) with no
  decay (linear attention is SSD with g = 0); the normaliser is a cumsum in
  PyTorch.
- `linear_attention(..., impl="auto")`: triton on CUDA, chunked elsewhere.

The feature map is applied by the caller (e.g. `elu_plus_one`), as in FLA's
kernels. Conventions follow FLA (§5.0): sequence-first q, k [B, T, H, K],
v [B, T, H, V]; the state per head is K×V, [B, H, K, V], returned in fp32;
`scale` multiplies q and defaults to K ** -0.5. Every face returns
(o in v's dtype, final state or None).

Recurrence, per head and token t (q, k already feature-mapped):

    S_t = S_{t-1} + k_t v_t^T           [K, V]
    z_t = z_{t-1} + k_t                 [K]      (only when normalize=True)
    o_t = S_t^T (scale q_t) / (z_t . (scale q_t) + eps)   if normalize
    o_t = S_t^T (scale q_t)                               otherwise

With normalize=True the state is the pair (S [B, H, K, V], z [B, H, K]):
`initial_state` must then be such a pair and the final state is returned as
one, so a continuation from a prompt's final state is exact. With
normalize=False the state is S alone.

Differences from FLA to keep in mind (§5.1): FLA's `chunk_linear_attn`
normalises with eps = 1e-10 and *ignores* the initial state in the
denominator (no z state); FLA's naive functions default to normalize=False.
Here eps defaults to 1e-6 (Katharopoulos' code) and is added to the
denominator: o = num / (den + eps). With normalisation `scale` cancels up to eps.

Chunked form (chunk of C tokens, Q = scale * Q_i, S and z entering chunk i):

    O_i = (Q S + tril(Q K^T) V) / (Q z + rowsum(tril(Q K^T)) + eps)
    S  <- S + K^T V,   z <- z + sum_rows K

With no decay the inter-chunk recurrence is a plain (exclusive) prefix sum
over the chunks' K^T V, so every chunk runs in parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archc.kernels import registry

__all__ = [
    "elu_plus_one",
    "linear_attention",
    "linear_attention_reference",
    "linear_attention_chunked",
    "linear_attention_triton",
]

DEFAULT_EPS = 1e-6


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 > 0, the feature map of Katharopoulos et al."""
    return F.elu(x) + 1.0


# ----------------------------------------------------------------------------- checks


def _check(q, k, v, initial_state, normalize):
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "linear attention: expected q, k [B, T, H, K] and v [B, T, H, V] (sequence-first, like FLA), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    Bsz, _, H, K = q.shape
    V = v.shape[-1]
    if initial_state is None:
        return None, None
    if normalize:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError("linear attention: with normalize=True, initial_state must be the pair (S, z) "
                             "returned as the final state (S [B, H, K, V], z [B, H, K])")
        S0, z0 = initial_state
        if z0.shape != (Bsz, H, K):
            raise ValueError(f"linear attention: z must be [B, H, K] = {(Bsz, H, K)}, got {tuple(z0.shape)}")
    else:
        if not isinstance(initial_state, torch.Tensor):
            raise ValueError("linear attention: with normalize=False, initial_state is S [B, H, K, V]")
        S0, z0 = initial_state, None
    if S0.shape != (Bsz, H, K, V):
        raise ValueError(f"linear attention: S must be [B, H, K, V] = {(Bsz, H, K, V)}, got {tuple(S0.shape)}")
    return S0, z0


def _default_scale(scale, K):
    return K ** -0.5 if scale is None else float(scale)


def _final(S, z, normalize, output_final_state):
    if not output_final_state:
        return None
    return (S, z) if normalize else S


# ----------------------------------------------------------------------------- reference


def linear_attention_reference(
    q, k, v, initial_state=None, output_final_state=False, normalize=True, eps=DEFAULT_EPS, scale=None
):
    """Token-by-token recurrence in fp32; returns (o [B, T, H, V] in v's dtype, final state or None)."""
    S0, z0 = _check(q, k, v, initial_state, normalize)
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    qf = q.float() * _default_scale(scale, K)
    kf, vf = k.float(), v.float()
    S = q.new_zeros(Bsz, H, K, V, dtype=torch.float32) if S0 is None else S0.float()
    z = q.new_zeros(Bsz, H, K, dtype=torch.float32) if z0 is None else z0.float()
    outs = []
    # Per-token slices taken once with unbind: indexing x[:, t] inside the loop would make the
    # backward write a full-size zero gradient per token (quadratic in T).
    for q_t, k_t, v_t in zip(qf.unbind(1), kf.unbind(1), vf.unbind(1)):
        S = S + k_t[..., :, None] * v_t[..., None, :]
        o = torch.einsum("bhk,bhkv->bhv", q_t, S)
        if normalize:
            z = z + k_t
            o = o / ((q_t * z).sum(-1, keepdim=True) + eps)
        outs.append(o)
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(Bsz, 0, H, V, dtype=torch.float32)
    return o.to(v.dtype), _final(S, z, normalize, output_final_state)


# ----------------------------------------------------------------------------- chunked


def linear_attention_chunked(
    q, k, v, initial_state=None, output_final_state=False, normalize=True, eps=DEFAULT_EPS, scale=None,
    chunk_size: int = 64,
):
    """Chunkwise-parallel form in fp32 (any T; padded internally); same returns as the reference."""
    S0, z0 = _check(q, k, v, initial_state, normalize)
    Bsz, T, H, K = q.shape
    V = v.shape[-1]
    C = int(chunk_size)
    N = -(-T // C)
    pad = N * C - T  # padded tokens have q = k = v = 0: the state is untouched, the outputs are dropped
    qf = F.pad(q.float() * _default_scale(scale, K), (0, 0, 0, 0, 0, pad)).view(Bsz, N, C, H, K)
    kf = F.pad(k.float(), (0, 0, 0, 0, 0, pad)).view(Bsz, N, C, H, K)
    vf = F.pad(v.float(), (0, 0, 0, 0, 0, pad)).view(Bsz, N, C, H, V)

    kv = torch.einsum("bnchk,bnchv->bnhkv", kf, vf)  # each chunk's contribution to S
    S_in = torch.cat([torch.zeros_like(kv[:, :1]), kv[:, :-1]], dim=1).cumsum(1)  # exclusive prefix sum
    if S0 is not None:
        S_in = S_in + S0.float()[:, None]
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    attn = torch.einsum("bnihk,bnjhk->bnhij", qf, kf).masked_fill(~mask, 0.0)
    o = torch.einsum("bnihk,bnhkv->bnihv", qf, S_in) + torch.einsum("bnhij,bnjhv->bnihv", attn, vf)
    S_T = S_in[:, -1] + kv[:, -1] if N else (S0.float() if S0 is not None else kv.new_zeros(Bsz, H, K, V))
    z_T = None
    if normalize:
        ks = kf.sum(2)  # [B, N, H, K]
        z_in = torch.cat([torch.zeros_like(ks[:, :1]), ks[:, :-1]], dim=1).cumsum(1)
        if z0 is not None:
            z_in = z_in + z0.float()[:, None]
        den = torch.einsum("bnihk,bnhk->bnih", qf, z_in) + attn.sum(-1).transpose(-1, -2)
        o = o / (den + eps)[..., None]
        z_T = z_in[:, -1] + ks[:, -1] if N else (z0.float() if z0 is not None else ks.new_zeros(Bsz, H, K))
    o = o.reshape(Bsz, N * C, H, V)[:, :T]
    return o.to(v.dtype), _final(S_T, z_T, normalize, output_final_state)


# ----------------------------------------------------------------------------- triton


def linear_attention_triton(
    q, k, v, initial_state=None, output_final_state=False, normalize=True, eps=DEFAULT_EPS, scale=None,
    chunk_size: int = 64,
):
    """Numerator S_t^T (scale q_t) in Triton (`chunk_scalar_decay` with g=None, fp32 output);
    normaliser z_t = z_0 + cumsum(k), den = (scale q_t) . z_t in PyTorch (elementwise + cumsum)."""
    from archc.kernels._triton_ssd import chunk_scalar_decay

    S0, z0 = _check(q, k, v, initial_state, normalize)
    s = _default_scale(scale, q.shape[-1])
    num, S_T = chunk_scalar_decay(
        q, k, v, None, scale=s, initial_state=S0, output_final_state=output_final_state,
        chunk_size=chunk_size, out_dtype=torch.float32 if normalize else None,
    )
    if not normalize:
        return num, _final(S_T, None, False, output_final_state)
    zc = k.float().cumsum(1)
    if z0 is not None:
        zc = zc + z0.float()[:, None]
    den = (q.float() * zc).sum(-1, keepdim=True) * s
    o = (num / (den + eps)).to(v.dtype)
    z_T = (zc[:, -1] if q.shape[1] else (z0.float() if z0 is not None else zc.new_zeros(q.shape[0], *q.shape[2:])))
    return o, _final(S_T, z_T, True, output_final_state)


# ----------------------------------------------------------------------------- dispatcher


def linear_attention(
    q, k, v, initial_state=None, output_final_state=False, normalize=True, eps=DEFAULT_EPS, scale=None,
    chunk_size: int = 64, impl: str = "auto",
):
    """Causal linear attention; returns (o, final state or None) — state (S, z) when normalize, else S.

    impl: "auto" (triton on CUDA when triton is installed and the head dim fits its limits, chunked otherwise:
    archc.kernels.registry), "reference", "chunked", "triton".
    """
    impl = registry.face("linear_attention", impl, cuda=q.is_cuda, head_dim=q.shape[-1])
    if impl == "reference":
        return linear_attention_reference(q, k, v, initial_state, output_final_state, normalize, eps, scale)
    fn = linear_attention_chunked if impl == "chunked" else linear_attention_triton
    return fn(q, k, v, initial_state, output_final_state, normalize, eps, scale, chunk_size)
