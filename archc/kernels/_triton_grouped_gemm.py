"""Triton kernels for the grouped GEMM in :mod:`archc.kernels.grouped_gemm`.

Import this module only through ``grouped_gemm`` (which imports it lazily):
whether ``@triton.jit`` builds compiled or interpreted kernels is decided when
the decorators run, i.e. from ``TRITON_INTERPRET`` at *import* time.

Two persistent kernels, each launched once for all groups with a fixed grid of
``num_progs`` programs (one per SM on CUDA) that stride over the work items.
``num_progs`` is a runtime argument, not a constexpr, so that clamping it to
the amount of work does not trigger recompilation:

* ``_grouped_mm_kernel``: ``y[s_g:e_g] = x[s_g:e_g] @ b[g]`` for every group g,
  with ``b`` any strided ``[E, K, M]`` view.  The forward pass uses ``b = w``;
  the dX pass uses ``b = w.transpose(1, 2)`` (a stride swap, no copy).  Work
  items are (group, row-tile, column-tile); because the number of row tiles of
  a group depends on its (ragged) size, each program walks the groups in order,
  reading the cumulative ends ``offs`` from device memory, and handles the
  items of each group whose global index is ``pid (mod num_progs)`` -- the
  scheme of the Triton grouped-GEMM tutorial, so no host-side schedule and no
  device->host sync are needed.  Within a group, row tiles vary fastest, so
  programs running at the same time share a column block of ``b[g]``.
* ``_grouped_mm_dw_kernel``: ``dw[g] = x[s_g:e_g]^T @ dy[s_g:e_g]`` ([E, K, M]).
  Work items are (group, K-tile, M-tile): a static count ``E * tiles``; each
  item reduces over its group's rows in ``BLOCK_R`` chunks (zero chunks for an
  empty group, which therefore gets zeros).

Masks handle ragged group sizes and K / M that are not multiples of the block.
Accumulation is fp32; results are stored in the output's dtype.
``UPCAST_DOT`` converts the dot operands to fp32 first: set for bf16 / fp16
under ``TRITON_INTERPRET=1``, whose ``tl.dot`` (triton 3.9) runs ``np.matmul``
on bf16's uint16 storage and returns garbage.  The products of 16-bit floats
are exact in fp32, so this matches tensor-core semantics.  Row and
group offsets are computed in int64 so tensors over 2**31 elements index
correctly.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _grouped_mm_kernel(
    x_ptr, b_ptr, y_ptr, offs_ptr,
    E, M, K,
    stride_xn, stride_xk,
    stride_be, stride_bk, stride_bm,
    stride_yn, stride_ym,
    num_progs,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # BLOCK_N: rows (tokens), BLOCK_M: output columns, BLOCK_K: reduction.
    pid = tl.program_id(0)
    n_col_tiles = tl.cdiv(M, BLOCK_M)
    tile = pid
    tiles_before = 0
    for g in range(E):
        start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        end = tl.load(offs_ptr + g)
        n_row_tiles = tl.cdiv(end - start, BLOCK_N)
        n_tiles = n_row_tiles * n_col_tiles
        while tile >= tiles_before and tile < tiles_before + n_tiles:
            local = tile - tiles_before
            t_row = local % n_row_tiles
            t_col = local // n_row_tiles
            rows = start + t_row * BLOCK_N + tl.arange(0, BLOCK_N)
            cols = t_col * BLOCK_M + tl.arange(0, BLOCK_M)
            ks = tl.arange(0, BLOCK_K)
            mask_r = rows < end
            mask_c = cols < M
            rows64 = rows.to(tl.int64)
            g64 = tl.cast(g, tl.int64)
            a_ptrs = x_ptr + rows64[:, None] * stride_xn + ks[None, :] * stride_xk
            b_ptrs = (b_ptr + g64 * stride_be
                      + ks[:, None] * stride_bk + cols[None, :] * stride_bm)
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                mask_k = ks < K - k0
                a = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=mask_k[:, None] & mask_c[None, :], other=0.0)
                if UPCAST_DOT:  # interpreter: its tl.dot multiplies bf16 bit patterns
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K * stride_xk
                b_ptrs += BLOCK_K * stride_bk
            y_ptrs = y_ptr + rows64[:, None] * stride_yn + cols[None, :] * stride_ym
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty),
                     mask=mask_r[:, None] & mask_c[None, :])
            tile += num_progs
        tiles_before += n_tiles


@triton.jit
def _grouped_mm_dw_kernel(
    x_ptr, dy_ptr, dw_ptr, offs_ptr,
    E, K, M,
    stride_xn, stride_xk,
    stride_dn, stride_dm,
    stride_we, stride_wk, stride_wm,
    num_progs,
    BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    n_k_tiles = tl.cdiv(K, BLOCK_K)
    n_m_tiles = tl.cdiv(M, BLOCK_M)
    per_group = n_k_tiles * n_m_tiles
    total = E * per_group
    for tile in range(pid, total, num_progs):
        g = tile // per_group
        local = tile % per_group
        t_k = local % n_k_tiles
        t_m = local // n_k_tiles
        start = tl.load(offs_ptr + g - 1, mask=g > 0, other=0)
        end = tl.load(offs_ptr + g)
        ks = t_k * BLOCK_K + tl.arange(0, BLOCK_K)
        cols = t_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_k = ks < K
        mask_c = cols < M
        acc = tl.zeros((BLOCK_K, BLOCK_M), dtype=tl.float32)
        for r0 in range(start, end, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            mask_r = rows < end
            rows64 = rows.to(tl.int64)
            # x_g^T tile [BLOCK_K, BLOCK_R], loaded transposed through strides.
            a = tl.load(x_ptr + rows64[None, :] * stride_xn + ks[:, None] * stride_xk,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0)
            b = tl.load(dy_ptr + rows64[:, None] * stride_dn + cols[None, :] * stride_dm,
                        mask=mask_r[:, None] & mask_c[None, :], other=0.0)
            if UPCAST_DOT:  # interpreter: its tl.dot multiplies bf16 bit patterns
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        g64 = tl.cast(g, tl.int64)
        w_ptrs = (dw_ptr + g64 * stride_we
                  + ks[:, None] * stride_wk + cols[None, :] * stride_wm)
        tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty),
                 mask=mask_k[:, None] & mask_c[None, :])
