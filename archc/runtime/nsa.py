"""What generated Native Sparse Attention (`nsa(...)`) calls: `AF.NSACore` (docs/algorithms.md §2).

The composite lowers to plain linears of the input — the queries, and for each of the three
branches its own keys and values, as in the paper — plus the gate projection and its sigmoid;
this module holds the rest and calls `archc.kernels.nsa.nsa_attention`:

    q                      [B, T, HQ·K]   one set of queries for all three branches
    k_cmp, v_cmp           [B, T, H·K]    full-resolution keys/values the compressor summarises
    k_slc, v_slc           [B, T, H·K]    keys/values of the selected blocks
    k_win, v_win           [B, T, H·K]    keys/values of the sliding window
    g                      [B, T, HQ·3]   sigmoid gates, per query head (cmp, slc, win) — FLA's
                                          layout: `g_proj` to 3·HQ, viewed as [HQ, 3]

RoPE (rotate-half, θ = rope_theta, when `rope`) turns q and every branch's full-resolution keys,
as FLA's NSA layer does on its one q and k; the compressor then summarises rotated keys (FLA's
mean pooling is exactly the mean of rotated keys). Values are not rotated.

Compression, over blocks of `block` tokens with stride `stride` (block i = tokens
[i·stride, i·stride + block)), shared by all KV heads, separately for keys and values:
- `compress="mlp"` (the paper's φ): add a learned intra-block position embedding [block, dim]
  to each token, flatten the block to block·dim, then Linear(block·dim → dim), SiLU,
  Linear(dim → dim). Module names: `k_compress.pos`, `k_compress.fc1`, `k_compress.fc2`.
- `compress="mean"` (the public FLA reference): the mean over the block; no parameters.

The three branches and their gated sum are `nsa_attention`'s; `kernel` is one of "auto"
(Triton selection on CUDA where it tiles the shape, gather elsewhere), "reference", "gather",
"triton", chosen by the compiler's `choose_kernels` pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from archc.kernels.nsa import BRANCHES, KERNELS, compressed_blocks, nsa_attention, nsa_branch
from archc.runtime.decoding import InputHistory
from archc.runtime.rope import RotaryEmbedding

__all__ = ["COMPRESSORS", "BlockCompressor", "NSABranchCore", "NSACore"]

COMPRESSORS = ("mlp", "mean")


def rotate(rope: RotaryEmbedding, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE on two [B, T, heads, dim] tensors at positions 0..T-1 (the module works on [B, heads, T, dim])."""
    a, b = rope(a.transpose(1, 2), b.transpose(1, 2))
    return a.transpose(1, 2), b.transpose(1, 2)


class BlockCompressor(nn.Module):
    """φ: each block of `block` tokens (stride `stride`) of [B, T, H, dim] to one vector: [B, Nc, H, dim]."""

    def __init__(self, dim: int, block: int, stride: int, kind: str = "mlp") -> None:
        super().__init__()
        if kind not in COMPRESSORS:
            raise ValueError(f"compress must be one of {', '.join(COMPRESSORS)}, got {kind!r}")
        self.dim, self.block, self.stride, self.kind = dim, block, stride, kind
        if kind == "mlp":
            self.pos = nn.Parameter(torch.randn(block, dim) * 0.02)  # intra-block position embedding
            self.fc1 = nn.Linear(block * dim, dim)
            self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H, D = x.shape
        n = compressed_blocks(T, self.block, self.stride)
        if n == 0:
            return x.new_zeros(B, 0, H, D)
        blocks = x[:, : (n - 1) * self.stride + self.block].unfold(1, self.block, self.stride)  # [B, n, H, D, l]
        blocks = blocks.transpose(-1, -2)  # [B, n, H, l, D]
        if self.kind == "mean":
            return blocks.mean(-2)
        h = (blocks + self.pos.to(x.dtype)).flatten(-2)
        return self.fc2(F.silu(self.fc1(h)))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block={self.block}, stride={self.stride}, kind={self.kind!r}"


class NSACore(nn.Module):
    """Native Sparse Attention after its projections: RoPE, compression, the three gated branches.

    q [B, T, HQ·K]; k_*, v_* [B, T, H·K]; g [B, T, HQ·3] (already sigmoid) -> [B, T, HQ·K].
    """

    def __init__(self, heads: int, kv_heads: int, head_dim: int, *, block: int = 32, stride: int = 16,
                 select_block: int = 64, top_n: int = 16, window: int = 512, compress: str = "mlp",
                 rope: bool = True, rope_theta: float = 10000.0, max_len: int | None = None,
                 kernel: str = "auto") -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.block, self.stride, self.select_block = block, stride, select_block
        self.top_n, self.window, self.max_len, self.kernel = top_n, window, max_len, kernel
        self.k_compress = BlockCompressor(head_dim, block, stride, compress)
        self.v_compress = BlockCompressor(head_dim, block, stride, compress)
        if rope:
            self.rope = RotaryEmbedding(head_dim, theta=rope_theta)
        else:
            self.rope = None
        # While decoding, the layer recomputes over the whole prefix (no per-branch caches yet).
        self.history = InputHistory()

    def _rotate(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return rotate(self.rope, a, b)

    def forward(self, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g):
        new = q.shape[1]
        if self.history.active:  # decoding: this call's queries are the last `new` of the prefix
            q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g = self.history.extend(
                q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g)
        B, T, _ = q.shape
        if self.max_len is not None and T > self.max_len:
            raise ValueError(f"nsa: a sequence of {T} tokens is longer than max_len={self.max_len} "
                             "(top_n was checked against max_len at compile time)")
        HQ, H, D = self.heads, self.kv_heads, self.head_dim
        q = q.view(B, T, HQ, D)
        k_cmp, k_slc, k_win = (k.view(B, T, H, D) for k in (k_cmp, k_slc, k_win))
        v_cmp, v_slc, v_win = (v.view(B, T, H, D) for v in (v_cmp, v_slc, v_win))
        if self.rope is not None:
            q, k_cmp = self._rotate(q, k_cmp)
            k_slc, k_win = self._rotate(k_slc, k_win)
        g_cmp, g_slc, g_win = g.view(B, T, HQ, 3).unbind(-1)
        o = nsa_attention(q, self.k_compress(k_cmp), self.v_compress(v_cmp), k_slc, v_slc, k_win, v_win,
                          g_cmp, g_slc, g_win, block=self.block, stride=self.stride, select_block=self.select_block,
                          top_n=self.top_n, window=self.window, kernel=self.kernel)
        return o.reshape(B, T, HQ * D)[:, T - new:]

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, block={self.block}, "
                f"stride={self.stride}, select_block={self.select_block}, top_n={self.top_n}, "
                f"window={self.window}, kernel={self.kernel!r}")


class NSABranchCore(nn.Module):
    """One NSA branch alone, ungated, after its projections (`nsa_branch(...)`: NSA written as gated paths).

    q [B, T, HQ·K] and the branch's own full-resolution keys and values [B, T, H·K] -> [B, T, HQ·K]:
    `cmp` takes k_cmp, v_cmp (compressed here, as NSACore does); `slc` takes k_cmp (compressed, only to score
    the blocks), k_slc, v_slc; `win` takes k_win, v_win. RoPE as NSACore's, on q and every key.
    """

    def __init__(self, branch: str, heads: int, kv_heads: int, head_dim: int, *, block: int = 32, stride: int = 16,
                 select_block: int = 64, top_n: int = 16, window: int = 512, compress: str = "mlp",
                 rope: bool = True, rope_theta: float = 10000.0, max_len: int | None = None,
                 kernel: str = "auto") -> None:
        super().__init__()
        if branch not in BRANCHES or kernel not in KERNELS:
            raise ValueError(f"branch / kernel: choose from {BRANCHES} / {KERNELS}, got {branch!r} / {kernel!r}")
        if heads % kv_heads:
            raise ValueError(f"heads={heads} must be a multiple of kv_heads={kv_heads}")
        self.branch, self.heads, self.kv_heads, self.head_dim = branch, heads, kv_heads, head_dim
        self.block, self.stride, self.select_block = block, stride, select_block
        self.top_n, self.window, self.max_len, self.kernel = top_n, window, max_len, kernel
        if branch in ("cmp", "slc"):
            self.k_compress = BlockCompressor(head_dim, block, stride, compress)
        if branch == "cmp":
            self.v_compress = BlockCompressor(head_dim, block, stride, compress)
        self.rope = RotaryEmbedding(head_dim, theta=rope_theta) if rope else None
        self.history = InputHistory()  # while decoding, recompute over the whole prefix (as NSACore)

    def forward(self, q, *keys_values):
        new = q.shape[1]
        if self.history.active:
            q, *keys_values = self.history.extend(q, *keys_values)
        B, T, _ = q.shape
        if self.max_len is not None and T > self.max_len:
            raise ValueError(f"nsa: a sequence of {T} tokens is longer than max_len={self.max_len} "
                             "(top_n was checked against max_len at compile time)")
        q = q.view(B, T, self.heads, self.head_dim)
        kv = [x.view(B, T, self.kv_heads, self.head_dim) for x in keys_values]
        if self.rope is not None:  # every key: the first input, and slc's selection keys
            q, kv[0] = rotate(self.rope, q, kv[0])
            if self.branch == "slc":
                kv[1], _ = rotate(self.rope, kv[1], kv[1])
        options = dict(block=self.block, stride=self.stride, select_block=self.select_block, top_n=self.top_n,
                       window=self.window, kernel=self.kernel)
        if self.branch == "cmp":
            o = nsa_branch("cmp", q, self.k_compress(kv[0]), self.v_compress(kv[1]), **options)
        elif self.branch == "slc":
            o = nsa_branch("slc", q, kv[1], kv[2], k_cmp=self.k_compress(kv[0]), **options)
        else:
            o = nsa_branch("win", q, kv[0], kv[1], **options)
        return o.reshape(B, T, -1)[:, T - new:]

    def extra_repr(self) -> str:
        return (f"{self.branch}, heads={self.heads}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"block={self.block}, stride={self.stride}, select_block={self.select_block}, top_n={self.top_n}, "
                f"window={self.window}, kernel={self.kernel!r}")
