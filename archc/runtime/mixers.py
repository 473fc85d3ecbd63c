"""The linear-attention mixers' cores, as generated modules call them (`AF.GatedDeltaNetCore(...)`, ...).

A mixer in a spec (`linear_attn`, `ssd`, `gated_deltanet`, `kda`) compiles to
plain linears for its projections (fused by `fuse_projections`), a few
parameter-free activations, and one core module from this file that holds
what is not a projection — short convolutions, decay parameters, the output
norm — and calls a kernel from `archc.kernels` (docs/algorithms.md §3):

    LinearAttentionCore(q, k, v)              causal linear attention (Katharopoulos et al.)
    SSDCore(x, b, c, dt, z)                   Mamba-2: conv, SSD with scalar decay, D skip, gated RMSNorm
    GatedDeltaNetCore(q, k, v, a, beta, g)    Gated DeltaNet: conv, L2-norm q/k, per-head decay, RMSNorm * gate
    KDACore(q, k, v, f, beta, g)              Kimi Delta Attention: as GDN with a per-channel decay

Inputs and outputs are [B, T, width] streams; heads are split and merged here.
Parameter names follow FLA and mamba_ssm (`A_log`, `dt_bias`, `D`,
`q_conv1d`, `conv1d`, `o_norm`, `norm`) so their checkpoints map one to one.

Kernels: each core has a `kernel` chosen by the compiler's `choose_kernels`
pass: "reference" (the per-token recurrence), "chunked" (PyTorch chunkwise
form), "triton", "fla" (flash-linear-attention, CUDA only), or "auto" —
decided per call by the rule in `archc.kernels.registry`: Triton on CUDA,
chunked elsewhere, and the recurrence for single decoding steps.

Recurrent decoding: inside `with recurrent(model):` every core starts from an
empty state and keeps its state after each call — the recurrent state of the
kernel and the last `conv - 1` inputs of its short convolutions — so feeding a
prompt and then one token at a time gives the logits of the whole sequence.
`generate_recurrent(model, prompt, steps)` does exactly that. Causal
self-attention layers decode from their KV cache (`archc.runtime.decoding`),
so hybrids decode too; a layer that cannot (bidirectional or cross-attention,
whose generated class says `cannot_decode`) is refused by name.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from archc.kernels.delta_rule import delta_rule
from archc.kernels.linear_attention import elu_plus_one, linear_attention
from archc.kernels.registry import FAMILIES
from archc.kernels.ssd import ssd
from archc.runtime.decoding import Decoding, LearnedPositions, sample_next

__all__ = [
    "KERNELS",
    "FEATURE_MAPS",
    "MixerCore",
    "LinearAttentionCore",
    "SSDCore",
    "GatedDeltaNetCore",
    "KDACore",
    "causal_conv",
    "l2norm",
    "rms_norm",
    "recurrent",
    "generate_recurrent",
]

KERNELS = FAMILIES["delta_rule"].choices  # every mixer family has these faces (archc.kernels.registry)
FEATURE_MAPS = {"elu1": elu_plus_one, "relu": F.relu, "identity": lambda x: x}


# ----------------------------------------------------------------------------- helpers


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in fp32 (FLA's `l2norm`)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm(x: torch.Tensor, norm: nn.RMSNorm, groups: int = 1) -> torch.Tensor:
    """`norm` applied in fp32 over each of `groups` equal slices of the last dim; x's dtype out."""
    size = x.shape[-1] // groups
    y = F.rms_norm(x.float().unflatten(-1, (groups, size)), (size,), eps=norm.eps).flatten(-2)
    return (y * norm.weight.float()).to(x.dtype)


def causal_conv(x: torch.Tensor, conv: nn.Conv1d, cache: torch.Tensor | None = None):
    """SiLU of a causal depthwise convolution over time, and the decoding cache.

    x [B, T, C]; `cache` [B, K-1, C] holds the inputs before x (zeros at the
    start of a sequence). Returns (silu(conv(x)) [B, T, C], the last K-1 inputs).
    """
    width = conv.kernel_size[0]
    if cache is None:
        cache = x.new_zeros(x.shape[0], width - 1, x.shape[2])
    xp = torch.cat([cache.to(x.dtype), x], dim=1)
    y = F.conv1d(xp.transpose(1, 2), conv.weight, conv.bias, groups=x.shape[2]).transpose(1, 2)
    return F.silu(y), xp[:, xp.shape[1] - (width - 1):]


def _depthwise(channels: int, width: int, bias: bool) -> nn.Conv1d:
    """The weights of a depthwise convolution ([C, 1, K]; nn.Conv1d's default init, as FLA and mamba)."""
    return nn.Conv1d(channels, channels, width, groups=channels, bias=bias)


def _dt_bias(n: int, dt_min: float, dt_max: float, dt_floor: float) -> torch.Tensor:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] floored at dt_floor (Mamba-2, GDN, KDA)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    return dt + torch.log(-torch.expm1(-dt))


def _A_log(n: int, low: float, high: float) -> torch.Tensor:
    """log A with A ~ U(low, high) per head (the decay rate is exp(A_log))."""
    return torch.empty(n).uniform_(low, high).clamp(min=1e-4).log()


def _fla_kernel(module: str, name: str, x: torch.Tensor):
    """A flash-linear-attention kernel, or a clear error off CUDA or without FLA."""
    if not x.is_cuda:
        raise RuntimeError("kernel 'fla' (flash-linear-attention) runs on CUDA tensors only; "
                           "compile with --kernel PATTERN=chunked for the CPU")
    try:
        return getattr(__import__(module, fromlist=[name]), name)
    except ImportError as err:
        raise RuntimeError(f"kernel 'fla' needs flash-linear-attention (`pip install flash-linear-attention`): "
                           f"{err}") from None


# ----------------------------------------------------------------------------- base


class MixerCore(nn.Module):
    """What every core shares: its kernel and, while decoding, its recurrent state."""

    def __init__(self, kernel: str = "auto", chunk_size: int = 64) -> None:
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        self.chunk_size = chunk_size
        self.recurrent = False  # set by `recurrent(model)`
        self.state: dict[str, Any] | None = None  # kernel state and conv caches after the last call

    def impl(self, seq_len: int) -> str:
        """The kernel face for this call; "auto" leaves the device choice to the kernels' dispatchers."""
        if self.kernel == "auto" and self.recurrent and seq_len == 1:
            return "reference"  # one step of the recurrence: no chunk padding
        return self.kernel

    def carried(self, name: str):
        """The part `name` of the state carried from the previous call (None outside decoding)."""
        return (self.state or {}).get(name) if self.recurrent else None

    def keep(self, **parts: Any) -> None:
        if self.recurrent:
            self.state = parts

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}"


# ----------------------------------------------------------------------------- linear attention


class LinearAttentionCore(MixerCore):
    """o_t = S_t^T phi(q_t) / (z_t . phi(q_t)),  S_t = S_{t-1} + phi(k_t) v_t^T,  z_t = z_{t-1} + phi(k_t).

    q, k [B, T, H*K], v [B, T, H*V] -> [B, T, H*V]. `feature` is phi: "elu1"
    (elu + 1, Katharopoulos et al.), "relu" or "identity"; `normalize=False`
    drops the denominator (and then q is scaled by K^-1/2).
    """

    def __init__(self, heads: int, head_dim: int, value_dim: int | None = None, *, feature: str = "elu1",
                 normalize: bool = True, eps: float = 1e-6, kernel: str = "auto", chunk_size: int = 64) -> None:
        super().__init__(kernel, chunk_size)
        if feature not in FEATURE_MAPS:
            raise ValueError(f"feature must be one of {', '.join(FEATURE_MAPS)}, got {feature!r}")
        self.heads, self.head_dim, self.value_dim = heads, head_dim, value_dim or head_dim
        self.feature, self.normalize, self.eps = feature, normalize, eps

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, _ = q.shape
        H, K, V = self.heads, self.head_dim, self.value_dim
        phi = FEATURE_MAPS[self.feature]
        q, k, v = phi(q.view(B, T, H, K)), phi(k.view(B, T, H, K)), v.view(B, T, H, V)
        impl = self.impl(T)
        if impl == "fla":
            o, state = self._fla(q, k, v, self.carried("S"))
        else:
            o, state = linear_attention(q, k, v, initial_state=self.carried("S"), output_final_state=self.recurrent,
                                        normalize=self.normalize, eps=self.eps, chunk_size=self.chunk_size, impl=impl)
        self.keep(S=state)
        return o.reshape(B, T, H * V)

    def _fla(self, q, k, v, state):
        """FLA's chunk_linear_attn for the numerator; the normaliser (with its carried z) here, as the Triton face."""
        chunk_linear_attn = _fla_kernel("fla.ops.linear_attn", "chunk_linear_attn", q)
        S0, z0 = state if (state is not None and self.normalize) else (state, None)
        scale = self.head_dim ** -0.5
        num, S = chunk_linear_attn(q=q, k=k, v=v, scale=scale, initial_state=S0,
                                   output_final_state=self.recurrent, normalize=False)
        if not self.normalize:
            return num, S
        z = k.float().cumsum(1) + (0 if z0 is None else z0.float()[:, None])
        den = (q.float() * z).sum(-1, keepdim=True) * scale
        return (num.float() / (den + self.eps)).to(v.dtype), ((S, z[:, -1]) if self.recurrent else None)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, "
                f"feature={self.feature!r}, normalize={self.normalize}, kernel={self.kernel!r}")


# ----------------------------------------------------------------------------- Mamba-2 / SSD


class SSDCore(MixerCore):
    """Mamba-2's mixer after its input projection (docs/algorithms.md §3.2; mamba_ssm `Mamba2`).

        x, B, C = silu(conv1d([x, B, C]))                 causal depthwise conv over all three
        dt      = softplus(dt + dt_bias)                  [B, T, H]
        h_t     = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T    A = -exp(A_log), one per head
        y_t     = h_t C_t + D x_t
        y       = RMSNorm(y * z)                          z = silu of the gate branch (norm after gate)

    x [B, T, H*P], b, c [B, T, G*N], dt [B, T, H], z [B, T, H*P] -> [B, T, H*P].
    Initialisation as Mamba-2: A ~ U(1, 16), dt_bias = softplus^-1(dt) with dt
    log-uniform in [dt_min, dt_max] floored at dt_floor, D = 1.
    """

    def __init__(self, heads: int, head_dim: int, state: int, *, groups: int = 1, conv: int = 4,
                 conv_bias: bool = True, D: bool = True, norm: bool = True, norm_eps: float = 1e-5,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4,
                 A_init: tuple[float, float] = (1.0, 16.0), kernel: str = "auto", chunk_size: int = 64) -> None:
        super().__init__(kernel, chunk_size)
        self.heads, self.head_dim, self.state_dim, self.groups = heads, head_dim, state, groups
        inner = heads * head_dim
        self.conv1d = _depthwise(inner + 2 * groups * state, conv, conv_bias) if conv else None
        self.A_log = nn.Parameter(_A_log(heads, *A_init))
        self.dt_bias = nn.Parameter(_dt_bias(heads, dt_min, dt_max, dt_floor))
        self.D = nn.Parameter(torch.ones(heads)) if D else None
        self.norm = nn.RMSNorm(inner, eps=norm_eps) if norm else None

    def forward(self, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dt: torch.Tensor,
                z: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        H, P, G, N = self.heads, self.head_dim, self.groups, self.state_dim
        xbc = torch.cat([x, b, c], dim=-1)
        if self.conv1d is not None:
            xbc, conv_cache = causal_conv(xbc, self.conv1d, self.carried("conv"))
        else:
            xbc, conv_cache = F.silu(xbc), None
        x, b, c = xbc.split([H * P, G * N, G * N], dim=-1)
        x, b, c = x.view(B, T, H, P), b.view(B, T, G, N), c.view(B, T, G, N)
        A = -self.A_log.float().exp()
        impl = self.impl(T)
        if impl == "fla":
            y, h = self._fla(x, dt, A, b, c, self.carried("h"))
        else:
            y, h = ssd(x, dt, A, b, c, self.D, initial_state=self.carried("h"), output_final_state=self.recurrent,
                       chunk_size=self.chunk_size, dt_bias=self.dt_bias, dt_softplus=True, impl=impl)
        self.keep(conv=conv_cache, h=h)
        y = y.reshape(B, T, H * P) * z
        if self.norm is not None:
            y = rms_norm(y, self.norm, self.groups)  # per group of heads, as Mamba-2's group_size = inner / groups
        return y

    def _fla(self, x, dt, A, b, c, h0):
        """FLA's chunk_simple_gla with q = C, k = B, v = dt x, g = dt A, scale 1; its state is h^T."""
        chunk_simple_gla = _fla_kernel("fla.ops.simple_gla", "chunk_simple_gla", x)
        H = self.heads
        dt = F.softplus(dt.float() + self.dt_bias.float())
        q, k = (t.repeat_interleave(H // self.groups, dim=2).to(x.dtype) for t in (c, b))
        v = (x.float() * dt[..., None]).to(x.dtype)
        y, hT = chunk_simple_gla(q=q, k=k, v=v, g=dt * A, scale=1.0,
                                 initial_state=None if h0 is None else h0.transpose(-1, -2).contiguous(),
                                 output_final_state=self.recurrent)
        if self.D is not None:
            y = (y.float() + x.float() * self.D.float()[:, None]).to(x.dtype)
        return y, (hT.transpose(-1, -2) if self.recurrent else None)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, state={self.state_dim}, groups={self.groups}, "
                f"kernel={self.kernel!r}")


# ----------------------------------------------------------------------------- delta rule (GDN, KDA)


class _DeltaRuleCore(MixerCore):
    """Shared by GDN and KDA: short convs on q, k, v, L2-normalised q/k, the delta rule, RMSNorm * gate."""

    per_channel: bool  # decay per key channel (KDA) or per head (GDN)

    def __init__(self, heads: int, head_dim: int, value_dim: int, *, conv: int, norm_eps: float,
                 dt_min: float, dt_max: float, dt_floor: float, A_init: tuple[float, float],
                 kernel: str, chunk_size: int) -> None:
        super().__init__(kernel, chunk_size)
        self.heads, self.head_dim, self.value_dim = heads, head_dim, value_dim
        H, K, V = heads, head_dim, value_dim
        self.conv = conv
        if conv:
            self.q_conv1d = _depthwise(H * K, conv, False)
            self.k_conv1d = _depthwise(H * K, conv, False)
            self.v_conv1d = _depthwise(H * V, conv, False)
        self.A_log = nn.Parameter(_A_log(H, *A_init))
        self.dt_bias = nn.Parameter(_dt_bias(H * K if self.per_channel else H, dt_min, dt_max, dt_floor))
        self.o_norm = nn.RMSNorm(V, eps=norm_eps)

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        """The log-decay g_t <= 0 per token from the decay projection (fp32)."""
        raise NotImplementedError

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, beta: torch.Tensor,
                g: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = q.shape
        H, K, V = self.heads, self.head_dim, self.value_dim
        if self.conv:
            cache = self.carried("conv") or (None, None, None)
            q, cq = causal_conv(q, self.q_conv1d, cache[0])
            k, ck = causal_conv(k, self.k_conv1d, cache[1])
            v, cv = causal_conv(v, self.v_conv1d, cache[2])
            conv_cache = (cq, ck, cv)
        else:
            q, k, v, conv_cache = F.silu(q), F.silu(k), F.silu(v), None
        q, k, v = l2norm(q.view(B, T, H, K)), l2norm(k.view(B, T, H, K)), v.view(B, T, H, V)
        decay = self.decay(a)
        impl = self.impl(T)
        if impl == "fla":
            o, S = self._fla(q, k, v, decay, beta, self.carried("S"))
        else:
            o, S = delta_rule(q, k, v, decay, beta, initial_state=self.carried("S"),
                              output_final_state=self.recurrent, chunk_size=self.chunk_size, impl=impl)
        self.keep(conv=conv_cache, S=S)
        o = rms_norm(o, self.o_norm)
        if g is not None:
            o = o * g.view(B, T, H, V)
        return o.reshape(B, T, H * V)

    def extra_repr(self) -> str:
        return (f"heads={self.heads}, head_dim={self.head_dim}, value_dim={self.value_dim}, conv={self.conv}, "
                f"kernel={self.kernel!r}")


class GatedDeltaNetCore(_DeltaRuleCore):
    """Gated DeltaNet (Yang et al. 2024; FLA `GatedDeltaNet`), after its projections.

        q, k, v = silu(conv(q)), silu(conv(k)), silu(conv(v));  q, k L2-normalised per head
        g_t     = -exp(A_log) * softplus(a_t + dt_bias)           one log-decay per head
        S_t     = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = S_t^T q_t / sqrt(K)
        y       = RMSNorm(o) * g                                  g = the activated output gate

    q, k [B, T, H*K], v [B, T, H*V], a, beta [B, T, H], g [B, T, H*V] or None.
    A ~ U(0, 16) as FLA; dt_bias as Mamba-2.
    """

    per_channel = False

    def __init__(self, heads: int, head_dim: int, value_dim: int, *, conv: int = 4, norm_eps: float = 1e-5,
                 dt_min: float = 1e-3, dt_max: float = 0.1, dt_floor: float = 1e-4,
                 A_init: tuple[float, float] = (0.0, 16.0), kernel: str = "auto", chunk_size: int = 64) -> None:
        super().__init__(heads, head_dim, value_dim, conv=conv, norm_eps=norm_eps, dt_min=dt_min, dt_max=dt_max,
                         dt_floor=dt_floor, A_init=A_init, kernel=kernel, chunk_size=chunk_size)

    def decay(self, a: torch.Tensor) -> torch.Tensor:
        return -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [B, T, H]

    def _fla(self, q, k, v, g, beta, S0):
        chunk_gated_delta_rule = _fla_kernel("fla.ops.gated_delta_rule", "chunk_gated_delta_rule", q)
        return chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta, scale=self.head_dim ** -0.5,
                                      initial_state=S0, output_final_state=self.recurrent)


class KDACore(_DeltaRuleCore):
    """Kimi Delta Attention (Kimi Linear, arXiv 2510.26692; FLA `KimiDeltaAttention`), after its projections.

    As Gated DeltaNet, but the decay is per key channel, from the low-rank forget gate f [B, T, H*K]:

        g_t = -exp(A_log_h) * softplus(f_t + dt_bias)                    (A ~ U(1, 16))
        g_t = lower_bound * sigmoid(exp(A_log_h) * (f_t + dt_bias))      with safe_gate (FLA's lower-bounded gate)
        S_t = (I - beta_t k_t k_t^T) Diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T

    and the output gate g is a sigmoid (applied before the call).
    """

    per_channel = True

    def __init__(self, heads: int, head_dim: int, value_dim: int, *, conv: int = 4, norm_eps: float = 1e-5,
                 safe_gate: bool = False, lower_bound: float = -5.0, dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_floor: float = 1e-4, A_init: tuple[float, float] = (1.0, 16.0), kernel: str = "auto",
                 chunk_size: int = 64) -> None:
        super().__init__(heads, head_dim, value_dim, conv=conv, norm_eps=norm_eps, dt_min=dt_min, dt_max=dt_max,
                         dt_floor=dt_floor, A_init=A_init, kernel=kernel, chunk_size=chunk_size)
        self.safe_gate, self.lower_bound = safe_gate, lower_bound

    def decay(self, f: torch.Tensor) -> torch.Tensor:
        B, T, _ = f.shape
        f = f.float().view(B, T, self.heads, self.head_dim) + self.dt_bias.float().view(self.heads, self.head_dim)
        rate = self.A_log.float().exp()[:, None]  # [H, 1]
        if self.safe_gate:
            return self.lower_bound * torch.sigmoid(rate * f)
        return -rate * F.softplus(f)  # [B, T, H, K]

    def _fla(self, q, k, v, g, beta, S0):
        chunk_kda = _fla_kernel("fla.ops.kda", "chunk_kda", q)
        return chunk_kda(q=q, k=k, v=v, g=g, beta=beta, scale=self.head_dim ** -0.5, initial_state=S0,
                         output_final_state=self.recurrent)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", safe_gate=True, lower_bound={self.lower_bound}" if self.safe_gate else "")


# ----------------------------------------------------------------------------- recurrent decoding


def _cores(model: nn.Module) -> list[MixerCore]:
    return [m for m in model.modules() if isinstance(m, MixerCore)]


def _undecodable(model: nn.Module) -> list[str]:
    """Time-mixing modules that cannot continue a sequence call by call, by class name: runtime modules say
    so with `decodes = False`, generated classes with `cannot_decode = "<why>"`."""
    names = set()
    for m in model.modules():
        why = getattr(m, "cannot_decode", None)
        if getattr(m, "decodes", True) is False:
            names.add(type(m).__name__)
        elif why:
            names.add(f"{type(m).__name__} ({why})")
    return sorted(names)


def can_decode(model: nn.Module) -> bool:
    """Whether `recurrent(model)` accepts the model: it carries sequence state and every layer can decode."""
    return not _undecodable(model) and any(isinstance(m, (MixerCore, Decoding, LearnedPositions))
                                           for m in model.modules())


@contextlib.contextmanager
def recurrent(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` as a recurrence: each call continues from the state the previous call left.

    Inside the block every mixer core starts empty and carries its state (kernel state
    and conv cache) from call to call, every causal self-attention layer keeps a KV cache,
    and positions (RoPE, learned) continue from the tokens seen; all is reset on exit.
    Layers that cannot decode (bidirectional or cross-attention, NSA) are refused.
    """
    blocked = _undecodable(model)
    if blocked:
        raise NotImplementedError(f"cannot decode call by call: {', '.join(blocked)}")
    cores = _cores(model)
    stateful = [m for m in model.modules() if isinstance(m, (Decoding, LearnedPositions))]
    if not cores and not stateful:
        raise ValueError("the model has no sequence state to carry: nothing to run recurrently")
    for core in cores:
        core.recurrent, core.state = True, None
    for m in stateful:
        m.start()
    try:
        yield model
    finally:
        for core in cores:
            core.recurrent, core.state = False, None
        for m in stateful:
            m.stop()


@torch.no_grad()
def generate_recurrent(model: nn.Module, prompt: torch.Tensor | list[int], steps: int, *,
                       temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed `prompt` once, then `steps` tokens one at a time from the carried state.

    prompt: token ids [B, T] (or one list). Greedy at temperature 0, else sampled
    as `archc eval` does. Returns (tokens [B, T + steps]: prompt and continuation,
    logits [B, T + steps - 1, V]: logits[:, i] predicts tokens[:, i + 1]) — the
    same logits as `model(tokens[:, :-1])["logits"]`, at O(1) cost per new token.
    """

    device = next(model.parameters()).device
    tokens = torch.as_tensor(prompt, dtype=torch.long, device=device)
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.shape[1] == 0:
        raise ValueError("generate_recurrent needs a non-empty prompt")
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    pieces, out = [], [tokens]
    try:
        with recurrent(model):
            step_in = tokens
            for _ in range(steps):
                logits = model(step_in)["logits"]
                pieces.append(logits)
                step_in = sample_next(logits[:, -1], temperature, top_k, top_p, generator)[:, None]
                out.append(step_in)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=1), torch.cat(pieces, dim=1) if pieces else tokens.new_zeros(0)
