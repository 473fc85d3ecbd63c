"""Grouped GEMM for mixture-of-experts, and the token permutation around it.

The op: ``x`` ``[N, K]`` holds rows sorted by group (expert), ``w`` ``[E, K, M]``
the stacked expert weights (torchtitan's ``w1_EDF``-style layout), ``counts``
``[E]`` the number of rows of each group (integers, zeros allowed, summing to
N).  Group g owns rows ``s_g = sum(counts[:g])`` to ``e_g = s_g + counts[g]``
and ``y[s_g:e_g] = x[s_g:e_g] @ w[g]``; the result is ``y`` ``[N, M]``, with
the dtype of ``x`` (``x`` and ``w`` must share a dtype).  All faces are
differentiable w.r.t. ``x`` and ``w``; ``dw[g]`` is zero for an empty group.

Three faces:

* ``grouped_mm_reference``: a Python loop of per-expert matmuls.  Obviously
  right, any dtype/device; plain autograd.  Reads ``counts`` on the host.
* ``grouped_mm_torch``: ``torch._grouped_mm(x, w, offs=cumsum(counts).int32)``
  in an autograd Function whose backward makes the incoming gradient
  contiguous (``_grouped_mm``'s backward rejects zero-stride gradients such as
  the one from ``y.sum().backward()``) and computes dX with the 2D x 3D form
  and dW with the 2D x 2D form.  Facts checked on torch 2.13 CPU: fp32 / bf16 /
  fp16 work (fp64 does not: we fall back to the reference loop); offsets must
  be int32 cumulative ends; empty groups and N == 0 work forward and backward
  (dW of an empty group is zero); each row stride must be a multiple of 16
  bytes (K and M multiples of 4 in fp32, of 8 in bf16/fp16) -- otherwise we
  zero-pad K / M to the next multiple and slice, which stays exact; rows past
  ``offs[-1]`` are left uninitialised, so ``sum(counts) == N`` matters (checked
  whenever ``counts`` lives on the CPU).  On CUDA we assume bf16 only (its
  documented fast path) and use the reference loop for other dtypes.
* ``grouped_mm_triton``: our persistent Triton kernels (see
  ``_triton_grouped_gemm``): one launch for the forward, one for dX, one for
  dW, each a fixed grid of programs looping over (group, tile) work items, with
  masks for ragged groups and for K / M that are not block multiples.  Runs on
  CUDA, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before the
  kernels were first imported (slow: tests only).  No device->host sync.

``grouped_mm(x, w, counts, impl="auto")`` dispatches.  ``"auto"`` picks, in
order: Triton when ``x`` is fp32/bf16/fp16 on CUDA and triton imports (one
persistent launch for all experts, no sync, our own backward kernels);
``torch._grouped_mm`` where the device/dtype allow it (CPU fp32/bf16/fp16,
CUDA bf16), since it is a single native call; otherwise the reference loop.
``"reference"``, ``"torch"`` and ``"triton"`` force a face (``"torch"`` still
falls back to the loop for dtypes it cannot run).

Token permutation (top-k routing, torchtitan style):

* ``dispatch(expert_idx [N, k]) -> (order, counts, inverse)``: a stable sort
  of the N*k (token, slot) assignments by expert, so ties keep token order.
  ``order`` ``[N*k]`` indexes the flattened assignments, ``counts`` ``[E]`` the
  rows per expert, ``inverse`` ``[N, k]`` the sorted row of each assignment.
* ``gather_sorted(x, order, k)``: ``x[order // k]``, the expert-sorted input.
* ``combine(y_sorted, order, weights [N, k], N)``: ``out[t] = sum_j
  weights[t, j] * y_sorted[inverse[t, j]]``, computed as a gather plus a sum
  over k (deterministic, no atomics), differentiable w.r.t. ``y_sorted`` and
  ``weights``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from archc.kernels import registry
from archc.kernels.registry import triton_available

__all__ = [
    "grouped_mm", "grouped_mm_reference", "grouped_mm_torch", "grouped_mm_triton",
    "triton_available", "TritonConfig", "dispatch", "gather_sorted", "combine",
]

Impl = Literal["auto", "reference", "torch", "triton"]

_TORCH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TORCH_CUDA_DTYPES = (torch.bfloat16,)


# --------------------------------------------------------------------------- checks


def _check(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 3:
        raise ValueError(f"grouped_mm wants x [N, K] and w [E, K, M], got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x has K={x.shape[1]} but w has K={w.shape[1]}")
    if counts.dim() != 1 or counts.shape[0] != w.shape[0]:
        raise ValueError(f"grouped_mm: counts must be [E={w.shape[0]}], got {tuple(counts.shape)}")
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise TypeError(f"grouped_mm: counts must be integers, got {counts.dtype}")
    if x.dtype != w.dtype:
        raise TypeError(f"grouped_mm: x and w must share a dtype, got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"grouped_mm: x on {x.device} but w on {w.device}")
    if counts.device.type == "cpu":  # free to check; on an accelerator it would cost a sync
        _check_counts_values(counts, x.shape[0])


def _check_counts_values(counts: torch.Tensor, n: int) -> None:
    if counts.numel() and bool((counts < 0).any()):
        raise ValueError("grouped_mm: counts must be non-negative")
    total = int(counts.sum()) if counts.numel() else 0
    if total != n:
        raise ValueError(f"grouped_mm: counts sum to {total} but x has {n} rows")


def _offsets(counts: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 cumulative end offsets, on `device` (what both fast paths take)."""
    return torch.cumsum(counts.to(device=device, dtype=torch.int32), 0, dtype=torch.int32)


# --------------------------------------------------------------------------- reference


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """y[s_g:e_g] = x[s_g:e_g] @ w[g], one matmul per expert (host reads counts)."""
    _check(x, w, counts)
    sizes = [int(c) for c in counts.tolist()]
    if counts.device.type != "cpu":
        _check_counts_values(counts.cpu(), x.shape[0])
    outs, start = [], 0
    for g, size in enumerate(sizes):
        outs.append(x[start:start + size] @ w[g])  # empty slice: [0, M], zero dW[g]
        start += size
    if not outs:  # E == 0 (then N == 0)
        return x.new_zeros((0, w.shape[2]))
    return torch.cat(outs, 0)


# --------------------------------------------------------------------------- torch._grouped_mm


class _GroupedMmTorch(torch.autograd.Function):
    """torch._grouped_mm with a backward that tolerates any gradient layout.

    Inputs must already satisfy _grouped_mm's alignment (see _aligned)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()  # zero strides ("Invalid strides/sizes") or odd strides otherwise
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch._grouped_mm(dy, w.transpose(-2, -1), offs=offs)  # [N, K]
        if ctx.needs_input_grad[1]:
            dw = torch._grouped_mm(x.t(), dy, offs=offs)  # 2D x 2D, groups along N: [E, K, M]
        return dx, dw, None


def _row_align(dtype: torch.dtype) -> int:
    """Elements per 16 bytes: _grouped_mm wants row strides that are multiples of this."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


def _aligned(t: torch.Tensor) -> bool:
    """Unit stride in one of the last two dims, the other strides 16-byte multiples."""
    a = _row_align(t.dtype)
    strides = list(t.stride())
    if t.shape[-1] <= 1 or strides[-1] == 1:
        unit = t.dim() - 1
    elif t.shape[-2] <= 1 or strides[-2] == 1:
        unit = t.dim() - 2
    else:
        return False
    return all(s % a == 0 for i, s in enumerate(strides) if i != unit and t.shape[i] > 1)


def _torch_supports(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return x.dtype in _TORCH_CPU_DTYPES
    if x.device.type == "cuda":
        return x.dtype in _TORCH_CUDA_DTYPES
    return False


def grouped_mm_torch(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm face: pads K / M to 16-byte rows when needed; falls back
    to the reference loop for device/dtype pairs _grouped_mm lacks (e.g. fp64)."""
    _check(x, w, counts)
    if not _torch_supports(x):
        return grouped_mm_reference(x, w, counts)
    offs = _offsets(counts, x.device)
    n, k = x.shape
    m = w.shape[2]
    a = _row_align(x.dtype)
    kp, mp = -(-k // a) * a, -(-m // a) * a
    if kp != k or mp != m:  # zero padding keeps the product exact; slicing undoes it
        xp = F.pad(x, (0, kp - k))
        wp = F.pad(w, (0, mp - m, 0, kp - k))
        return _GroupedMmTorch.apply(xp, wp, offs)[:, :m].contiguous()
    x = x if _aligned(x) and x.stride(-1) == 1 else x.contiguous()
    w = w if _aligned(w) else w.contiguous()
    return _GroupedMmTorch.apply(x, w, offs)


# --------------------------------------------------------------------------- Triton


def _triton_kernels():
    # Lazy: @triton.jit reads TRITON_INTERPRET when the kernel module is imported.
    from archc.kernels import _triton_grouped_gemm

    return _triton_grouped_gemm


def _triton_interpreted() -> bool:
    return type(_triton_kernels()._grouped_mm_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class TritonConfig:
    """Block sizes and grid of the Triton kernels.

    block_n / block_m / block_k: row (token), output-column and reduction tiles
    of the forward and dX kernels; block_k / block_m / block_r: the output tile
    ([K, M]) and the row chunk of the dW kernel.  num_programs: the persistent
    grid (None: one per SM on CUDA, 4 under the interpreter)."""

    block_n: int = 64
    block_m: int = 128
    block_k: int = 64
    block_r: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_programs: int | None = None


# Untuned defaults for CUDA (no GPU here to tune on): 16-bit tiles as in common
# Hopper/Ampere GEMM configs; fp32 halves the tile bytes to fit shared memory.
_CUDA_16BIT = TritonConfig(block_n=64, block_m=128, block_k=64, block_r=64, num_warps=4, num_stages=3)
_CUDA_FP32 = TritonConfig(block_n=64, block_m=64, block_k=32, block_r=32, num_warps=4, num_stages=3)
# Interpreter (CPU): the smallest tiles tl.dot accepts, so tests cover many
# partial tiles while staying quick.
_INTERPRET = TritonConfig(block_n=16, block_m=16, block_k=16, block_r=16, num_warps=1, num_stages=1,
                          num_programs=4)


def _default_config(x: torch.Tensor) -> TritonConfig:
    if x.device.type != "cuda":
        return _INTERPRET
    return _CUDA_FP32 if x.dtype == torch.float32 else _CUDA_16BIT


def _num_programs(cfg: TritonConfig, device: torch.device, max_tiles: int) -> int:
    if cfg.num_programs is not None:
        n = cfg.num_programs
    elif device.type == "cuda":
        n = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        n = 4
    return max(1, min(n, max_tiles))


def _precision(dtype: torch.dtype) -> str:
    # fp32 honours torch's matmul precision setting (TF32 only when allowed).
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _launch_options(x: torch.Tensor, cfg: TritonConfig) -> dict:
    return dict(PRECISION=_precision(x.dtype), UPCAST_DOT=_upcast_dot(x), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, enable_fp_fusion=True)  # explicit: silences triton 3.9's warning


def _upcast_dot(x: torch.Tensor) -> bool:
    # triton 3.9's interpreter computes tl.dot on bf16 storage (uint16) as integers.
    return x.device.type != "cuda" and x.dtype != torch.float32


def _check_triton_device(x: torch.Tensor) -> None:
    if not triton_available():
        raise RuntimeError("grouped_mm_triton: triton is not installed")
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu" and _triton_interpreted():
        return
    raise RuntimeError(
        f"grouped_mm_triton: tensors on {x.device} need CUDA, or TRITON_INTERPRET=1 set before "
        "archc.kernels._triton_grouped_gemm is first imported (CPU interpreter)")


def _launch_mm(x: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, cfg: TritonConfig) -> torch.Tensor:
    """y[s_g:e_g] = x[s_g:e_g] @ b[g] for a strided b [E, K, M] (forward and dX)."""
    n, k = x.shape
    e, _, m = b.shape
    y = torch.empty((n, m), dtype=x.dtype, device=x.device)
    if n == 0 or m == 0:
        return y
    if k == 0:
        return y.zero_()
    row_tiles_bound = -(-n // cfg.block_n) + e  # sum_g cdiv(n_g, BN) <= cdiv(N, BN) + E
    grid_n = _num_programs(cfg, x.device, row_tiles_bound * -(-m // cfg.block_m))
    kern = _triton_kernels()._grouped_mm_kernel
    kern[(grid_n,)](
        x, b, y, offs, e, m, k,
        x.stride(0), x.stride(1), b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1), grid_n,
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k,
        **_launch_options(x, cfg),
    )
    return y


def _launch_dw(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, e: int, cfg: TritonConfig,
               dtype: torch.dtype) -> torch.Tensor:
    """dw[g] = x[s_g:e_g]^T @ dy[s_g:e_g], [E, K, M]; zeros for empty groups."""
    n, k = x.shape
    m = dy.shape[1]
    if n == 0 or k == 0 or m == 0 or e == 0:
        return torch.zeros((e, k, m), dtype=dtype, device=x.device)
    dw = torch.empty((e, k, m), dtype=dtype, device=x.device)
    tiles = e * -(-k // cfg.block_k) * -(-m // cfg.block_m)
    grid_n = _num_programs(cfg, x.device, tiles)
    kern = _triton_kernels()._grouped_mm_dw_kernel
    kern[(grid_n,)](
        x, dy, dw, offs, e, k, m,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2), grid_n,
        BLOCK_K=cfg.block_k, BLOCK_M=cfg.block_m, BLOCK_R=cfg.block_r,
        **_launch_options(x, cfg),
    )
    return dw


class _GroupedMmTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offs, cfg):
        ctx.save_for_backward(x, w, offs)
        ctx.cfg = cfg
        return _launch_mm(x, w, offs, cfg)

    @staticmethod
    def backward(ctx, dy):
        x, w, offs = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _launch_mm(dy, w.transpose(1, 2), offs, ctx.cfg)  # dy_g @ w[g]^T, no copy of w
        if ctx.needs_input_grad[1]:
            dw = _launch_dw(x, dy, offs, w.shape[0], ctx.cfg, w.dtype)
        return dx, dw, None, None


def grouped_mm_triton(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, *,
                      config: TritonConfig | None = None) -> torch.Tensor:
    """Persistent Triton grouped GEMM (forward, dX and dW kernels)."""
    _check(x, w, counts)
    _check_triton_device(x)
    cfg = config or _default_config(x)
    return _GroupedMmTriton.apply(x, w, _offsets(counts, x.device), cfg)


# --------------------------------------------------------------------------- dispatcher


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _auto_impl(x: torch.Tensor, impl: str = "auto") -> str:
    """The face `impl` runs as for `x`: "auto" is Triton for CUDA fp32 / bf16 / fp16 (archc.kernels.registry),
    else torch._grouped_mm where it supports the device and dtype, else the reference loop."""
    return registry.face("grouped_gemm", impl, cuda=x.device.type == "cuda" and x.dtype in _TRITON_DTYPES,
                         fallback="torch" if _torch_supports(x) else "reference")


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, impl: Impl = "auto") -> torch.Tensor:
    """Grouped GEMM ``y[s_g:e_g] = x[s_g:e_g] @ w[g]``; see the module docstring for `impl`."""
    impl = _auto_impl(x, impl)
    fn = {"reference": grouped_mm_reference, "torch": grouped_mm_torch, "triton": grouped_mm_triton}[impl]
    return fn(x, w, counts)


# --------------------------------------------------------------------------- token permutation


def _invert(order: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device, dtype=order.dtype)
    return inverse


def dispatch(expert_idx: torch.Tensor, num_experts: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N*k (token, slot) assignments by expert, stably.

    Returns ``order`` [N*k] (indices into ``expert_idx.reshape(-1)``, so
    ``order // k`` is the token), ``counts`` [E] int64 (rows per expert;
    ``E = num_experts``, or ``max + 1`` -- a host read -- when not given) and
    ``inverse`` [N, k] (the sorted row of each assignment:
    ``inverse.view(-1)[order] == arange(N*k)``)."""
    if expert_idx.dim() != 2:
        raise ValueError(f"dispatch wants expert_idx [N, k], got {tuple(expert_idx.shape)}")
    if expert_idx.dtype.is_floating_point:
        raise TypeError("dispatch: expert_idx must be integer")
    flat = expert_idx.reshape(-1).long()
    if num_experts is None:
        num_experts = int(flat.max()) + 1 if flat.numel() else 0
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # no sync (unlike bincount on CUDA)
    return order, counts, _invert(order).view(expert_idx.shape)


def gather_sorted(x: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Expert-sorted copy of the tokens: row i is ``x[order[i] // k]``; [N*k, D]."""
    return x.index_select(0, torch.div(order, k, rounding_mode="floor"))


def combine(y_sorted: torch.Tensor, order: torch.Tensor, weights: torch.Tensor, n: int, *,
            inverse: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * y_sorted[row of (t, j)]``; [N, M], dtype of y_sorted.

    Computed in the promoted dtype of y_sorted and weights (fp32 gates on bf16
    outputs sum in fp32).  Pass ``inverse`` from `dispatch` to skip inverting
    `order`."""
    if weights.dim() != 2 or weights.shape[0] != n:
        raise ValueError(f"combine wants weights [N={n}, k], got {tuple(weights.shape)}")
    k = weights.shape[1]
    if y_sorted.shape[0] != n * k or order.numel() != n * k:
        raise ValueError(f"combine: y_sorted has {y_sorted.shape[0]} rows and order {order.numel()}, "
                         f"want N*k = {n * k}")
    if inverse is None:
        inverse = _invert(order)
    return _Combine.apply(y_sorted, weights, order, inverse)


class _Combine(torch.autograd.Function):
    """`combine` with a hand-written backward that never materialises [N, k, M] products.

    Forward: gather each token's k rows and take the gate-weighted sum as one
    batched matmul ([N, 1, k] @ [N, k, M]) instead of a broadcast product plus a
    sum.  Backward: ``dy_sorted[r] = w[r] * g[token(r)]`` (one gather of the
    output gradient in sorted order, scaled in place: a permutation's gradient
    needs no zero-filled buffer nor index_add) and ``dweights[r] = <g[token(r)],
    y_sorted[r]>`` (row dot products).  Saves y_sorted, not the gathered rows."""

    @staticmethod
    def forward(ctx, y_sorted, weights, order, inverse):
        n, k = weights.shape
        ct = torch.promote_types(y_sorted.dtype, weights.dtype)
        rows = y_sorted.index_select(0, inverse.reshape(-1)).view(n, k, y_sorted.shape[1]).to(ct)
        out = torch.bmm(weights.to(ct).unsqueeze(1), rows).squeeze(1)
        ctx.save_for_backward(y_sorted, weights, order)
        return out.to(y_sorted.dtype)

    @staticmethod
    def backward(ctx, grad):
        y_sorted, weights, order = ctx.saved_tensors
        k = weights.shape[1]
        ct = torch.promote_types(y_sorted.dtype, weights.dtype)
        g_rows = grad.index_select(0, torch.div(order, k, rounding_mode="floor")).to(ct)  # [N*k, M], fresh
        dy = dweights = None
        if ctx.needs_input_grad[1]:
            dw_sorted = _rowdot(g_rows, y_sorted.to(ct))
            dweights = torch.empty(order.numel(), dtype=ct, device=grad.device).index_copy_(0, order, dw_sorted)
            dweights = dweights.view(weights.shape).to(weights.dtype)
        if ctx.needs_input_grad[0]:
            w_sorted = weights.reshape(-1).index_select(0, order).to(ct)
            dy = g_rows.mul_(w_sorted.unsqueeze(1)).to(y_sorted.dtype)
        return dy, dweights, None, None


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dot product of each row pair, [R, M] x [R, M] -> [R].

    On CPU as a batched matmul: the elementwise product would be a fresh [R, M]
    buffer, and glibc returns blocks over 32 MB to the OS, so each such
    temporary pays page faults on every call (~5x slower at MoE sizes)."""
    if a.device.type == "cpu":
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)
    return (a * b).sum(-1)
