"""Mamba-2 state-space duality (SSD) with a scalar decay per head (docs/algorithms.md §3.2).

Three faces and a dispatcher:

- `ssd_reference`: the per-token recurrence in fp32.
- `ssd_chunked`: the segsum-based chunked algorithm of the Mamba-2 paper
  ("ssd_minimal_discrete") in PyTorch, fp32, differentiable by autograd; the
  path on the CPU.
- `ssd_triton`: the shared Triton kernel for the chunked scalar-decay
  recurrence (`_triton_ssd.py`) with q = C, k = B, v = dt * x, g = dt * A.
- `ssd(..., impl="auto")`: triton on CUDA, chunked elsewhere.

Shapes (Mamba's `mamba_chunk_scan_combined` conventions, sequence-first):

    x  [B, T, H, P]      dt [B, T, H]       A [H]  (negative; A = -exp(A_log))
    B  [B, T, G, N]      C  [B, T, G, N]    (G groups, H % G == 0; head h uses
                                             group h // (H // G); [B, T, N] means G = 1)
    D  [H] or [H, P] or None
    state [B, H, P, N] (fp32), y [B, T, H, P] in x's dtype

`dt` is the step Delta_t as used by the recurrence. Mamba2 computes it as
softplus(dt_raw + dt_bias); pass `dt_bias=` and/or `dt_softplus=True` to
have that done here (in fp32, before every face).

Recurrence (zero-order-hold discretisation of A, Euler for B), per head:

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T     h_t [P, N]
    y_t = h_t C_t + D * x_t

which is scalar-decay linear attention with q = C, k = B, v = dt x,
g = dt A, scale = 1 and the state transposed (S = h^T, [N, P]).

Chunked SSD (chunk of L tokens; a_t = dt_t A, X_t = dt_t x_t; cumulative
a_cum inside each chunk; segsum(a)_ij = sum_{j < m <= i} a_m for i >= j,
-inf above the diagonal, computed by masked cumsums, not by differences):

    1. Y_diag = (C B^T * exp(segsum(a))) X                    within chunks
    2. states_c = sum_s exp(a_cum_end - a_cum_s) X_s B_s^T    each chunk's own contribution
    3. inter-chunk recurrence over the chunk-end states with chunk decays
       exp(a_cum_end), done as one matmul with exp(segsum) over the chunk axis
       (prepending the initial state); the last entry is the final state
    4. Y_off = exp(a_cum) * (h_entering C)                  the carried state's part

T is padded to a multiple of L with dt = 0 (decay exp(0) = 1, input 0), which
leaves the state unchanged, so the final state is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from archc.kernels import registry

__all__ = ["ssd", "ssd_reference", "ssd_chunked", "ssd_triton", "segsum"]


# ----------------------------------------------------------------------------- helpers


def _prepare(x, dt, A, B, C, D, initial_state, dt_bias, dt_softplus):
    """Validate, apply dt_bias/softplus, bring B and C to [B, T, G, N]."""
    if x.dim() != 4:
        raise ValueError(f"ssd: x must be [B, T, H, P], got {tuple(x.shape)}")
    Bsz, T, H, P = x.shape
    if dt.shape != (Bsz, T, H):
        raise ValueError(f"ssd: dt must be [B, T, H] = {(Bsz, T, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,):
        raise ValueError(f"ssd: A must be [H] = {(H,)}, got {tuple(A.shape)}")
    if B.dim() == 3:
        B = B.unsqueeze(2)
    if C.dim() == 3:
        C = C.unsqueeze(2)
    if B.dim() != 4 or B.shape[:2] != (Bsz, T) or C.shape != B.shape:
        raise ValueError(f"ssd: B and C must both be [B, T, G, N] (or [B, T, N]), got {tuple(B.shape)}, "
                         f"{tuple(C.shape)}")
    G, N = B.shape[2], B.shape[3]
    if H % G:
        raise ValueError(f"ssd: heads ({H}) must be a multiple of groups ({G})")
    if D is not None and D.shape not in ((H,), (H, P)):
        raise ValueError(f"ssd: D must be [H] or [H, P], got {tuple(D.shape)}")
    if initial_state is not None and initial_state.shape != (Bsz, H, P, N):
        raise ValueError(f"ssd: initial_state must be [B, H, P, N] = {(Bsz, H, P, N)}, "
                         f"got {tuple(initial_state.shape)}")
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    return dt, B, C


def _heads(BC: torch.Tensor, H: int) -> torch.Tensor:
    """[B, T, G, N] -> [B, T, H, N] (head h reads group h // (H // G))."""
    return BC.repeat_interleave(H // BC.shape[2], dim=2)


def _skip(y, x, D):
    if D is None:
        return y
    Df = D.float()
    return y + x.float() * (Df[:, None] if Df.dim() == 1 else Df)


def segsum(a: torch.Tensor) -> torch.Tensor:
    """Stable segment sum: out[..., i, j] = sum_{j < m <= i} a[..., m] for i >= j, -inf for i < j."""
    L = a.shape[-1]
    a = a[..., None].expand(*a.shape, L)  # [..., m, j] = a_m
    strict = torch.ones(L, L, dtype=torch.bool, device=a.device).tril(-1)
    a = a.masked_fill(~strict, 0.0)  # keep a_m for m > j
    out = a.cumsum(dim=-2)  # [..., i, j] = sum_{j < m <= i} a_m
    return out.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=a.device).tril(), float("-inf"))


# ----------------------------------------------------------------------------- reference


def ssd_reference(
    x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, dt_bias=None, dt_softplus=False
):
    """Per-token recurrence in fp32; returns (y [B, T, H, P] in x's dtype, final state [B, H, P, N] fp32 or None)."""
    dt, B, C = _prepare(x, dt, A, B, C, D, initial_state, dt_bias, dt_softplus)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    xf, Af = x.float(), A.float()
    Bh, Ch = _heads(B.float(), H), _heads(C.float(), H)
    h = x.new_zeros(Bsz, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys = []
    # Per-token slices taken once with unbind: indexing x[:, t] inside the loop would make the
    # backward write a full-size zero gradient per token (quadratic in T).
    for dt_t, x_t, B_t, C_t in zip(*(z.unbind(1) for z in (dt, xf, Bh, Ch))):
        decay = torch.exp(dt_t * Af)  # [B, H]
        h = decay[..., None, None] * h + (dt_t[..., None] * x_t)[..., None] * B_t[:, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, C_t))
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(Bsz, 0, H, P)
    return _skip(y, xf, D).to(x.dtype), (h if output_final_state else None)


# ----------------------------------------------------------------------------- chunked


def ssd_chunked(
    x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, chunk_size: int = 64,
    dt_bias=None, dt_softplus=False,
):
    """Segsum-based chunked SSD (Mamba-2 "minimal" algorithm) in fp32; same returns as the reference."""
    dt, B, C = _prepare(x, dt, A, B, C, D, initial_state, dt_bias, dt_softplus)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    L = int(chunk_size)
    nc = -(-T // L)
    pad = nc * L - T
    xf = x.float()
    X = F.pad(xf * dt[..., None], (0, 0, 0, 0, 0, pad)).view(Bsz, nc, L, H, P)
    a = F.pad(dt * A.float(), (0, 0, 0, pad)).view(Bsz, nc, L, H).permute(0, 3, 1, 2)  # [B, H, c, l]
    Bc = F.pad(_heads(B.float(), H), (0, 0, 0, 0, 0, pad)).view(Bsz, nc, L, H, N)
    Cc = F.pad(_heads(C.float(), H), (0, 0, 0, 0, 0, pad)).view(Bsz, nc, L, H, N)

    a_cum = a.cumsum(-1)  # [B, H, c, l]
    # 1. within chunks
    Lmat = torch.exp(segsum(a))  # [B, H, c, l, s]
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", Cc, Bc, Lmat, X)
    # 2. each chunk's contribution to the state at its end
    decay_states = torch.exp(a_cum[..., -1:] - a_cum)  # [B, H, c, l]
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bc, decay_states, X)
    # 3. inter-chunk recurrence
    h0 = x.new_zeros(Bsz, 1, H, P, N, dtype=torch.float32) if initial_state is None else initial_state.float()[:, None]
    states = torch.cat([h0, states], dim=1)  # [B, c+1, H, P, N]
    decay_chunk = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))  # [B, H, c+1, c+1]
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. the carried state's contribution to each output
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", Cc, states, torch.exp(a_cum))
    y = (y_diag + y_off).reshape(Bsz, nc * L, H, P)[:, :T]
    return _skip(y, xf, D).to(x.dtype), (final_state if output_final_state else None)


# ----------------------------------------------------------------------------- triton


def ssd_triton(
    x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, chunk_size: int = 64,
    dt_bias=None, dt_softplus=False,
):
    """SSD through the Triton scalar-decay kernel (`_triton_ssd.chunk_scalar_decay`).

    In PyTorch around it: dt preprocessing, v = dt * x (in x's dtype), g = dt * A,
    the state transpose ([B, H, P, N] <-> the kernel's [B, H, N, P]) and y += D * x.
    B/C groups are read by the kernel directly (no expansion to H heads).
    """
    from archc.kernels._triton_ssd import chunk_scalar_decay

    dt, B, C = _prepare(x, dt, A, B, C, D, initial_state, dt_bias, dt_softplus)
    v = (x.float() * dt[..., None]).to(x.dtype)
    g = dt * A.float()
    h0 = None if initial_state is None else initial_state.float().transpose(-1, -2)
    y, hT = chunk_scalar_decay(
        C.to(x.dtype), B.to(x.dtype), v, g, scale=1.0, initial_state=h0, output_final_state=output_final_state,
        chunk_size=chunk_size, out_dtype=torch.float32,
    )
    y = _skip(y, x, D).to(x.dtype)
    return y, (hT.transpose(-1, -2) if output_final_state else None)


# ----------------------------------------------------------------------------- dispatcher


def ssd(
    x, dt, A, B, C, D=None, initial_state=None, output_final_state=False, chunk_size: int = 64,
    dt_bias=None, dt_softplus=False, impl: str = "auto",
):
    """Mamba-2 SSD; returns (y [B, T, H, P], final state [B, H, P, N] fp32 or None).

    impl: "auto" (triton on CUDA when triton is installed and the state dim fits its limits, chunked otherwise:
    archc.kernels.registry), "reference", "chunked", "triton".
    """
    impl = registry.face("ssd", impl, cuda=x.is_cuda, state=B.shape[-1])
    if impl == "reference":
        return ssd_reference(x, dt, A, B, C, D, initial_state, output_final_state, dt_bias, dt_softplus)
    fn = ssd_chunked if impl == "chunked" else ssd_triton
    return fn(x, dt, A, B, C, D, initial_state, output_final_state, chunk_size, dt_bias, dt_softplus)
