"""Residual lanes, as generated code calls them: `lanes(x, n=4, rule="mhc")` … `merge_lanes(x)` (algorithms.md §2).

Between `lanes` and `merge_lanes` the residual stream is n lanes wide,
h [B, T, n, d]. Blocks keep their plain `x += F(x)`; each such residual update
site gets its own `Lanes` module and becomes

    u, mix = site.read(h)          # u [B, T, d]: F's input, a learned mix of the lanes (H_pre)
    h = site.write(h, F(u), mix)   # h'_i = Σ_j res_ij h_j + post_i F(u)   (H_res, H_post)

and the region's ends are `expand_lanes(x, n)` (n copies of the stream) and
`merge_lanes(h)` (the mean of the lanes). Rules, chosen in one argument:

- "plain" (n = 1): read h_0, write h + F(u): exactly a residual connection.
- "hc_static" (hyper-connections, Zhu et al.): learned constants pre = A_m,
  post = B, res = A_rᵀ; initialised to A_m = e_{site mod n}, A_r = I, B = 1,
  the paper's init that reproduces the pre-norm residual.
- "hc_dynamic": the static constants plus per-token terms from each lane's
  RMS-normalised state h̄_i: A_m += s_α tanh(h̄_i W_m), A_r[i, :] += s_α tanh(h̄_i W_r),
  B_i += s_β tanh(h̄_i W_β); W zero-initialised, s_α = s_β = 0.01.
- "mhc" (Xie et al., DeepSeek): from the flattened, RMS-normalised lanes x̄
  [n·d], logits H̃ = α ⊙ (x̄ φ) + b for [pre | post | res]; pre = σ, post = 2σ,
  res = Sinkhorn–Knopp (`iters`, default 20). Computed as the paper's fused
  form does: the matmul on the raw lanes, then divided by their RMS.
  Init: φ = 0, α = 0.01 (the paper's gating factor); the bias is chosen so
  that a fresh model equals its plain counterpart — the paper's b init is not
  public (algorithms.md §10.2) — as HC's static init does: pre = 1 − (n−1)ε
  on lane site mod n and ε on the others (Σ pre = 1, and the lanes'
  symmetry is broken as HC's one-hot does), post = 1 (b = 0), and res with
  diagonal 1 − (n−1)ε and ε elsewhere (doubly stochastic; logits log(q/ε)
  on the diagonal, 0 off it). While all lanes are equal, any row-stochastic
  res keeps them equal and Σ pre = 1 reads exactly that stream, so every
  branch sees what it sees without lanes. ε = `init_eps` (0.01).

With all lanes equal to the plain stream x at init, every read returns x and
every write adds F(x) to every lane, so the merged mean is the plain model's
stream: hc_static / hc_dynamic exactly, mhc to rounding.

Memory. The mixing kernels (archc.kernels.lanes) save only their inputs: h,
the logits, y and the small coefficients; the Sinkhorn iterates are
recomputed in the backward. So each site keeps one n·d lane state per token.
`recompute=True` is the mHC paper's recomputation: only every `segment`-th
lane state is kept; the others are rebuilt in the backward from the last
kept one by re-running the writes (h' = res h + post y, from the saved y and
coefficients — the branches F are not re-run). Per site that leaves y (d),
the logits and coefficients (3n + 2n²) per token, plus n·d / segment.

Decoding: the mixing is per token, so caches and mixer states inside lanes
work unchanged (each call mixes its own tokens).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from archc.kernels.lanes import (
    coefficient_count,
    lanes_post,
    lanes_pre,
    lanes_pre_projected,
    projected_logits_reference,
)

__all__ = ["MERGES", "RULES", "Lanes", "expand_lanes", "merge_lanes"]

RULES = ("plain", "hc_static", "hc_dynamic", "mhc")
MERGES = ("mean", "sum")


def expand_lanes(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., d] -> [..., n, d]: n copies of the stream (contiguous, so sites can flatten lanes for free)."""
    if n == 1:
        return x.unsqueeze(-2)
    return x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1]).contiguous()


def merge_lanes(h: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """[..., n, d] -> [..., d]: the mean (default) or the sum of the lanes (lucidrains / HC's reduce)."""
    if how not in MERGES:
        raise ValueError(f"merge_lanes: how must be one of {', '.join(MERGES)}, got {how!r}")
    if h.shape[-2] == 1:
        return h.squeeze(-2)
    return h.mean(dim=-2) if how == "mean" else h.sum(dim=-2)


# ----------------------------------------------------------------------------- recompute


class _Rebuild:
    """A lane state the backward rebuilds instead of keeping: h = lanes_post(source, y, post, res)."""

    def __init__(self, source, y, post, res, impl: str, depth: int) -> None:
        self.source = source  # the previous lane state (a kept tensor) or its _Rebuild
        self.y, self.post, self.res, self.impl, self.depth = y, post, res, impl, depth
        self.cache: torch.Tensor | None = None
        self.uses = 0  # saved references not yet unpacked: the cache is dropped at 0

    def tensor(self) -> torch.Tensor:
        if self.cache is None:
            source = self.source.tensor() if isinstance(self.source, _Rebuild) else self.source
            with torch.no_grad():  # the same kernel on the same inputs: bit-identical to the forward
                self.cache = lanes_post(source, self.y, self.post, self.res, impl=self.impl)
        return self.cache


class _Saved:
    """What a saved view of a rebuilt lane state is packed as: the recipe and the view's geometry."""

    __slots__ = ("offset", "rebuild", "shape", "stride")

    def __init__(self, rebuild: _Rebuild, t: torch.Tensor) -> None:
        self.rebuild, self.shape, self.stride, self.offset = rebuild, t.shape, t.stride(), t.storage_offset()


_REBUILD_ATTR = "_archc_lane_rebuild"


@contextlib.contextmanager
def _rebuilt_in_backward(h: torch.Tensor):
    """While active, tensors saved for backward that share h's storage are packed as h's recipe."""
    rebuild = getattr(h, _REBUILD_ATTR, None)
    if rebuild is None:
        yield
        return
    storage = h.untyped_storage().data_ptr()

    def pack(t: torch.Tensor):
        if t.device == h.device and t.untyped_storage().data_ptr() == storage:
            rebuild.uses += 1
            return _Saved(rebuild, t)
        return t

    def unpack(saved):
        if not isinstance(saved, _Saved):
            return saved
        base = saved.rebuild.tensor()
        saved.rebuild.uses -= 1
        if saved.rebuild.uses <= 0:
            saved.rebuild.cache = None
        return base.as_strided(saved.shape, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# ----------------------------------------------------------------------------- the site module


class Lanes(nn.Module):
    """The lanes around one residual update site: `read` its branch input, `write` its output back.

    n lanes of width d_model; `rule` in RULES; `site` is the index of the
    residual update in the region (it picks the lane the static inits read).
    `iters`: Sinkhorn–Knopp iterations (mhc). `init_eps`: see the module doc.
    `impl`: the mixing kernels' face ("auto", "reference", "torch", "triton").
    `recompute`, `segment`: rebuild lane states in the backward (module doc).
    """

    def __init__(self, n: int, rule: str, d_model: int, *, site: int = 0, iters: int = 20, init_eps: float = 0.01,
                 norm_eps: float = 1e-6, merge: str = "mean", impl: str = "auto", recompute: bool = False,
                 segment: int = 4) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"lanes: rule must be one of {', '.join(RULES)}, got {rule!r}")
        if int(n) != n or n < 1:
            raise ValueError(f"lanes: n must be a positive integer, got {n!r}")
        if rule == "plain" and n != 1:
            raise ValueError(f"lanes: rule 'plain' is the ordinary residual and takes n = 1, got n = {n}")
        if rule == "mhc" and n < 2:
            raise ValueError("lanes: rule 'mhc' needs n >= 2 (σ-bounded pre cannot read one lane exactly); "
                             "use rule 'plain' for n = 1")
        if merge not in MERGES:
            raise ValueError(f"lanes: merge must be one of {', '.join(MERGES)}, got {merge!r}")
        if not 0.0 < init_eps < 1.0 / n and rule == "mhc":
            raise ValueError(f"lanes: init_eps must lie in (0, 1/n) = (0, {1.0 / n:g}), got {init_eps!r}")
        if int(segment) != segment or segment < 1:
            raise ValueError(f"lanes: segment must be a positive integer, got {segment!r}")
        self.n, self.rule, self.d_model, self.site = int(n), rule, int(d_model), int(site)
        self.iters, self.init_eps, self.norm_eps, self.merge_how = int(iters), float(init_eps), norm_eps, merge
        self.impl, self.recompute, self.segment = impl, bool(recompute), int(segment)
        n, d, k = self.n, self.d_model, self.site % self.n
        if rule in ("hc_static", "hc_dynamic"):
            self.pre = nn.Parameter(torch.zeros(n).index_fill_(0, torch.tensor([k]), 1.0))  # A_m = e_k
            self.post = nn.Parameter(torch.ones(n))  # B = 1
            self.res = nn.Parameter(torch.eye(n))  # A_rᵀ = I
        if rule == "hc_dynamic":
            self.norm_weight = nn.Parameter(torch.ones(d))  # the per-lane RMSNorm's gain
            self.dynamic = nn.Parameter(torch.zeros(d, n + 2))  # [W_m | W_r | W_β]
            self.scale_alpha = nn.Parameter(torch.tensor(0.01))
            self.scale_beta = nn.Parameter(torch.tensor(0.01))
        if rule == "mhc":
            self.norm_weight = nn.Parameter(torch.ones(n * d))  # γ of RMSNorm(vec h), folded into φ
            self.phi = nn.Parameter(torch.zeros(n * d, coefficient_count(n)))  # [φ_pre | φ_post | φ_res]
            self.alpha = nn.Parameter(torch.full((3,), 0.01))  # α_pre, α_post, α_res
            self.bias = nn.Parameter(self._plain_bias())

    def _plain_bias(self) -> torch.Tensor:
        """b for mhc: pre one-hot-ish summing to 1, post = 1, res near the identity (module doc)."""
        n, eps, k = self.n, self.init_eps, self.site % self.n
        q = 1.0 - (n - 1) * eps
        pre = torch.full((n,), math.log(eps / (1.0 - eps)))
        pre[k] = math.log(q / (1.0 - q))
        res = torch.eye(n) * math.log(q / eps)
        return torch.cat((pre, torch.zeros(n), res.flatten()))

    # -- the region's ends, for convenience: generated code may call them on any site ------------

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return expand_lanes(x, self.n)

    def merge(self, h: torch.Tensor) -> torch.Tensor:
        return merge_lanes(h, self.merge_how)

    # -- coefficients ------------------------------------------------------------------------------

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Per-token coefficient logits [..., 2n + n²] ([2n + n²] for hc_static): see archc.kernels.lanes."""
        n = self.n
        if self.rule == "hc_static":
            return torch.cat((self.pre, self.post, self.res.flatten()))
        acc = torch.float64 if h.dtype == torch.float64 else torch.float32
        if self.rule == "hc_dynamic":
            rms = torch.linalg.vector_norm(h, dim=-1, keepdim=True, dtype=acc) / math.sqrt(self.d_model)
            w = (self.norm_weight[:, None] * self.dynamic).to(h.dtype)
            raw = torch.tanh((h @ w).to(acc) / torch.sqrt(rms.square() + self.norm_eps))  # [..., n(i), n + 2]
            pre = self.pre + self.scale_alpha * raw[..., 0]
            res = self.res + self.scale_alpha * raw[..., 1:n + 1].transpose(-1, -2)  # A_r(H)[i, j] -> res[j, i]
            post = self.post + self.scale_beta * raw[..., n + 1]
            return torch.cat((pre, post, res.flatten(-2)), dim=-1)
        return projected_logits_reference(h, *self._projection(), self.norm_eps)

    def _projection(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """mhc's (weight, scale, bias) for the logits from vec h: γ folded into φ, α repeated per coefficient."""
        n, a = self.n, self.alpha
        scale = torch.cat((a[0].expand(n), a[1].expand(n), a[2].expand(n * n)))
        return self.norm_weight[:, None] * self.phi, scale, self.bias

    # -- read / write ------------------------------------------------------------------------------

    def read(self, h: torch.Tensor):
        """h [..., n, d] -> (u [..., d], mix): the branch input and what `write` needs."""
        if h.shape[-2:] != (self.n, self.d_model):
            raise ValueError(f"lanes: expected the lanes [..., {self.n}, {self.d_model}], got {tuple(h.shape)}")
        if self.rule == "plain":
            return h[..., 0, :], None
        with _rebuilt_in_backward(h):
            if self.rule == "mhc":
                u, post, res = lanes_pre_projected(h, *self._projection(), norm_eps=self.norm_eps, iters=self.iters,
                                                   impl=self.impl)
            else:
                u, post, res = lanes_pre(h, self.logits(h), act="identity", impl=self.impl)
        return u, (post, res)

    def write(self, h: torch.Tensor, y: torch.Tensor, mix) -> torch.Tensor:
        """The branch output y [..., d] back into the lanes: h'_i = Σ_j res_ij h_j + post_i y."""
        if self.rule == "plain":
            return h + y.unsqueeze(-2)
        post, res = mix
        with _rebuilt_in_backward(h):
            out = lanes_post(h, y, post, res, impl=self.impl)
        if self.recompute and torch.is_grad_enabled():
            previous = getattr(h, _REBUILD_ATTR, None)
            depth = previous.depth + 1 if previous is not None else 1
            if depth < self.segment:  # else `out` is kept: the next segment starts from it
                rebuild = _Rebuild(previous if previous is not None else h, y.detach(), post.detach(),
                                   res.detach(), self.impl, depth)
                setattr(out, _REBUILD_ATTR, rebuild)
        return out

    def forward(self, h: torch.Tensor, branch) -> torch.Tensor:
        """h with `branch` (a callable [..., d] -> [..., d]) applied as a residual update through the lanes."""
        u, mix = self.read(h)
        return self.write(h, branch(u), mix)

    # -- analysis ----------------------------------------------------------------------------------

    def mixing_flops_per_token(self) -> int:
        """Multiply-adds × 2 of the lane mixing at this site per token (not counting F).

        read 2nd; write 2n²d + 2nd; coefficients: hc_dynamic the lanes' norms and
        the [d, n+2] projection (2nd + 2nd(n+2)), mhc the norm and the
        [nd, 2n+n²] projection (2nd + 2nd(2n+n²)) plus Sinkhorn's 2 matrix-vector
        products per iteration (4n² each step)."""
        n, d = self.n, self.d_model
        if self.rule == "plain":
            return d  # the residual add
        flops = 2 * n * d + 2 * n * n * d + 2 * n * d
        if self.rule == "hc_dynamic":
            flops += 2 * n * d + 2 * n * d * (n + 2)
        if self.rule == "mhc":
            flops += 2 * n * d + 2 * n * d * coefficient_count(n) + 4 * n * n * self.iters
        return flops

    def extra_repr(self) -> str:
        extra = f", iters={self.iters}" if self.rule == "mhc" else ""
        extra += f", recompute=True, segment={self.segment}" if self.recompute else ""
        return f"n={self.n}, rule={self.rule!r}, d_model={self.d_model}, site={self.site}{extra}"
