"""Native Sparse Attention (NSA, DeepSeek, arXiv 2502.11089; algorithms.md §4): the attention itself.

For query t and query head h (in KV group g(h)), three branches, each with its own keys and values,
combined by per-head gates in (0, 1):

    o_t = g_cmp · Attn(q_t, K_cmp, V_cmp) + g_slc · Attn(q_t, K_slc[sel], V_slc[sel])
        + g_win · Attn(q_t, K_win[win], V_win[win])

- compression: compressed block i summarises tokens [i·d, i·d + l) (length l = `block`, stride
  d = `stride`); it is visible to query t once complete, i·d + l - 1 <= t. The compressor (an MLP or
  mean pooling) runs before this kernel: k_cmp, v_cmp come in compressed, [B, Nc, H, ·].
- selection: the sequence splits into blocks of l' = `select_block` tokens. Block j's importance for
  query t is the compressed attention mass of the compression blocks that overlap it,
  imp_j = Σ_{h in group} Σ_{i visible, [i·d, i·d+l) ∩ [j·l', (j+1)·l') ≠ ∅} p_cmp[h, i]
  (the paper's eq. 9 made explicit: each overlapping compression block counted once; when the two
  blockings coincide it is p_cmp itself). The group's query heads share one selection (GQA).
  Candidates are the blocks j <= t // l'. The first block and the two local blocks (t // l' and the
  one before) are always kept; the rest of the top_n places go to the highest importance, ties to the
  earlier block. Attention runs over the selected blocks' tokens s <= t.
- window: the last `window` tokens, t - w < s <= t.

Importance and the selection are not differentiated (the top-n is discrete); gradients reach the
compressed keys through the compression branch, as in the paper.

Three faces and a dispatcher:

- `nsa_reference`: one query position at a time, each branch's mask built explicitly, plain
  masked softmax per branch; fp32. Obviously right, O(T²) work.
- `nsa_gather`: queries in chunks; per chunk the compressed scores give the importance and the
  top-n blocks, and only the selected blocks are gathered ([chunk, n, l', ·]), the window as a
  band of the chunk plus w keys. Each chunk runs under activation checkpointing, so memory is
  O(chunk · (n·l' + w + T/d)) per step plus the inputs and outputs — never O(T²).
- `nsa_triton`: the selection branch through the group-centric Triton kernel
  (`_triton_nsa.py`: one program per (batch, position, KV head) loads each selected block once for
  all query heads of the group); compression and window as in `nsa_gather`.
- `nsa_attention(..., kernel="auto")`: triton on CUDA, gather elsewhere, and gather when the Triton
  kernel cannot tile the shape (`triton_unsupported` says why); an explicit kernel="triton" that
  cannot run (shape, no CUDA, no triton) warns and runs the gather path: never a run-time failure.

Layouts, sequence-first like FLA: q [B, T, HQ, K]; k_* [B, ·, H, K]; v_* [B, ·, H, V]; gates
[B, T, HQ]; HQ a multiple of H. `scale` defaults to K^-1/2. Every face computes in fp32 and returns
o [B, T, HQ, V] in v's dtype.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
from torch.utils.checkpoint import checkpoint

__all__ = [
    "KERNELS",
    "nsa_attention",
    "nsa_reference",
    "nsa_gather",
    "nsa_triton",
    "compressed_blocks",
    "block_importance",
    "select_blocks",
    "selection_attention_gather",
    "triton_unsupported",
]

KERNELS = ("auto", "reference", "gather", "triton")
LOCAL_BLOCKS = 2  # the query's own selection block and the one before it are always kept (paper §3.3.2)
CHUNK_ELEMENTS = 1 << 24  # floats of scores and gathered keys/values per query chunk in the gather path
TRITON_MAX_GROUP = 64  # query heads per KV group the Triton kernel holds in one tile
TRITON_MAX_DIM = 256  # head dims the Triton kernel holds in registers
TRITON_MAX_SELECT_BLOCK = 128  # selection-block tokens per tile


# ----------------------------------------------------------------------------- shared definitions


def compressed_blocks(T: int, block: int, stride: int) -> int:
    """How many complete compression blocks [i·stride, i·stride + block) fit in T tokens."""
    return max(0, (T - block) // stride + 1)


def block_importance(p_cmp: torch.Tensor, n_slc: int, block: int, stride: int, select_block: int) -> torch.Tensor:
    """Importance of each selection block: p_cmp [..., Nc] summed over the compression blocks overlapping it.

    Compression block i ([i·stride, i·stride + block)) touches at most ceil(block / l') + 1 selection
    blocks, so this is a few scatter-adds, O(Nc), rather than a dense [Nc, Ns] product."""
    n_cmp = p_cmp.shape[-1]
    out = p_cmp.new_zeros(*p_cmp.shape[:-1], n_slc)
    start = torch.arange(n_cmp, device=p_cmp.device) * stride
    first = start // select_block
    for step in range((block - 1) // select_block + 2):
        j = first + step
        hit = (j * select_block < start + block) & (j < n_slc)
        out.scatter_add_(-1, j.clamp(max=n_slc - 1).expand_as(p_cmp), p_cmp * hit)
    return out


def select_blocks(importance: torch.Tensor, t: torch.Tensor, select_block: int, top_n: int) -> torch.Tensor:
    """Selected block indices [..., top_n] (-1 where fewer blocks exist) for queries at positions t.

    importance [..., Ns] (float, >= 0); t broadcasts against importance[..., 0]. Candidates are blocks
    j <= t // l'; block 0 and the local blocks are forced in; then highest importance, ties to the
    earlier block (a stable sort, so every face picks the same blocks).
    """
    Ns = importance.shape[-1]
    j = torch.arange(Ns, device=importance.device)
    cur = (t // select_block)[..., None]
    candidate = j <= cur
    forced = (j == 0) | ((j <= cur) & (j > cur - LOCAL_BLOCKS))
    key = torch.where(forced, torch.full_like(importance, math.inf), importance)
    key = torch.where(candidate, key, torch.full_like(importance, -math.inf))
    order = torch.sort(key, dim=-1, descending=True, stable=True).indices[..., :top_n]
    n_cand = (cur + 1).clamp(max=Ns)
    rank = torch.arange(order.shape[-1], device=order.device)
    order = torch.where(rank < n_cand, order, torch.full_like(order, -1))
    if order.shape[-1] < top_n:
        order = torch.cat([order, order.new_full((*order.shape[:-1], top_n - order.shape[-1]), -1)], dim=-1)
    return order


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax over the masked-in entries; rows with none give zeros (and zero gradients), not NaN."""
    p = torch.softmax(scores.masked_fill(~mask, -1e30), dim=-1)
    return p * mask


def _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block, stride, select_block,
           top_n, window):
    if q.dim() != 4:
        raise ValueError(f"nsa: q must be [B, T, HQ, K], got {tuple(q.shape)}")
    B, T, HQ, K = q.shape
    H, V = k_slc.shape[2], v_slc.shape[-1]
    if HQ % H:
        raise ValueError(f"nsa: {HQ} query heads do not split into groups over {H} key/value heads")
    Nc = compressed_blocks(T, block, stride)
    for name, x, shape in (("k_slc", k_slc, (B, T, H, K)), ("v_slc", v_slc, (B, T, H, V)),
                           ("k_win", k_win, (B, T, H, K)), ("v_win", v_win, (B, T, H, V)),
                           ("k_cmp", k_cmp, (B, Nc, H, K)), ("v_cmp", v_cmp, (B, Nc, H, V)),
                           ("g_cmp", g_cmp, (B, T, HQ)), ("g_slc", g_slc, (B, T, HQ)), ("g_win", g_win, (B, T, HQ))):
        if tuple(x.shape) != shape:
            raise ValueError(f"nsa: {name} must be {list(shape)}, got {list(x.shape)}")
    if not (block > 0 and stride > 0 and select_block > 0 and window > 0):
        raise ValueError("nsa: block, stride, select_block and window must be positive")
    if top_n < 1 + LOCAL_BLOCKS:
        raise ValueError(f"nsa: top_n={top_n} must be at least {1 + LOCAL_BLOCKS} (the first and the local blocks)")


def _scale(scale, K: int) -> float:
    return K ** -0.5 if scale is None else float(scale)


# ----------------------------------------------------------------------------- reference


def nsa_reference(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, block: int, stride: int,
                  select_block: int, top_n: int, window: int, scale=None, return_block_indices: bool = False):
    """One query position at a time with explicit masks over whole key sequences; fp32.

    Returns o [B, T, HQ, V] (and, if asked, the selected blocks [B, T, H, top_n], -1 padded)."""
    _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block, stride, select_block,
           top_n, window)
    B, T, HQ, K = q.shape
    H = k_slc.shape[2]
    G = HQ // H
    Nc = k_cmp.shape[1]
    Ns = -(-T // select_block)
    s = _scale(scale, K)
    dtype = v_slc.dtype
    f = [x.float() for x in (q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win)]
    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win = f

    def attend(qt, k, v, mask):
        """qt [B, HQ, K]; k, v [B, S, H, ·]; mask [B, H, S] -> o [B, HQ, V], p [B, HQ, S]."""
        k, v = k.repeat_interleave(G, dim=2), v.repeat_interleave(G, dim=2)
        scores = torch.einsum("bhk,bshk->bhs", qt, k) * s
        p = _masked_softmax(scores, mask.repeat_interleave(G, dim=1))
        return torch.einsum("bhs,bshv->bhv", p, v), p

    pos = torch.arange(T, device=q.device)
    cmp_end = torch.arange(Nc, device=q.device) * stride + block - 1  # last token of each compression block
    cmp_start = torch.arange(Nc, device=q.device) * stride
    sel_start = torch.arange(Ns, device=q.device)[:, None] * select_block
    overlap = (cmp_start < sel_start + select_block) & (cmp_start + block > sel_start)  # [Ns, Nc]
    outs, chosen = [], []
    for t in range(T):
        qt = q[:, t]
        # compression: whole compressed blocks that have ended by t
        m_cmp = (cmp_end <= t).expand(B, H, Nc)
        o_cmp, p_cmp = attend(qt, k_cmp, v_cmp, m_cmp)
        # importance of selection block j: summed over the group's heads and the overlapping compression blocks
        p_grp = p_cmp.detach().view(B, H, G, Nc).sum(2)
        imp = (p_grp[:, :, None, :] * overlap).sum(-1)  # [B, H, Ns]
        sel = select_blocks(imp, torch.tensor(t, device=q.device), select_block, top_n)  # [B, H, n]
        in_sel = (sel[..., None] == torch.arange(Ns, device=q.device)).any(-2)  # [B, H, Ns]
        m_slc = in_sel[:, :, pos // select_block] & (pos <= t)
        o_slc, _ = attend(qt, k_slc, v_slc, m_slc)
        m_win = ((pos <= t) & (pos > t - window)).expand(B, H, T)
        o_win, _ = attend(qt, k_win, v_win, m_win)
        outs.append(g_cmp[:, t, :, None] * o_cmp + g_slc[:, t, :, None] * o_slc + g_win[:, t, :, None] * o_win)
        chosen.append(sel)
    o = torch.stack(outs, 1) if outs else v_slc.new_zeros(B, 0, HQ, v_slc.shape[-1])
    o = o.to(dtype)
    idx = torch.stack(chosen, 1) if chosen else torch.zeros(B, 0, H, top_n, dtype=torch.long)
    return (o, idx) if return_block_indices else o


# ----------------------------------------------------------------------------- gather path, per query chunk


def _chunk_size(T: int, HQ: int, H: int, K: int, V: int, Nc: int, top_n: int, select_block: int, window: int) -> int:
    per_query = HQ * (Nc + top_n * select_block + 2 * window) + H * top_n * select_block * (K + V)
    return max(16, min(T, CHUNK_ELEMENTS // max(1, per_query)))


def _compress_chunk(q, k_cmp, v_cmp, t0, *, block, stride, select_block, top_n, scale, Ns):
    """Compression branch and selection for queries t0.. (q [B, C, HQ, K]): o_cmp [B, C, HQ, V], blocks [B, C, H, n]."""
    B, C, HQ, K = q.shape
    H = k_cmp.shape[2]
    G = HQ // H
    t = torch.arange(t0, t0 + C, device=q.device)
    n_vis = min(k_cmp.shape[1], compressed_blocks(t0 + C, block, stride))  # blocks any query here can see
    kc, vc = k_cmp[:, :n_vis].float(), v_cmp[:, :n_vis].float()
    qg = q.float().view(B, C, H, G, K)
    scores = torch.einsum("bchgk,bnhk->bchgn", qg, kc) * scale
    visible = torch.arange(n_vis, device=q.device) * stride + block - 1 <= t[:, None]  # [C, n_vis]
    p = _masked_softmax(scores, visible[None, :, None, None, :])
    o = torch.einsum("bchgn,bnhv->bchgv", p, vc).reshape(B, C, HQ, -1)
    with torch.no_grad():
        importance = block_importance(p.detach().sum(3), Ns, block, stride, select_block)  # [B, C, H, Ns]
        sel = select_blocks(importance, t[None, :, None], select_block, top_n)
    return o, sel


def _selection_chunk(q, k, v, sel, t0, *, select_block, scale):
    """Selection branch for queries t0.. over the gathered blocks `sel` [B, C, H, n]: [B, C, HQ, V]."""
    B, C, HQ, K = q.shape
    T, H, V = k.shape[1], k.shape[2], v.shape[-1]
    G, n, L = HQ // H, sel.shape[-1], select_block
    Ns = -(-T // L)
    pad = Ns * L - T
    # keys and values of each block as one row of a contiguous [B·H·Ns, L·(K+V)] table: one gather of
    # whole rows (index_select, whose backward is an index_add) fetches both
    kv = torch.cat([k.float(), v.float()], dim=-1)
    kv = torch.nn.functional.pad(kv, (0, 0, 0, 0, 0, pad)).view(B, Ns, L, H, K + V).permute(0, 3, 1, 2, 4)
    blk = sel.clamp(min=0)
    row = (torch.arange(B, device=q.device)[:, None, None, None] * H
           + torch.arange(H, device=q.device)[None, None, :, None]) * Ns + blk  # [B, C, H, n]
    kvg = kv.reshape(B * H * Ns, L * (K + V)).index_select(0, row.flatten()).view(B * C * H, n * L, K + V)
    kg, vg = kvg[..., :K], kvg[..., K:]
    tok = blk[..., None] * L + torch.arange(L, device=q.device)  # [B, C, H, n, L]
    t = torch.arange(t0, t0 + C, device=q.device)[None, :, None, None, None]
    mask = (sel[..., None] >= 0) & (tok <= t)
    qg = q.float().reshape(B * C * H, G, K)
    scores = torch.matmul(qg, kg.transpose(1, 2)) * scale  # [B·C·H, G, n·L]
    p = _masked_softmax(scores, mask.view(B * C * H, 1, n * L))
    return torch.matmul(p, vg).view(B, C, HQ, V)


def _window_chunk(q, k, v, t0, *, window, scale):
    """Sliding-window branch for queries t0..: keys from t0 - window + 1 on, as one band; [B, C, HQ, V]."""
    B, C, HQ, K = q.shape
    H = k.shape[2]
    G = HQ // H
    lo = max(0, t0 - window + 1)
    kw, vw = k[:, lo:t0 + C].float(), v[:, lo:t0 + C].float()
    s_pos = torch.arange(lo, t0 + C, device=q.device)
    t = torch.arange(t0, t0 + C, device=q.device)[:, None]
    mask = (s_pos <= t) & (s_pos > t - window)  # [C, S]
    scores = torch.einsum("bchgk,bshk->bchgs", q.float().view(B, C, H, G, K), kw) * scale
    p = _masked_softmax(scores, mask[None, :, None, None, :])
    return torch.einsum("bchgs,bshv->bchgv", p, vw).reshape(B, C, HQ, -1)


def _chunked(fn, T: int, chunk: int, tensors: list[torch.Tensor]):
    """fn(t0, t1, *tensors) over query chunks, concatenated along T; checkpointed when grads are needed.

    Checkpointing keeps only each chunk's inputs for the backward, which recomputes the chunk, so no
    chunk's scores or gathered blocks outlive it."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    pieces = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        if grad:
            pieces.append(checkpoint(fn, t0, t1, *tensors, use_reentrant=False))
        else:
            pieces.append(fn(t0, t1, *tensors))
    if not pieces:
        return None
    if isinstance(pieces[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*pieces))
    return torch.cat(pieces, dim=1)


def selection_attention_gather(q, k_slc, v_slc, block_indices, *, select_block: int, scale=None,
                               chunk: int | None = None):
    """The selection branch alone, for given blocks [B, T, H, n] (-1 padded): o [B, T, HQ, V] fp32."""
    B, T, HQ, K = q.shape
    H, V, n = k_slc.shape[2], v_slc.shape[-1], block_indices.shape[-1]
    s = _scale(scale, K)
    chunk = chunk or _chunk_size(T, HQ, H, K, V, 0, n, select_block, 0)

    def fn(t0, t1, q, k, v):
        return _selection_chunk(q[:, t0:t1], k, v, block_indices[:, t0:t1], t0, select_block=select_block, scale=s)

    out = _chunked(fn, T, chunk, [q, k_slc, v_slc])
    return out if out is not None else q.new_zeros(B, 0, HQ, V, dtype=torch.float32)


def _branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, *, block, stride, select_block, top_n, window, scale,
              chunk, with_selection: bool):
    """Compression, window and (unless with_selection is False) selection outputs, fp32, and the blocks chosen."""
    B, T, HQ, K = q.shape
    H, V = k_slc.shape[2], v_slc.shape[-1]
    Ns = -(-T // select_block)
    chunk = chunk or _chunk_size(T, HQ, H, K, V, k_cmp.shape[1], top_n, select_block, window)
    s = _scale(scale, K)

    def fn(t0, t1, q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win):
        qc = q[:, t0:t1]
        o_cmp, sel = _compress_chunk(qc, k_cmp, v_cmp, t0, block=block, stride=stride, select_block=select_block,
                                     top_n=top_n, scale=s, Ns=Ns)
        o_win = _window_chunk(qc, k_win, v_win, t0, window=window, scale=s)
        if not with_selection:
            return o_cmp, o_win, sel
        o_slc = _selection_chunk(qc, k_slc, v_slc, sel, t0, select_block=select_block, scale=s)
        return o_cmp, o_win, sel, o_slc

    return _chunked(fn, T, chunk, [q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win])


def _combine(g_cmp, g_slc, g_win, o_cmp, o_slc, o_win, dtype):
    o = (g_cmp.float()[..., None] * o_cmp + g_slc.float()[..., None] * o_slc + g_win.float()[..., None] * o_win)
    return o.to(dtype)


def _empty(q, v_slc, top_n, return_block_indices):
    B, _, HQ, _ = q.shape
    o = v_slc.new_zeros(B, 0, HQ, v_slc.shape[-1])
    idx = torch.zeros(B, 0, v_slc.shape[2], top_n, dtype=torch.long, device=q.device)
    return (o, idx) if return_block_indices else o


def nsa_gather(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, block: int, stride: int,
               select_block: int, top_n: int, window: int, scale=None, chunk: int | None = None,
               return_block_indices: bool = False):
    """The PyTorch path: per query chunk, gather only the top-n selected blocks; same returns as the reference."""
    _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block, stride, select_block,
           top_n, window)
    if q.shape[1] == 0:
        return _empty(q, v_slc, top_n, return_block_indices)
    o_cmp, o_win, sel, o_slc = _branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, block=block, stride=stride,
                                         select_block=select_block, top_n=top_n, window=window, scale=scale,
                                         chunk=chunk, with_selection=True)
    o = _combine(g_cmp, g_slc, g_win, o_cmp, o_slc, o_win, v_slc.dtype)
    return (o, sel) if return_block_indices else o


# ----------------------------------------------------------------------------- triton


def triton_unsupported(heads: int, kv_heads: int, head_dim: int, value_dim: int, select_block: int) -> str | None:
    """Why the Triton selection kernel cannot tile this shape, or None when it can."""
    group = heads // kv_heads
    if group > TRITON_MAX_GROUP:
        return f"GQA group of {group} query heads exceeds the Triton kernel's {TRITON_MAX_GROUP}"
    big = {k: v for k, v in (("head_dim", head_dim), ("value_dim", value_dim)) if v > TRITON_MAX_DIM}
    if big:
        return ", ".join(f"{k}={v}" for k, v in big.items()) + f" exceed the Triton kernel's {TRITON_MAX_DIM}"
    if select_block > TRITON_MAX_SELECT_BLOCK:
        return f"select_block={select_block} exceeds the Triton kernel's {TRITON_MAX_SELECT_BLOCK}"
    return None


def nsa_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, block: int, stride: int,
               select_block: int, top_n: int, window: int, scale=None, chunk: int | None = None,
               return_block_indices: bool = False):
    """Selection branch in Triton (forward; backward recomputes it with the gather path), the rest in PyTorch."""
    _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block, stride, select_block,
           top_n, window)
    why = triton_unsupported(q.shape[2], k_slc.shape[2], q.shape[3], v_slc.shape[3], select_block)
    if not why and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        why = "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)"
    if not why and not _triton_available():
        why = "triton is not installed"
    if why:  # fall back rather than fail: the gather path runs every shape on every device
        warnings.warn(f"nsa: kernel='triton' runs the gather path instead: {why}", stacklevel=2)
        return nsa_gather(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block=block,
                          stride=stride, select_block=select_block, top_n=top_n, window=window, scale=scale,
                          chunk=chunk, return_block_indices=return_block_indices)
    if q.shape[1] == 0:
        return _empty(q, v_slc, top_n, return_block_indices)
    from archc.kernels._triton_nsa import selection_attention_triton

    o_cmp, o_win, sel = _branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, block=block, stride=stride,
                                  select_block=select_block, top_n=top_n, window=window, scale=scale, chunk=chunk,
                                  with_selection=False)
    o_slc, _lse = selection_attention_triton(q, k_slc, v_slc, sel, select_block=select_block,
                                             scale=_scale(scale, q.shape[-1]))
    o = _combine(g_cmp, g_slc, g_win, o_cmp, o_slc, o_win, v_slc.dtype)
    return (o, sel) if return_block_indices else o


# ----------------------------------------------------------------------------- dispatcher


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_kernel(kernel: str, q: torch.Tensor, kv_heads: int, value_dim: int, select_block: int) -> str:
    """The face `kernel` runs as: "auto" is triton on CUDA where the kernel tiles the shape, else gather."""
    if kernel not in KERNELS:
        raise ValueError(f"nsa: kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    if q.is_cuda and _triton_available() and triton_unsupported(q.shape[2], kv_heads, q.shape[3], value_dim,
                                                                 select_block) is None:
        return "triton"
    return "gather"


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, block: int = 32,
                  stride: int = 16, select_block: int = 64, top_n: int = 16, window: int = 512, scale=None,
                  kernel: str = "auto", return_block_indices: bool = False):
    """NSA attention; kernel "auto" | "reference" | "gather" | "triton" (see the module docstring)."""
    face = resolve_kernel(kernel, q, k_slc.shape[2], v_slc.shape[-1], select_block)
    fn = {"reference": nsa_reference, "gather": nsa_gather, "triton": nsa_triton}[face]
    return fn(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block=block, stride=stride,
              select_block=select_block, top_n=top_n, window=window, scale=scale,
              return_block_indices=return_block_indices)

