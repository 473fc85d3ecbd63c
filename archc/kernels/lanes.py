"""Residual-lane mixing for hyper-connections and mHC, with Sinkhorn–Knopp (algorithms.md §2).

A residual stream widened to n lanes holds h [n, d] per token. Each residual
update site (one `x += F(x)` of a block) reads its branch input from the lanes
and writes the branch output back:

    read:   u    = Σ_i pre_i h_i                  u [d], the input of F
    write:  h'_i = Σ_j res_ij h_j + post_i y      y = F(u) [d]

The coefficients come per token from logits laid out as
[pre (n) | post (n) | res (n·n, row-major: res_ij at 2n + i·n + j)], with an
activation `act`:

- "mhc" (mHC, Xie et al.): pre = σ(l_pre), post = 2σ(l_post),
  res = SinkhornKnopp(l_res) — doubly stochastic.
- "identity" (hyper-connections, Zhu et al.): the logits are the coefficients
  (static HC: learned constants; dynamic HC: constants + s·tanh(...), computed
  by the caller). HC's residual matrix A_r mixes as H' = A_rᵀ H, so res = A_rᵀ.

Sinkhorn–Knopp as in the mHC paper: M⁰ = exp(L), then `iters` times
M ← RowNorm(ColNorm(M)) (divide every column by its sum, then every row by
its sum), unrolled and differentiated through. After the last step the rows
sum to 1 exactly and the columns approximately. Before the exp each column's
maximum is subtracted: a positive column scaling of M⁰ is removed exactly by
the first column normalisation, so the output (and its gradient) is unchanged
and exp cannot overflow. The torch face runs the matrix form itself with the
tokens innermost ([n, n, N]: each normalisation is one sum and one division
over all tokens, 2 ops a half-step whatever N) and its backward recomputes the
iterates. The Triton face uses the scaling form: with K = exp(L - colmax), a⁰ = 1,

    b^k = 1 / (Kᵀ a^{k-1})    (the column step)      a^k = 1 / (K b^k)    (the row step)
    M   = diag(a^T) K diag(b^T)

is the same sequence of matrices (M^k = diag(a^k) K diag(b^k)) with only 2n
numbers of state per step, which fit in registers; its backward runs the steps
in reverse, needing a^{k-1} at each step, which it recomputes (the forward keeps
nothing but L).

Three faces and a dispatcher:

- `*_reference`: the formulas above with plain autograd — the matrix-form
  Sinkhorn loop, einsum mixes. Obviously right; keeps every Sinkhorn iterate
  for the backward (2·iters·n² floats per token).
- "torch": autograd Functions whose backward is written out and recomputes
  the coefficients (activations, the Sinkhorn iterates) from the logits:
  the forward saves only h and the logits (`lanes_pre`), or h, y and the
  coefficients (`lanes_post`). Any dtype (fp64 stays fp64, for gradcheck).
  `lanes_pre_projected` also folds mHC's logit projection (RMSNorm(vec h) φ)
  into its Function, so its backward builds dh in one buffer. On a CPU the
  face's cost per site at small d is the ~290 small ops of the 20-iteration
  Sinkhorn (forward 2 a half-step, recompute 2, backward 3: per-op overhead,
  whatever the token count) and ~24 reads or writes of an [N, n, d] tensor
  (the lanes or their gradient; memory-bound); benchmarks/lanes.py --profile
  shows the split.
- "triton": the same two Functions with Triton kernels (`_triton_lanes.py`):
  `lanes_pre` computes the activations, the Sinkhorn projection and u in one
  pass over h; `lanes_post` the write; each backward is one kernel, the
  Sinkhorn backward recomputing the scalings in registers. Computes in fp32
  whatever the storage dtype. Runs on CUDA, and on CPU tensors when
  TRITON_INTERPRET=1 was set before triton was imported (tests).
- `lanes_pre` / `lanes_pre_projected` / `lanes_post` / `sinkhorn` (impl="auto"):
  triton on CUDA for fp32 / bf16 / fp16 and n ≤ TRITON_MAX_LANES, the torch face
  elsewhere (`lanes_pre_projected` on triton: the projection with autograd,
  then the fused `lanes_pre`).

Shapes: h [..., n, d]; logits [..., 2n + n²] (any leading dims that broadcast
to h's, e.g. [2n + n²] for static coefficients); y [..., d]. `lanes_pre`
returns (u [..., d] in h's dtype, post [..., n], res [..., n, n] in fp32 —
fp64 for fp64 logits); `lanes_post` returns h' [..., n, d] in h's dtype.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "ACTS", "IMPLS", "TRITON_MAX_LANES", "coefficient_count", "lanes_coefficients_reference", "lanes_post",
    "lanes_post_reference", "lanes_pre", "lanes_pre_projected", "lanes_pre_reference", "projected_logits_reference",
    "sinkhorn", "sinkhorn_reference", "split_logits",
]

ACTS = ("mhc", "identity")
IMPLS = ("auto", "reference", "torch", "triton")
TRITON_MAX_LANES = 16
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def coefficient_count(n: int) -> int:
    """Logits per token for n lanes: pre (n) + post (n) + res (n·n)."""
    return 2 * n + n * n


def _acc(*xs: torch.Tensor) -> torch.dtype:
    """The dtype the torch faces compute in: fp64 if any input is fp64, else fp32."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check_iters(iters: int) -> None:
    if int(iters) != iters or iters < 1:
        raise ValueError(f"sinkhorn: iters must be a positive integer, got {iters!r}")


def _check_act(act: str) -> None:
    if act not in ACTS:
        raise ValueError(f"lanes: act must be one of {', '.join(ACTS)}, got {act!r}")


def split_logits(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., 2n + n²] -> pre [..., n], post [..., n], res [..., n, n] (views)."""
    if logits.shape[-1] != coefficient_count(n):
        raise ValueError(f"lanes: {n} lanes take {coefficient_count(n)} coefficient logits per token "
                         f"(pre n, post n, res n·n), got {logits.shape[-1]}")
    return logits[..., :n], logits[..., n:2 * n], logits[..., 2 * n:].unflatten(-1, (n, n))


# ----------------------------------------------------------------------------- reference


def sinkhorn_reference(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """M⁰ = exp(L), then `iters` times: columns divided by their sums, then rows. [..., n, n] -> [..., n, n]."""
    _check_iters(iters)
    m = logits.to(_acc(logits))
    m = torch.exp(m - m.amax(dim=(-2, -1), keepdim=True).detach())  # a constant factor: cancels exactly
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)  # column sums -> 1
        m = m / m.sum(dim=-1, keepdim=True)  # row sums -> 1
    return m


def lanes_coefficients_reference(logits: torch.Tensor, n: int, act: str = "mhc", iters: int = 20):
    """(pre [..., n], post [..., n], res [..., n, n]) from the logits, with plain autograd."""
    _check_act(act)
    pre, post, res = split_logits(logits.to(_acc(logits)), n)
    if act == "identity":
        return pre, post, res
    return torch.sigmoid(pre), 2.0 * torch.sigmoid(post), sinkhorn_reference(res, iters)


def lanes_pre_reference(h: torch.Tensor, logits: torch.Tensor, *, act: str = "mhc", iters: int = 20):
    """u = Σ_i pre_i h_i; returns (u, post, res)."""
    pre, post, res = lanes_coefficients_reference(logits, h.shape[-2], act, iters)
    u = (pre[..., :, None] * h.to(pre.dtype)).sum(dim=-2)
    return u.to(h.dtype), post, res


def lanes_post_reference(h: torch.Tensor, y: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """h'_i = Σ_j res_ij h_j + post_i y."""
    acc = _acc(h, y, post, res)
    mixed = (res.to(acc)[..., :, :, None] * h.to(acc)[..., None, :, :]).sum(dim=-2)
    return (mixed + post.to(acc)[..., :, None] * y.to(acc)[..., None, :]).to(h.dtype)


def projected_logits_reference(h: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                               norm_eps: float = 1e-6) -> torch.Tensor:
    """mHC's logits from the lanes: scale ⊙ (RMSNorm(vec h) weight) + bias, [..., n, d] -> [..., C].

    weight [n·d, C] (the norm's gain folded in), scale and bias [C]. As the paper's fused form: the
    matmul runs on the raw vec h (in h's dtype), then is divided by its RMS."""
    acc = _acc(h, weight)
    x = h.flatten(-2)
    rms = torch.sqrt(x.to(acc).square().mean(dim=-1, keepdim=True) + norm_eps)
    return (x @ weight.to(h.dtype)).to(acc) / rms * scale.to(acc) + bias.to(acc)


# ----------------------------------------------------------------------------- torch face


def _lanes_first(x: torch.Tensor) -> torch.Tensor:
    """[..., n, n] -> [n, n, N] contiguous: the torch face's Sinkhorn runs with tokens innermost, so each
    normalisation over i or j is one vectorised pass over the tokens (10x faster on CPU than over a middle
    dim of 4)."""
    return x.reshape(-1, *x.shape[-2:]).permute(1, 2, 0).contiguous()


def _tokens_first(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return x.permute(2, 0, 1).reshape(shape)


def _column_exp(L: torch.Tensor) -> torch.Tensor:
    """K = exp(L - max of each column) for L [n(i), n(j), N]: the Sinkhorn output does not see per-column factors."""
    return torch.exp(L - L.amax(dim=0, keepdim=True))


def _sinkhorn_forward(L: torch.Tensor, iters: int) -> torch.Tensor:
    M = _column_exp(_lanes_first(L))
    for _ in range(iters):
        M.div_(M.sum(dim=0, keepdim=True))  # columns
        M.div_(M.sum(dim=1, keepdim=True))  # rows
    return _tokens_first(M, L.shape)


def _sinkhorn_backward(L: torch.Tensor, G: torch.Tensor, iters: int) -> torch.Tensor:
    """dL from dM = G, running the 2·iters steps M_k = M_{k-1} / s_k (s_k: M_{k-1} summed over axis k % 2,
    the columns first) backwards; the iterates are recomputed here.

    A step's backward is dM_{k-1} = e_k / s_k with e_k = dM_k - Σ_axis dM_k ⊙ M_k. Since M_{k-1} = s_k M_k,
    the next sum needs no dM_{k-1}: e_{k-1} = e_k / s_k - Σ_axis' e_k ⊙ M_k (three ops a step), and
    dL = dK ⊙ K = e_1 ⊙ M_1 through K = exp(L - colmax), whose max needs no gradient."""
    M = _column_exp(_lanes_first(L))
    steps = []
    for k in range(2 * iters):
        s = M.sum(dim=k % 2, keepdim=True)
        M = M / s
        steps.append((M, s))
    grad = _lanes_first(G)
    M, s = steps[-1]
    e = grad - (grad * M).sum(dim=(2 * iters - 1) % 2, keepdim=True)  # e for the last (row) step
    sign = 1.0
    for k in reversed(range(1, 2 * iters)):  # steps[k] is step k + 1; e holds sign · e_{k+1}
        M, s = steps[k]
        # sign · (e / s - Σ e ⊙ M) = -(sign · (Σ e ⊙ M - e / s)): addcdiv gives Σ e ⊙ M - e / s in one op
        e = torch.addcdiv((e * M).sum(dim=(k - 1) % 2, keepdim=True), e, s, value=-1.0)
        sign = -sign
    return _tokens_first(e * steps[0][0] * sign, L.shape)


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, iters):
        L = logits.to(_acc(logits))
        ctx.save_for_backward(L)
        ctx.iters = iters
        return _sinkhorn_forward(L, iters)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (L,) = ctx.saved_tensors
        return _sinkhorn_backward(L, grad.to(L.dtype), ctx.iters), None


def _dense(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`, contiguous: what CPU bmm needs for its batched path."""
    return x.to(dtype).contiguous()


class _TorchFace:
    """The torch face's forward and backward pieces on flat [N, n, d] tensors.

    Every mix is one batched matmul over the tokens with contiguous (or last-two-dims
    transposed) operands: with permuted or stride-0 operands (an einsum's, an expanded
    gradient's) CPU bmm loops over the N tiny matrices one by one, and broadcast
    multiply-adds would cost n passes over [N, n, d]. A matrix-vector product per token
    is written with the vector as the row ([1, d] @ [d, n]): the column form
    ([n, d] @ [d, 1]) runs 3x slower on CPU."""

    @staticmethod
    def pre_forward(h, logits, act, iters):
        n = h.shape[1]
        acc = _acc(h, logits)
        pre, post, res = split_logits(logits.to(acc), n)
        if act == "mhc":
            pre, post, res = torch.sigmoid(pre), 2.0 * torch.sigmoid(post), _sinkhorn_forward(res, iters)
        u = torch.bmm(_dense(pre, acc).unsqueeze(1), _dense(h, acc)).squeeze(1)  # logits may be shared (stride 0)
        return u.to(h.dtype), post.contiguous(), res.contiguous()

    @staticmethod
    def pre_backward(h, logits, du, dpost, dres, act, iters, dh):
        """Writes dh (a [N, n, d] buffer) and returns dlogits."""
        n = h.shape[1]
        acc = _acc(h, logits)
        pre_l, post_l, res_l = split_logits(logits.to(acc), n)
        pre = torch.sigmoid(pre_l) if act == "mhc" else pre_l
        g = _dense(du, acc)
        torch.mul(pre.to(acc).unsqueeze(2), g.unsqueeze(1), out=dh)  # pre_i du: an outer product, not a bmm
        dpre = torch.bmm(g.unsqueeze(1), _dense(h, acc).transpose(1, 2)).squeeze(1)  # <h_i, du>, du as the row
        dpost, dres = dpost.to(acc), dres.to(acc)
        if act == "mhc":
            s_pre, s_post = torch.sigmoid(pre_l), torch.sigmoid(post_l)
            dpre = dpre * s_pre * (1.0 - s_pre)
            dpost = dpost * 2.0 * s_post * (1.0 - s_post)
            dres = _sinkhorn_backward(res_l, dres, iters)
        dlogits = torch.cat((dpre, dpost, dres.flatten(-2)), dim=-1)
        return dlogits.to(logits.dtype)

    @staticmethod
    def post_forward(h, y, post, res, out):
        """Writes h' into out (a [N, n, d] buffer)."""
        acc = _acc(h, y, post, res)
        if out.dtype == acc:
            torch.bmm(_dense(res, acc), _dense(h, acc), out=out)
            out.addcmul_(post.to(acc).unsqueeze(2), y.to(acc).unsqueeze(1))
        else:
            mixed = torch.bmm(_dense(res, acc), _dense(h, acc))
            out.copy_(mixed.addcmul_(post.to(acc).unsqueeze(2), y.to(acc).unsqueeze(1)))

    @staticmethod
    def post_backward(h, y, post, res, dout, dh):
        """Writes dh (a [N, n, d] buffer) and returns (dy, dpost, dres)."""
        acc = _acc(h, y, post, res)
        g = _dense(dout, acc)
        res_t = _dense(res, acc).transpose(1, 2)
        if dh.dtype == acc:
            torch.bmm(res_t, g, out=dh)  # dh_j = Σ_i res_ij g_i
        else:
            dh.copy_(torch.bmm(res_t, g))
        dy = torch.bmm(_dense(post, acc).unsqueeze(1), g).squeeze(1)
        dpost = torch.bmm(_dense(y, acc).unsqueeze(1), g.transpose(1, 2)).squeeze(1)  # <g_i, y>, y as the row
        dres = torch.bmm(g, _dense(h, acc).transpose(1, 2))  # <g_i, h_j>
        return dy.to(y.dtype), dpost.to(post.dtype), dres.to(res.dtype)


# ----------------------------------------------------------------------------- triton face


@functools.cache
def triton_available() -> bool:
    """triton is importable (CPU tensors still need TRITON_INTERPRET=1 set before the import)."""
    return importlib.util.find_spec("triton") is not None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _triton_blocks(h: torch.Tensor, n: int) -> tuple[int, int, int]:
    """(BLOCK_T tokens, BLOCK_D channels, NP padded lanes) per program."""
    lanes = max(2, _next_pow2(n))
    if h.device.type != "cuda":  # interpreter: small tiles, so tests cover partial ones
        return 4, 16, lanes
    block_t = 16 if lanes <= 4 else 8 if lanes <= 8 else 2
    block_d = max(16, min(128, 8192 // (block_t * lanes), _next_pow2(h.shape[-1])))
    return block_t, block_d, lanes


class _TritonFace:
    """The Triton face: the same pieces as _TorchFace, each one kernel launch."""

    @staticmethod
    def _kernels():
        # lazy: TRITON_INTERPRET is read when the kernels are defined
        from archc.kernels import _triton_lanes

        return _triton_lanes

    @staticmethod
    def pre_forward(h, logits, act, iters):
        N, n, d = h.shape
        u = torch.empty((N, d), dtype=h.dtype, device=h.device)
        post = torch.empty((N, n), dtype=torch.float32, device=h.device)
        res = torch.empty((N, n, n), dtype=torch.float32, device=h.device)
        if N == 0:
            return u, post, res
        bt, bd, lanes = _triton_blocks(h, n)
        kern = _TritonFace._kernels()._lanes_pre_fwd
        kern[(triton_cdiv(N, bt),)](
            h, logits, u, post, res, N, d, iters, *h.stride(), *logits.stride(), *u.stride(),
            LANES=n, NP=lanes, MHC=act == "mhc", BLOCK_T=bt, BLOCK_D=bd, num_warps=4)
        return u, post, res

    @staticmethod
    def pre_backward(h, logits, du, dpost, dres, act, iters, dh):
        N, n, d = h.shape
        dlogits = torch.empty((N, coefficient_count(n)), dtype=torch.float32, device=h.device)
        if N == 0:
            return dlogits.to(logits.dtype)
        bt, bd, lanes = _triton_blocks(h, n)
        dpost, dres = dpost.float().contiguous(), dres.float().contiguous()
        kern = _TritonFace._kernels()._lanes_pre_bwd
        kern[(triton_cdiv(N, bt),)](
            h, logits, du, dpost, dres, dh, dlogits, N, d, iters, *h.stride(), *logits.stride(), *du.stride(),
            *dh.stride(), LANES=n, NP=lanes, MHC=act == "mhc", BLOCK_T=bt, BLOCK_D=bd,
            ITP=max(2, _next_pow2(iters)), num_warps=4)
        return dlogits.to(logits.dtype)

    @staticmethod
    def post_forward(h, y, post, res, out):
        N, n, d = h.shape
        if N == 0:
            return
        bt, bd, lanes = _triton_blocks(h, n)
        post, res = post.contiguous(), res.contiguous()
        kern = _TritonFace._kernels()._lanes_post_fwd
        kern[(triton_cdiv(N, bt),)](
            h, y, post, res, out, N, d, *h.stride(), *y.stride(), *out.stride(),
            LANES=n, NP=lanes, BLOCK_T=bt, BLOCK_D=bd, num_warps=4)

    @staticmethod
    def post_backward(h, y, post, res, dout, dh):
        N, n, d = h.shape
        dy = torch.empty((N, d), dtype=y.dtype, device=h.device)
        dpost = torch.empty((N, n), dtype=torch.float32, device=h.device)
        dres = torch.empty((N, n, n), dtype=torch.float32, device=h.device)
        if N == 0:
            return dy, dpost.to(post.dtype), dres.to(res.dtype)
        bt, bd, lanes = _triton_blocks(h, n)
        post, res = post.contiguous(), res.contiguous()
        kern = _TritonFace._kernels()._lanes_post_bwd
        kern[(triton_cdiv(N, bt),)](
            h, y, post, res, dout, dh, dy, dpost, dres, N, d, *h.stride(), *y.stride(), *dout.stride(),
            *dh.stride(), *dy.stride(), LANES=n, NP=lanes, BLOCK_T=bt, BLOCK_D=bd, num_warps=4)
        return dy, dpost.to(post.dtype), dres.to(res.dtype)



def _check_triton(h: torch.Tensor, n: int) -> None:
    if not triton_available():
        raise RuntimeError("lanes: impl='triton' needs triton installed")
    if n > TRITON_MAX_LANES:
        raise ValueError(f"lanes: the Triton kernels take at most {TRITON_MAX_LANES} lanes, got {n}")
    if h.device.type == "cuda":
        return
    if h.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise RuntimeError(f"lanes: impl='triton' on {h.device} needs CUDA tensors, or TRITON_INTERPRET=1 set "
                       "before triton is imported (the CPU interpreter)")


# ----------------------------------------------------------------------------- autograd + dispatch


def _lanes_like(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh tensor shaped as h [..., n, d] and its [N, n, d] view for the faces to fill.

    The Functions take h in its own shape and return such tensors themselves (a new lane state, the
    gradient of one), not views of flat ones: autograd sums the read's and the write's gradient of a
    lane state into one of them in place (it reuses only a buffer that is no view) instead of
    allocating the sum."""
    t = torch.empty(h.shape, dtype=h.dtype, device=h.device)
    return t, t.view(-1, *h.shape[-2:])


class _LanesPre(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, logits, act, iters, face):
        u, post, res = face.pre_forward(_flat_lanes(h), logits, act, iters)
        ctx.save_for_backward(h, logits)  # coefficients are recomputed in the backward
        ctx.act, ctx.iters, ctx.face = act, iters, face
        return u, post, res

    @staticmethod
    @once_differentiable
    def backward(ctx, du, dpost, dres):
        h, logits = ctx.saved_tensors
        dh, dh_flat = _lanes_like(h)
        dlogits = ctx.face.pre_backward(_flat_lanes(h), logits, du, dpost, dres, ctx.act, ctx.iters, dh_flat)
        return dh, dlogits, None, None, None


class _LanesPost(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, y, post, res, face):
        ctx.save_for_backward(h, y, post, res)
        ctx.face = face
        out, out_flat = _lanes_like(h)
        face.post_forward(_flat_lanes(h), y, post, res, out_flat)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        h, y, post, res = ctx.saved_tensors
        dh, dh_flat = _lanes_like(h)
        dy, dpost, dres = ctx.face.post_backward(_flat_lanes(h), y, post, res, dout.reshape(dh_flat.shape), dh_flat)
        return dh, dy, dpost, dres, None


class _LanesPreProjected(torch.autograd.Function):
    """The torch face of `lanes_pre_projected`: the logits' projection and norm, the coefficients and the
    read in one Function. Its backward writes dh once (pre ⊗ du, then the projection's and the norm's
    terms added in place) where autograd would sum three [N, n, d] gradients, and the logits' small ops
    stay out of the graph. Saves h, the projection and the logits ([N, C] each) and 1/rms [N]."""

    @staticmethod
    def forward(ctx, h, weight, scale, bias, norm_eps, iters):
        hf = _flat_lanes(h)
        N, n, d = hf.shape
        acc = _acc(h, weight)
        x = hf.reshape(N, n * d)
        raw = torch.mm(x, weight.to(h.dtype)).to(acc)  # vec h · φ, normalised after (the paper's fused form)
        inv_rms = torch.rsqrt(torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=acc).square_() / (n * d)
                              + norm_eps)
        logits = torch.addcmul(bias.to(acc), raw, inv_rms * scale.to(acc))
        u, post, res = _TorchFace.pre_forward(hf, logits, "mhc", iters)
        ctx.save_for_backward(h, weight, scale, raw, logits, inv_rms)
        ctx.iters = iters
        ctx.dtypes = (weight.dtype, scale.dtype, bias.dtype)
        return u, post, res

    @staticmethod
    @once_differentiable
    def backward(ctx, du, dpost, dres):
        h, weight, scale, raw, logits, inv_rms = ctx.saved_tensors
        hf = _flat_lanes(h)
        N, n, d = hf.shape
        dh, dh_flat = _lanes_like(h)
        dlogits = _TorchFace.pre_backward(hf, logits, du, dpost, dres, "mhc", ctx.iters, dh_flat)  # dh = pre ⊗ du
        acc = dlogits.dtype
        # logits = raw · (inv_rms · scale) + bias
        dscaled = dlogits * scale.to(acc)
        draw = dscaled * inv_rms
        dscale = (dlogits * raw * inv_rms).sum(dim=0)
        dbias = dlogits.sum(dim=0)
        # inv_rms = (Σx² / nd + eps)^(-1/2): d inv_rms / dx = -inv_rms³ x / nd
        dx_coef = (dscaled * raw).sum(dim=-1, keepdim=True) * inv_rms.pow(3) * (-1.0 / (n * d))
        x = hf.reshape(N, n * d)
        dx = dh_flat.view(N, n * d)  # the projection's and the norm's terms are added in place
        dx.addmm_(draw.to(h.dtype), weight.to(h.dtype).t())
        dx.addcmul_(x, dx_coef.to(h.dtype))
        # xᵀ draw as (drawᵀ x)ᵀ: the same product, 1.5x faster on CPU with the 2n + n² columns as rows
        dweight = torch.mm(draw.to(h.dtype).t(), x).t() if ctx.needs_input_grad[1] else None
        wd, sd, bd = ctx.dtypes
        return (dh, None if dweight is None else dweight.to(wd), dscale.to(sd), dbias.to(bd), None, None)


def _resolve(impl: str, h: torch.Tensor, n: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"lanes: impl must be one of {', '.join(IMPLS)}, got {impl!r}")
    if impl != "auto":
        if impl == "triton":
            _check_triton(h, n)
        return impl
    if h.is_cuda and h.dtype in _TRITON_DTYPES and n <= TRITON_MAX_LANES and triton_available():
        return "triton"
    return "torch"


_FACES = {"torch": _TorchFace, "triton": _TritonFace}


def _flat_lanes(h: torch.Tensor) -> torch.Tensor:
    if h.dim() < 2:
        raise ValueError(f"lanes: h must be [..., n, d], got {tuple(h.shape)}")
    return h.reshape(-1, h.shape[-2], h.shape[-1])


def lanes_pre(h: torch.Tensor, logits: torch.Tensor, *, act: str = "mhc", iters: int = 20, impl: str = "auto"):
    """Coefficients from the logits and the read u = Σ_i pre_i h_i: (u [..., d], post [..., n], res [..., n, n])."""
    _check_act(act)
    _check_iters(iters)
    n = h.shape[-2]
    face = _resolve(impl, h, n)
    if face == "reference":
        return lanes_pre_reference(h, logits, act=act, iters=iters)
    lead = h.shape[:-2]
    logits = logits.expand(*lead, logits.shape[-1]).reshape(-1, logits.shape[-1])  # stride 0 for shared logits
    split_logits(logits, n)  # shape check
    _flat_lanes(h)  # shape check
    u, post, res = _LanesPre.apply(h, logits, act, iters, _FACES[face])
    return u.view(*lead, h.shape[-1]), post.view(*lead, n), res.view(*lead, n, n)


def lanes_pre_projected(h: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, *,
                        norm_eps: float = 1e-6, iters: int = 20, impl: str = "auto"):
    """mHC's read with its logits projected from the lanes (`projected_logits_reference`): the same outputs as
    `lanes_pre(h, projected_logits_reference(h, weight, scale, bias, norm_eps), act="mhc", ...)`.

    The torch face runs the projection, the coefficients and the read as one autograd Function;
    the reference and Triton faces compute the logits with autograd and call `lanes_pre`."""
    _check_iters(iters)
    n, d = h.shape[-2], h.shape[-1]
    if weight.shape != (n * d, coefficient_count(n)) or scale.shape != (coefficient_count(n),) \
            or bias.shape != (coefficient_count(n),):
        raise ValueError(f"lanes_pre_projected: h {tuple(h.shape)} wants weight [{n * d}, {coefficient_count(n)}], "
                         f"scale and bias [{coefficient_count(n)}]; got {tuple(weight.shape)}, "
                         f"{tuple(scale.shape)}, {tuple(bias.shape)}")
    face = _resolve(impl, h, n)
    if face != "torch":
        return lanes_pre(h, projected_logits_reference(h, weight, scale, bias, norm_eps), act="mhc", iters=iters,
                         impl=face)
    lead = h.shape[:-2]
    u, post, res = _LanesPreProjected.apply(h, weight, scale, bias, norm_eps, iters)
    return u.view(*lead, d), post.view(*lead, n), res.view(*lead, n, n)


def lanes_post(h: torch.Tensor, y: torch.Tensor, post: torch.Tensor, res: torch.Tensor, *,
               impl: str = "auto") -> torch.Tensor:
    """The write h'_i = Σ_j res_ij h_j + post_i y: [..., n, d]."""
    n, d = h.shape[-2], h.shape[-1]
    lead = h.shape[:-2]
    if y.shape != (*lead, d) or post.shape[-1:] != (n,) or res.shape[-2:] != (n, n):
        raise ValueError(f"lanes_post: h {tuple(h.shape)} wants y [..., {d}], post [..., {n}], res [..., {n}, {n}]; "
                         f"got {tuple(y.shape)}, {tuple(post.shape)}, {tuple(res.shape)}")
    face = _resolve(impl, h, n)
    if face == "reference":
        return lanes_post_reference(h, y, post, res)
    return _LanesPost.apply(h, y.reshape(-1, d), post.expand(*lead, n).reshape(-1, n),
                            res.expand(*lead, n, n).reshape(-1, n, n), _FACES[face])


def sinkhorn(logits: torch.Tensor, iters: int = 20, *, impl: str = "auto") -> torch.Tensor:
    """Sinkhorn–Knopp projection of exp(logits) [..., n, n]; "reference" or "torch" (auto: torch).

    The Triton face of the projection is fused into `lanes_pre` (its `res` output with act="mhc")."""
    _check_iters(iters)
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn: logits must be [..., n, n], got {tuple(logits.shape)}")
    if impl == "reference":
        return sinkhorn_reference(logits, iters)
    if impl in ("auto", "torch"):
        return _Sinkhorn.apply(logits, iters)
    raise ValueError(f"sinkhorn: impl must be auto, reference or torch (Triton runs fused in lanes_pre), got {impl!r}")
