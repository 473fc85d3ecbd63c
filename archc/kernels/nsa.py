"""Native Sparse Attention (NSA, DeepSeek, arXiv 2502.11089; docs/algorithms.md §2): the attention itself.

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
- `nsa_gather`: PyTorch, queries in chunks. Compression: per chunk one matmul of the chunk's
  queries (all heads of a KV group as rows) against the compressed blocks seen so far; its
  probabilities give the importance and the top-n blocks. Selection, group-centric: each (position,
  KV head) gathers only its selected blocks, once for all G query heads, and does one
  [G, K] x [K, n·l'] matmul; the backward scatters the blocks' gradients back with index_add_.
  Both are autograd functions that keep only their outputs and recompute each chunk's scores in
  the backward (flash-style), with chunks sized by a work-space budget (CHUNK_FLOATS), so memory
  is O(T) plus one chunk's O(chunk · (n·l' + T/d)) — never O(T²). Window: `attention_local`
  (blocked SDPA, linear in T).
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
from torch.autograd.function import once_differentiable

from archc.kernels import registry
from archc.kernels.attention import attention_local
from archc.kernels.registry import nsa_triton_unfit as triton_unsupported  # the limits live in the registry

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
    "nsa_branch",
]

KERNELS = registry.FAMILIES["nsa"].faces
LOCAL_BLOCKS = 2  # the query's own selection block and the one before it are always kept (paper §3.3.2)
CHUNK_FLOATS = 1 << 21  # fp32 work space (scores, gathered blocks) per query chunk of the gather path: 8 MB


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

# The compression and selection branches are autograd functions, flash-style in PyTorch: the forward keeps only
# its output, the backward recomputes each query chunk's scores from q, k and v. Activation checkpointing would
# run every forward twice, and a per-chunk autograd graph makes each chunk's slice and gather backward fill a
# whole-sequence zero tensor. Masks enter as an additive bias of 0 / -1e30 that the score matmul accumulates
# onto (baddbmm) rather than as a separate masked_fill pass over the [rows, keys] scores.

MASKED = -1e30  # finite: a row with no key at all gets a uniform softmax (zeroed after), never NaN


def _chunk(per_query: int, T: int) -> int:
    """Query positions per chunk so that one chunk's work space (`per_query` floats each) fits CHUNK_FLOATS."""
    return max(1, min(T, CHUNK_FLOATS // max(1, per_query)))


def _to_rows(x: torch.Tensor, H: int) -> torch.Tensor:
    """[B, C, HQ, D] -> [B·H, C·G, D]: a KV head's query heads at the chunk's positions as the rows of one matmul."""
    B, C, HQ, D = x.shape
    return x.reshape(B, C, H, HQ // H, D).transpose(1, 2).reshape(B * H, C * (HQ // H), D)


def _from_rows(x: torch.Tensor, B: int, C: int) -> torch.Tensor:
    """[B·H, C·G, D] -> [B, C, HQ, D], the inverse of `_to_rows`."""
    D = x.shape[-1]
    return x.view(B, -1, C, x.shape[1] // C, D).transpose(1, 2).reshape(B, C, -1, D)


def _attention_grads(p, qc, kc, vc, doc, oc, scale):
    """Backward of o = p·v with p = softmax(qc·kcᵀ + bias), qc already scaled, all [N, rows, ·]:
    (dq, dk, dv) of the chunk, dq carrying the scale."""
    delta = (doc * oc).sum(-1, keepdim=True)  # Σ_s p·dp, from the saved output
    dv = torch.bmm(p.transpose(1, 2), doc)
    ds = torch.bmm(doc, vc.transpose(1, 2)).sub_(delta).mul_(p)  # gradient of the scaled scores
    return torch.bmm(ds, kc).mul_(scale), torch.bmm(ds.transpose(1, 2), qc), dv


def _cmp_chunks(T: int, Nc: int, block: int, stride: int, chunk: int, device):
    """Per query chunk [t0, t1): how many compressed blocks its last query sees (hi; they are 0..hi-1), the bias
    [C, hi] hiding those a query does not see yet (block i ends at token i·stride + block - 1), and the has-key
    factor [C, 1] zeroing queries that see none (None when all see one)."""
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        hi = min(Nc, compressed_blocks(t1, block, stride))
        seen = torch.arange(hi, device=device) * stride + block - 1 <= torch.arange(t0, t1, device=device)[:, None]
        bias = torch.zeros(seen.shape, device=device).masked_fill_(~seen, MASKED)
        has_key = None if t0 >= block - 1 else seen.any(-1, keepdim=True).float()
        yield t0, t1, hi, bias, has_key


class _CompressedAttention(torch.autograd.Function):
    """The compression branch: attention over the compressed blocks each query has seen complete. A chunk's
    queries all read blocks 0..hi-1, so per (batch, KV head) it is one matmul [C·G, K] x [K, hi] (the chunk's
    positions times the group's query heads as rows).

    q [B, T, HQ, K], k [B, Nc, H, K], v [B, Nc, H, V] -> o [B, T, HQ, V] fp32. The forward hands each chunk's
    probabilities [B, H, C, G, hi] (None while no block is complete) to `observe(p, t0, t1)`: the selection
    is made from them."""

    @staticmethod
    def _probs(q, kh, t0, t1, hi, bias, has_key, scale):
        B, C, HQ, _ = q[:, t0:t1].shape
        H = kh.shape[1]
        qc = _to_rows(q[:, t0:t1].float() * scale, H)
        kc = kh[:, :, :hi].flatten(0, 1)
        # a fresh copy of the bias for every (batch, KV head, query head) row: the matmul accumulates onto it
        scores = bias[None, :, None].expand(B * H, C, HQ // H, hi).clone(memory_format=torch.contiguous_format)
        scores = scores.view(B * H, C * (HQ // H), hi)
        p = torch.softmax(scores.baddbmm_(qc, kc.transpose(1, 2)), dim=-1)
        if has_key is not None:
            p.view(B * H, C, -1, hi).mul_(has_key[:, None])
        return qc, kc, p

    @staticmethod
    def forward(ctx, q, k, v, block, stride, scale, chunk, observe):
        B, T, HQ, _ = q.shape
        Nc, H, V = k.shape[1], k.shape[2], v.shape[-1]
        kh, vh = k.float().transpose(1, 2).contiguous(), v.float().transpose(1, 2).contiguous()  # [B, H, Nc, ·]
        o = q.new_zeros(B, T, HQ, V, dtype=torch.float32)
        for t0, t1, hi, bias, has_key in _cmp_chunks(T, Nc, block, stride, chunk, q.device):
            if hi == 0:  # no block complete yet: o stays 0
                observe(None, t0, t1)
                continue
            _qc, _kc, p = _CompressedAttention._probs(q, kh, t0, t1, hi, bias, has_key, scale)
            observe(p.view(B, H, t1 - t0, -1, hi), t0, t1)
            o[:, t0:t1] = _from_rows(torch.bmm(p, vh[:, :, :hi].flatten(0, 1)), B, t1 - t0)
        ctx.save_for_backward(q, kh, vh, o)
        ctx.args = (block, stride, scale, chunk, k.dtype, v.dtype)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, kh, vh, o = ctx.saved_tensors
        block, stride, scale, chunk, k_dtype, v_dtype = ctx.args
        B, T = q.shape[:2]
        H, Nc = kh.shape[1], kh.shape[2]
        dq = torch.zeros(q.shape, device=q.device)
        dkh, dvh = torch.zeros_like(kh), torch.zeros_like(vh)
        for t0, t1, hi, bias, has_key in _cmp_chunks(T, Nc, block, stride, chunk, q.device):
            if hi == 0:
                continue
            qc, kc, p = _CompressedAttention._probs(q, kh, t0, t1, hi, bias, has_key, scale)
            doc, oc = _to_rows(do[:, t0:t1].float(), H), _to_rows(o[:, t0:t1], H)
            dqc, dkc, dvc = _attention_grads(p, qc, kc, vh[:, :, :hi].flatten(0, 1), doc, oc, scale)
            dq[:, t0:t1] = _from_rows(dqc, B, t1 - t0)
            dkh[:, :, :hi] += dkc.view(B, H, hi, -1)
            dvh[:, :, :hi] += dvc.view(B, H, hi, -1)
        return (dq.to(q.dtype), dkh.transpose(1, 2).to(k_dtype), dvh.transpose(1, 2).to(v_dtype),
                None, None, None, None, None)


def _window(q, k, v, window: int, scale: float) -> torch.Tensor:
    """The sliding-window branch by `attention_local` (query blocks of 128 through one batched SDPA call, linear
    in T, faster here than a masked matmul over bands): [B, T, HQ, V] fp32. SDPA scales by D^-1/2, so q carries
    the rest of `scale`; attention_local takes one width for keys and values, so the narrower of q, k and v are
    zero-padded to the wider (which leaves the scores as they are) and o is cut back to V."""
    K, V = q.shape[-1], v.shape[-1]
    D = max(K, V)
    q, k, v = (torch.nn.functional.pad(x.float(), (0, D - x.shape[-1])).transpose(1, 2) for x in (q, k, v))
    if scale != D ** -0.5:
        q = q * (scale * D ** 0.5)
    return attention_local(q, k, v, causal=True, window=window).transpose(1, 2)[..., :V]


def _block_table(x: torch.Tensor, L: int) -> torch.Tensor:
    """[B, T, H, D] -> [B·H·Ns, L·D] fp32: row (b·H + h)·Ns + j holds block j's tokens (the last zero-padded)."""
    B, T, H, D = x.shape
    Ns = -(-T // L)
    x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, Ns * L - T))
    return x.view(B, Ns, L, H, D).permute(0, 3, 1, 2, 4).reshape(B * H * Ns, L * D)


def _from_table(x: torch.Tensor, B: int, T: int, H: int, D: int) -> torch.Tensor:
    """[B·H·Ns, L·D] -> [B, T, H, D], the inverse of `_block_table` (a view)."""
    return x.view(B, H, -1, D)[:, :, :T].transpose(1, 2)


def _block_chunks(sel: torch.Tensor, L: int, Ns: int, chunk: int):
    """Per query chunk [t0, t1): the table rows of its selected blocks [B·C·H·n] and the bias [B·C·H, 1, n·L]
    hiding the tokens a query does not see (those after it; all of a -1 slot). Slots that are -1 for the whole
    chunk at the end (early queries have fewer blocks than top_n) are left out."""
    B, T, H, _ = sel.shape
    base = (torch.arange(B, device=sel.device)[:, None] * H + torch.arange(H, device=sel.device)) * Ns  # [B, H]
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        used = (sel[:, t0:t1] >= 0).flatten(0, 2).any(0).nonzero()
        n = int(used[-1]) + 1 if used.numel() else 1
        sc = sel[:, t0:t1, :, :n]
        rows = (base[:, None, :, None] + sc.clamp(min=0)).flatten()
        tok = sc[..., None] * L + torch.arange(L, device=sel.device)  # [B, C, H, n, L]
        t = torch.arange(t0, t1, device=sel.device)[None, :, None, None, None]
        hidden = (sc[..., None] < 0) | (tok > t)
        yield t0, t1, rows, torch.zeros(hidden.shape, device=sel.device).masked_fill_(hidden, MASKED).view(-1, 1, n * L)


class _BlockAttention(torch.autograd.Function):
    """Attention of each query over its own selected blocks, sel [B, T, H, n] (-1 padded), group-centric: each
    (position, KV head) gathers its blocks' keys and values once, as whole rows of a block table, for all G query
    heads of its group, and does one [G, K] x [K, n·l'] matmul. The backward scatters the gathered rows'
    gradients back with index_add_. q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V] -> o [B, T, HQ, V] fp32.

    The gathers go into buffers reused across chunks: a fresh multi-megabyte tensor per chunk costs more in page
    faults than the copy itself."""

    @staticmethod
    def _probs(q, kt, vt, bufs, t0, t1, rows, bias, scale):
        N, K = bias.shape[0], q.shape[-1]
        kg = torch.index_select(kt, 0, rows, out=bufs[0][:rows.numel()]).view(N, -1, K)
        vg = torch.index_select(vt, 0, rows, out=bufs[1][:rows.numel()]).view(N, kg.shape[1], -1)
        qc = q[:, t0:t1].float().reshape(N, -1, K) * scale
        return qc, kg, vg, torch.softmax(torch.baddbmm(bias, qc, kg.transpose(1, 2)), dim=-1)

    @staticmethod
    def _buffers(kt, vt, B, H, T, sel, chunk):
        slots = B * min(chunk, T) * H * sel.shape[-1]
        return kt.new_empty(slots, kt.shape[-1]), vt.new_empty(slots, vt.shape[-1])

    @staticmethod
    def forward(ctx, q, k, v, sel, select_block, scale, chunk):
        B, T, HQ, _ = q.shape
        H, V, L = k.shape[2], v.shape[-1], select_block
        kt, vt = _block_table(k, L), _block_table(v, L)
        bufs = _BlockAttention._buffers(kt, vt, B, H, T, sel, chunk)
        o = q.new_zeros(B, T, HQ, V, dtype=torch.float32)
        for t0, t1, rows, bias in _block_chunks(sel, L, kt.shape[0] // (B * H), chunk):
            _qc, _kg, vg, p = _BlockAttention._probs(q, kt, vt, bufs, t0, t1, rows, bias, scale)
            o[:, t0:t1] = torch.bmm(p, vg).view(B, t1 - t0, HQ, V)
        ctx.save_for_backward(q, kt, vt, sel, o)
        ctx.args = (select_block, scale, chunk, k.shape, k.dtype, v.dtype)
        return o

    @staticmethod
    @once_differentiable
    def backward(ctx, do):
        q, kt, vt, sel, o = ctx.saved_tensors
        L, scale, chunk, (B, T, H, K), k_dtype, v_dtype = ctx.args
        HQ, V = q.shape[2], vt.shape[-1] // L
        bufs = _BlockAttention._buffers(kt, vt, B, H, T, sel, chunk)
        dq = torch.zeros(q.shape, device=q.device)
        dkt, dvt = torch.zeros_like(kt), torch.zeros_like(vt)
        for t0, t1, rows, bias in _block_chunks(sel, L, kt.shape[0] // (B * H), chunk):
            qc, kg, vg, p = _BlockAttention._probs(q, kt, vt, bufs, t0, t1, rows, bias, scale)
            N = bias.shape[0]
            dqc, dkg, dvg = _attention_grads(p, qc, kg, vg, do[:, t0:t1].float().reshape(N, -1, V),
                                             o[:, t0:t1].reshape(N, -1, V), scale)
            dq[:, t0:t1] = dqc.view(B, t1 - t0, HQ, K)
            dkt.index_add_(0, rows, dkg.view(-1, L * K))
            dvt.index_add_(0, rows, dvg.view(-1, L * V))
        return (dq.to(q.dtype), _from_table(dkt, B, T, H, K).to(k_dtype), _from_table(dvt, B, T, H, V).to(v_dtype),
                None, None, None, None)


def selection_attention_gather(q, k_slc, v_slc, block_indices, *, select_block: int, scale=None,
                               chunk: int | None = None):
    """The selection branch alone, for given blocks [B, T, H, n] (-1 padded): o [B, T, HQ, V] fp32."""
    B, T, HQ, K = q.shape
    H, V, n = k_slc.shape[2], v_slc.shape[-1], block_indices.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, HQ, V, dtype=torch.float32)
    per_query = B * n * select_block * (H * (K + V) + 3 * HQ)  # gathered keys and values, scores, their gradient
    return _BlockAttention.apply(q, k_slc, v_slc, block_indices, select_block, _scale(scale, K),
                                 chunk or _chunk(per_query, T))


def _selector(sel: torch.Tensor, *, block: int, stride: int, select_block: int, top_n: int):
    """The compressed attention's `observe`: each chunk's probabilities [B, H, C, G, hi] (None: none visible) ->
    its queries' selected blocks, written into `sel` [B, T, H, top_n]."""
    B, T, H, _ = sel.shape
    Ns = -(-T // select_block)

    def observe(p, t0, t1):
        n_slc = min(Ns, (t1 - 1) // select_block + 1)  # no query of the chunk sees a later block
        if p is None:
            importance = torch.zeros(B, t1 - t0, H, n_slc, device=sel.device)
        else:
            importance = block_importance(p.sum(3).transpose(1, 2), n_slc, block, stride, select_block)
        sel[:, t0:t1] = select_blocks(importance, torch.arange(t0, t1, device=sel.device)[None, :, None],
                                      select_block, top_n)

    return observe


def _branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, *, block, stride, select_block, top_n, window, scale,
              chunk, with_selection: bool):
    """Compression, window and (unless with_selection is False) selection outputs, fp32, and the blocks chosen."""
    B, T, HQ, K = q.shape
    s = _scale(scale, K)
    sel = torch.full((B, T, k_slc.shape[2], top_n), -1, dtype=torch.long, device=q.device)
    observe = _selector(sel, block=block, stride=stride, select_block=select_block, top_n=top_n)
    cmp_chunk = chunk or _chunk(3 * B * HQ * max(1, k_cmp.shape[1]), T)
    o_cmp = _CompressedAttention.apply(q, k_cmp, v_cmp, block, stride, s, cmp_chunk, observe)
    o_win = _window(q, k_win, v_win, window, s)
    if not with_selection:
        return o_cmp, o_win, sel
    o_slc = selection_attention_gather(q, k_slc, v_slc, sel, select_block=select_block, scale=s, chunk=chunk)
    return o_cmp, o_win, sel, o_slc


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


class SelectionAttention(torch.autograd.Function):
    """Triton forward; the backward recomputes the branch with the gather path and differentiates it."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, select_block: int, scale: float):
        from archc.kernels._triton_nsa import selection_forward  # triton loads only when this face runs

        o, lse = selection_forward(q, k, v, block_indices, select_block, scale)
        ctx.save_for_backward(q, k, v, block_indices)
        ctx.select_block, ctx.scale = select_block, scale
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, block_indices = ctx.saved_tensors
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(need) for x, need in zip((q, k, v), ctx.needs_input_grad[:3])]
            o = selection_attention_gather(*leaves, block_indices, select_block=ctx.select_block, scale=ctx.scale)
            wanted = [x for x in leaves if x.requires_grad]
            grads = iter(torch.autograd.grad(o, wanted, do) if wanted else ())
        dq, dk, dv = (next(grads) if x.requires_grad else None for x in leaves)
        return dq, dk, dv, None, None, None


def selection_attention_triton(q, k, v, block_indices, *, select_block: int, scale: float):
    """(o fp32 [B, T, HQ, V], lse [B, T, HQ]) of attention over the selected blocks (-1 padded) of each query."""
    return SelectionAttention.apply(q, k, v, block_indices, select_block, scale)


def _triton_cannot(q, k_slc, v_slc, select_block: int) -> str | None:
    """Why the Triton selection kernel cannot run these tensors here, or None."""
    why = triton_unsupported(q.shape[2], k_slc.shape[2], q.shape[3], v_slc.shape[3], select_block)
    if not why and not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        why = "the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported)"
    if not why and not registry.triton_available():
        why = "triton is not installed"
    return why


def nsa_triton(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, block: int, stride: int,
               select_block: int, top_n: int, window: int, scale=None, chunk: int | None = None,
               return_block_indices: bool = False):
    """Selection branch in Triton (forward; backward recomputes it with the gather path), the rest in PyTorch."""
    _check(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block, stride, select_block,
           top_n, window)
    why = _triton_cannot(q, k_slc, v_slc, select_block)
    if why:  # fall back rather than fail: the gather path runs every shape on every device
        warnings.warn(f"nsa: kernel='triton' runs the gather path instead: {why}", stacklevel=2)
        return nsa_gather(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block=block,
                          stride=stride, select_block=select_block, top_n=top_n, window=window, scale=scale,
                          chunk=chunk, return_block_indices=return_block_indices)
    if q.shape[1] == 0:
        return _empty(q, v_slc, top_n, return_block_indices)
    o_cmp, o_win, sel = _branches(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, block=block, stride=stride,
                                  select_block=select_block, top_n=top_n, window=window, scale=scale, chunk=chunk,
                                  with_selection=False)
    o_slc, _lse = selection_attention_triton(q, k_slc, v_slc, sel, select_block=select_block,
                                             scale=_scale(scale, q.shape[-1]))
    o = _combine(g_cmp, g_slc, g_win, o_cmp, o_slc, o_win, v_slc.dtype)
    return (o, sel) if return_block_indices else o


# ----------------------------------------------------------------------------- dispatcher


def resolve_kernel(kernel: str, q: torch.Tensor, kv_heads: int, value_dim: int, select_block: int) -> str:
    """The face `kernel` runs as: "auto" is triton on CUDA where the kernel tiles the shape, else gather."""
    return registry.face("nsa", kernel, cuda=q.is_cuda, heads=q.shape[2], kv_heads=kv_heads, head_dim=q.shape[3],
                         value_dim=value_dim, select_block=select_block)


def nsa_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, *, block: int = 32,
                  stride: int = 16, select_block: int = 64, top_n: int = 16, window: int = 512, scale=None,
                  kernel: str = "auto", return_block_indices: bool = False):
    """NSA attention; kernel "auto" | "reference" | "gather" | "triton" (see the module docstring)."""
    face = resolve_kernel(kernel, q, k_slc.shape[2], v_slc.shape[-1], select_block)
    fn = {"reference": nsa_reference, "gather": nsa_gather, "triton": nsa_triton}[face]
    return fn(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g_cmp, g_slc, g_win, block=block, stride=stride,
              select_block=select_block, top_n=top_n, window=window, scale=scale,
              return_block_indices=return_block_indices)



# ----------------------------------------------------------------------------- one branch alone

BRANCHES = ("cmp", "slc", "win")


def nsa_branch(branch: str, q, k, v, *, k_cmp=None, block: int = 32, stride: int = 16, select_block: int = 64,
               top_n: int = 16, window: int = 512, scale=None, kernel: str = "auto"):
    """One of the three branches alone, ungated: o [B, T, HQ, V] in v's dtype, what `nsa_attention` with that
    branch's gate 1 and the others' 0 gives (NSA written as gated paths: GRAMMAR.md).

    `cmp`: k, v are the compressed keys and values [B, Nc, H, ·]; `slc`: k, v are the selection keys and values
    [B, T, H, ·] and `k_cmp` the compressed keys [B, Nc, H, K] whose attention scores the blocks (not
    differentiated, as in the full layer); `win`: k, v are the window's keys and values [B, T, H, ·].
    """
    if branch not in BRANCHES:
        raise ValueError(f"nsa: branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    if T == 0:
        return v.new_zeros(B, 0, HQ, V)
    face = resolve_kernel(kernel, q, H, V, select_block)
    if face == "reference":
        return _branch_reference(branch, q, k, v, k_cmp, block=block, stride=stride, select_block=select_block,
                                 top_n=top_n, window=window, scale=scale)
    s = _scale(scale, K)
    if branch == "win":
        return _window(q, k, v, window, s).to(v.dtype)
    if branch == "cmp":
        chunk = _chunk(3 * B * HQ * max(1, k.shape[1]), T)
        return _CompressedAttention.apply(q, k, v, block, stride, s, chunk, lambda p, t0, t1: None).to(v.dtype)
    sel = torch.full((B, T, H, top_n), -1, dtype=torch.long, device=q.device)
    with torch.no_grad():  # the compressed attention only scores the blocks; no values, no gradient
        _CompressedAttention.apply(q, k_cmp, k_cmp.new_zeros(*k_cmp.shape[:3], 1), block, stride, s,
                                   _chunk(3 * B * HQ * max(1, k_cmp.shape[1]), T),
                                   _selector(sel, block=block, stride=stride, select_block=select_block, top_n=top_n))
    if face == "triton":
        why = _triton_cannot(q, k, v, select_block)
        if not why:
            return selection_attention_triton(q, k, v, sel, select_block=select_block, scale=s)[0].to(v.dtype)
        if kernel == "triton":
            warnings.warn(f"nsa: kernel='triton' runs the gather path instead: {why}", stacklevel=2)
    return selection_attention_gather(q, k, v, sel, select_block=select_block, scale=s).to(v.dtype)


def _branch_reference(branch, q, k, v, k_cmp, *, block, stride, select_block, top_n, window, scale):
    """`nsa_reference` with this branch's gate 1, the others' 0 and zeros for their keys and values."""
    B, T, HQ, K = q.shape
    H, V = k.shape[2], v.shape[-1]
    Nc = compressed_blocks(T, block, stride)
    zeros = {"cmp": (q.new_zeros(B, Nc, H, K), v.new_zeros(B, Nc, H, V)), "slc": (q.new_zeros(B, T, H, K),
             v.new_zeros(B, T, H, V)), "win": (q.new_zeros(B, T, H, K), v.new_zeros(B, T, H, V))}
    kv = {b: (k, v) if b == branch else zeros[b] for b in BRANCHES}
    if branch == "slc":
        kv["cmp"] = (k_cmp, zeros["cmp"][1])
    gates = [q.new_full((B, T, HQ), float(b == branch)) for b in BRANCHES]
    return nsa_reference(q, *kv["cmp"], *kv["slc"], *kv["win"], *gates, block=block, stride=stride,
                         select_block=select_block, top_n=top_n, window=window, scale=scale)
