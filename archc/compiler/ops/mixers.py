"""Linear-attention mixers: `linear_attn`, `ssd`, `gated_deltanet`, `kda`, their core ops and lowering.

Each is used wherever `attention` is (`x += kda(rms_norm(x), heads=4) as mixer`)
and lowers, like `attention`, to a scope of plain `linear` nodes (which
`fuse_projections` fuses into one input matmul), parameter-free activations,
one core op that holds everything else, and an output `linear`:

    linear_attn     q, k, v                      -> linear_attention_core -> o
    ssd             z, x, b, c, dt; silu(z)      -> ssd_core              -> o     (Mamba-2; fused: mamba's in_proj)
    gated_deltanet  q, k, v, a, b, g; sigmoid(b) -> gated_deltanet_core   -> o
    kda             q, k, v, f->f_up, b, g->g_up -> kda_core              -> o     (low-rank forget and output gates)

The core ops generate `y = self.core(...)` calls to `archc.runtime.mixers`
(reached as `AF.<Core>`), which hold the short convolutions, decay
parameters and output norms and call the kernels in `archc.kernels`. Their
kernel (a face of the op's family in `archc.kernels.registry`, or `fla`) is
chosen by the `choose_kernels` pass, which records it with its reason; FLOPs
count the chunked form's matmuls (linear in T) and each op reports the size of
its recurrent state for `archc summary`. Parameterisations follow the papers
and FLA / mamba_ssm (docs/algorithms.md §3); see GRAMMAR.md for every option.
"""

from __future__ import annotations

from fractions import Fraction
from typing import ClassVar

from archc.compiler.ops.base import A, OpDef, Width, composite, fmt_shape, need_width, numel, register
from archc.compiler.pytext import comment
from archc.dsl.diagnostics import SpecError
from archc.kernels.registry import FAMILIES

DELTA_CHUNKS = (16, 32, 64)
SCALAR_DECAY_CHUNKS = (16, 32, 64, 128)
GATES = ("swish", "sigmoid", "none")
FEATURES = ("elu1", "relu", "identity")


# ----------------------------------------------------------------------------- core ops


class MixerOp(OpDef):
    """A mixer's core: one runtime module call, with its kernel choice, chunked-form FLOPs and state size."""

    mixer: ClassVar[str]  # the spec op it belongs to
    runtime: ClassVar[str]  # class in archc.runtime.mixers (AF.<runtime>)
    pure = False
    user = False
    growth: ClassVar[str] = "linear in T"  # how its FLOPs grow with the sequence (archc summary)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "mixer" in cls.__dict__:
            cls.kernel_groups = ("mixers", cls.mixer)

    def dims(self, node) -> dict[str, int]:
        """Sizes the Triton kernels care about (name -> size), as the family's limits take them."""
        raise NotImplementedError

    def choose_kernel(self, node, graph) -> tuple[str, str]:
        """`auto` (decided at run time), or the family's fallback where the Triton face cannot run the shape."""
        family = FAMILIES[self.kernel_family]
        why = family.triton_unfit(**self.dims(node))
        if why:
            return family.fallback, f"{why}: {family.fallback_words} on every device"
        return "auto", family.auto

    def describe_node(self, node) -> str:
        return self.mixer

    def check_stream(self, node, shape) -> None:
        if len(shape) != 3:
            raise SpecError(f"{self.mixer} expects a [B, T, D] stream, got {fmt_shape(shape)}", node.span)

    def state_numel(self, node, ins) -> int:
        """Floats of recurrent state per sequence (kernel state plus convolution cache)."""
        raise NotImplementedError

    def ctor_args(self, node) -> list[str]:
        raise NotImplementedError

    def init(self, node, ins):
        a = node.attrs
        args = self.ctor_args(node) + [f"kernel={a['kernel']!r}"]
        if a["chunk"] != 64:
            args.append(f"chunk_size={a['chunk']!r}")
        return f"AF.{self.runtime}({', '.join(args)})"

    def describe(self, node) -> list[str]:
        """The maths of the core call, as comment lines for the generated forward."""
        raise NotImplementedError

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        return [*(comment(line) for line in self.describe(node)),
                comment(f"kernel: {a['kernel']} — {a['kernel_reason']}"),
                f"{out} = {mod}({', '.join(args)})"]


def heads_of(node, width: int, what: str) -> int:
    """width / heads, or a located error."""
    heads = node.attrs["heads"]
    if width % heads:
        raise SpecError(f"the {what} width {width} does not split into heads={heads}", node.span,
                        hint="use heads that divide it, or give head_dim")
    return width // heads


def check_width(node, shape, want: int, what: str) -> None:
    if need_width(node, shape, what) != want:
        raise SpecError(f"{node.op}: the {what} has shape {fmt_shape(shape)} but {want} channels are needed",
                        node.span)


def _conv_state(conv: int, channels: int) -> int:
    return (conv - 1) * channels if conv else 0


def _conv_flops(conv: int, channels: int) -> int:
    return 2 * conv * channels  # per token, depthwise


_DECAY = {"dt_min": A(float, 1e-3, positive=True), "dt_max": A(float, 0.1, positive=True)}
_KERNEL_ATTRS = {"kernel": A((str, type(None)), None), "kernel_reason": A((str, type(None)), None)}


@register
class LinearAttentionCore(MixerOp):
    name = "linear_attention_core"
    mixer = "linear_attn"
    kernel_family = "linear_attention"
    runtime = "LinearAttentionCore"
    inputs = ("q", "k", "v")
    attrs = {
        "heads": A(int, positive=True), "head_dim": A((int, type(None)), None),
        "value_dim": A((int, type(None)), None), "feature": A(str, "elu1", choices=FEATURES),
        "normalize": A(bool, True), "eps": A(float, 1e-6, positive=True),
        "chunk": A(int, 64, choices=SCALAR_DECAY_CHUNKS), **_KERNEL_ATTRS,
    }

    def infer(self, node, ins, graph):
        q, k, v = ins
        self.check_stream(node, q)
        a = node.attrs
        kd = heads_of(node, need_width(node, q, "query"), "query")
        if a["head_dim"] not in (None, kd):
            raise SpecError(f"heads={a['heads']} × head_dim={a['head_dim']} but the queries are {q[-1]} wide",
                            node.span)
        a["head_dim"] = kd
        check_width(node, k, a["heads"] * kd, "key")
        a["value_dim"] = heads_of(node, need_width(node, v, "value"), "value")
        if a["feature"] == "identity" and a["normalize"]:
            raise SpecError('linear_attn: feature="identity" with normalize=true divides by an unsigned '
                            "denominator that can be zero", node.span,
                            hint='use feature="elu1" or "relu", or normalize=false')
        return v

    def dims(self, node):
        return {"head_dim": node.attrs["head_dim"]}

    def describe(self, node):
        a = node.attrs
        phi = {"elu1": "phi = elu + 1", "relu": "phi = relu", "identity": "phi = identity"}[a["feature"]]
        if not a["normalize"]:
            return [f"{phi};  S_t = S_{{t-1}} + phi(k_t) v_t^T,  y_t = S_t^T phi(q_t) / sqrt(head_dim)"]
        return [f"{phi};  S_t = S_{{t-1}} + phi(k_t) v_t^T,  z_t = z_{{t-1}} + phi(k_t)",
                "y_t = S_t^T phi(q_t) / (z_t . phi(q_t))"]

    def flops(self, node, ins, out, sizes):
        a = node.attrs
        K, V, C = a["head_dim"], a["value_dim"], a["chunk"]
        per_head = 2 * C * (K + V) + 4 * K * V + (2 * K if a["normalize"] else 0)
        return numel(ins[0][:-1], sizes) * a["heads"] * per_head

    def state_numel(self, node, ins):
        a = node.attrs
        return a["heads"] * a["head_dim"] * (a["value_dim"] + (1 if a["normalize"] else 0))

    def ctor_args(self, node):
        a = node.attrs
        args = [f"heads={a['heads']!r}", f"head_dim={a['head_dim']!r}"]
        if a["value_dim"] != a["head_dim"]:
            args.append(f"value_dim={a['value_dim']!r}")
        args.append(f"feature={a['feature']!r}")
        if not a["normalize"]:
            args.append("normalize=False")
        if a["eps"] != 1e-6:
            args.append(f"eps={a['eps']!r}")
        return args


@register
class SSDCore(MixerOp):
    name = "ssd_core"
    mixer = "ssd"
    kernel_family = "ssd"
    runtime = "SSDCore"
    inputs = ("x", "b", "c", "dt", "z")
    attrs = {
        "heads": A(int, positive=True), "head_dim": A((int, type(None)), None), "state": A(int, positive=True),
        "groups": A(int, 1, positive=True), "conv": A(int, 4), "conv_bias": A(bool, True), "D": A(bool, True),
        "norm": A(bool, True), "norm_eps": A(float, 1e-5, positive=True), **_DECAY,
        "chunk": A(int, 64, choices=SCALAR_DECAY_CHUNKS), **_KERNEL_ATTRS,
    }

    def infer(self, node, ins, graph):
        x, b, c, dt, z = ins
        self.check_stream(node, x)
        a = node.attrs
        inner = need_width(node, x, "input")
        if a["head_dim"] is None:
            a["head_dim"] = heads_of(node, inner, "inner (expand × input)")
        elif a["heads"] * a["head_dim"] != inner:
            raise SpecError(
                f"ssd: heads={a['heads']} × head_dim={a['head_dim']} = {a['heads'] * a['head_dim']} but the inner "
                f"width (expand × input width) is {inner}", node.span,
                hint="give heads and head_dim, or heads and expand, not all three")
        if a["heads"] % a["groups"]:
            raise SpecError(f"ssd: heads={a['heads']} must be a multiple of groups={a['groups']} "
                            "(each group's B and C serve a set of heads)", node.span)
        for what, shape, want in (("B projection", b, a["groups"] * a["state"]),
                                  ("C projection", c, a["groups"] * a["state"]),
                                  ("dt projection", dt, a["heads"]), ("gate", z, inner)):
            check_width(node, shape, want, what)
        return x

    def dims(self, node):
        return {"state": node.attrs["state"]}

    def describe(self, node):
        a = node.attrs
        conv = "silu(conv1d([x, b, c]))" if a["conv"] else "silu([x, b, c])"
        skip = " + D x_t" if a["D"] else ""
        out = "y = RMSNorm(y * z)" if a["norm"] else "y = y * z"
        return [f"x, B, C = {conv},  dt = softplus(dt + dt_bias),  A = -exp(A_log)",
                f"h_t = exp(dt_t A) h_{{t-1}} + dt_t x_t B_t^T,  y_t = h_t C_t{skip},  {out}"]

    def weights(self, node, ins):
        a = node.attrs
        w = {}
        if a["conv"]:
            w["conv1d.weight"] = (self._channels(a), 1, a["conv"])
            if a["conv_bias"]:
                w["conv1d.bias"] = (self._channels(a),)
        w["A_log"] = (a["heads"],)
        w["dt_bias"] = (a["heads"],)
        if a["D"]:
            w["D"] = (a["heads"],)
        if a["norm"]:
            w["norm.weight"] = (a["heads"] * a["head_dim"],)
        return w

    def _channels(self, a) -> int:
        return a["heads"] * a["head_dim"] + 2 * a["groups"] * a["state"]

    def flops(self, node, ins, out, sizes):
        a = node.attrs
        P, N, L = a["head_dim"], a["state"], a["chunk"]
        per_head = 2 * L * (N + P) + 4 * N * P  # C B^T and its product with X inside chunks; chunk states; C h
        return numel(ins[0][:-1], sizes) * (a["heads"] * per_head + _conv_flops(a["conv"], self._channels(a)))

    def state_numel(self, node, ins):
        a = node.attrs
        return a["heads"] * a["head_dim"] * a["state"] + _conv_state(a["conv"], self._channels(a))

    def ctor_args(self, node):
        a = node.attrs
        args = [f"heads={a['heads']!r}", f"head_dim={a['head_dim']!r}", f"state={a['state']!r}"]
        for key, default in (("groups", 1), ("conv", 4), ("conv_bias", True), ("D", True), ("norm", True),
                             ("norm_eps", 1e-5), ("dt_min", 1e-3), ("dt_max", 0.1)):
            if a[key] != default:
                args.append(f"{key}={a[key]!r}")
        return args


class _DeltaRuleOp(MixerOp):
    kernel_family = "delta_rule"

    def infer(self, node, ins, graph):
        q, k, v, decay, beta, *gate = ins
        self.check_stream(node, q)
        a = node.attrs
        kd = heads_of(node, need_width(node, q, "query"), "query")
        if a["head_dim"] not in (None, kd):
            raise SpecError(f"heads={a['heads']} × head_dim={a['head_dim']} but the queries are {q[-1]} wide",
                            node.span)
        a["head_dim"] = kd
        a["value_dim"] = heads_of(node, need_width(node, v, "value"), "value")
        check_width(node, k, a["heads"] * kd, "key")
        check_width(node, decay, self._decay_width(a), "decay projection")
        check_width(node, beta, a["heads"], "beta projection")
        if gate:
            check_width(node, gate[0], a["heads"] * a["value_dim"], "output gate")
        return v

    def _decay_width(self, a) -> int:
        raise NotImplementedError

    def _decay_text(self, a) -> str:
        raise NotImplementedError

    def _transition(self) -> str:
        raise NotImplementedError

    def describe(self, node):
        a = node.attrs
        conv = "silu(conv(.))" if a["conv"] else "silu(.)"
        gate = "" if a["gate"] == "none" else " * g"
        return [f"q, k, v = {conv}, q and k L2-normalised;  {self._decay_text(a)}",
                f"S_t = {self._transition()} S_{{t-1}} + beta_t k_t v_t^T",
                f"y_t = RMSNorm(S_t^T q_t / sqrt(head_dim)){gate}"]

    def dims(self, node):
        return {"head_dim": node.attrs["head_dim"], "value_dim": node.attrs["value_dim"]}

    def weights(self, node, ins):
        a = node.attrs
        H, K, V = a["heads"], a["head_dim"], a["value_dim"]
        w = {}
        if a["conv"]:
            w.update({"q_conv1d.weight": (H * K, 1, a["conv"]), "k_conv1d.weight": (H * K, 1, a["conv"]),
                      "v_conv1d.weight": (H * V, 1, a["conv"])})
        w["A_log"] = (H,)
        w["dt_bias"] = (self._decay_width(a),)
        w["o_norm.weight"] = (V,)
        return w

    def _conv_channels(self, a) -> int:
        return a["heads"] * (2 * a["head_dim"] + a["value_dim"])

    def flops(self, node, ins, out, sizes):
        # Per chunk of C: decayed K K^T and Q K^T (2·C²K each), the UT solve (C²(K+V)), P·V_new (2·C²V);
        # per token: W S, Q S and the state update K^T V_new (2KV each).
        a = node.attrs
        K, V, C = a["head_dim"], a["value_dim"], a["chunk"]
        per_head = C * (5 * K + 3 * V) + 6 * K * V
        return numel(ins[0][:-1], sizes) * (a["heads"] * per_head + _conv_flops(a["conv"], self._conv_channels(a)))

    def state_numel(self, node, ins):
        a = node.attrs
        return a["heads"] * a["head_dim"] * a["value_dim"] + _conv_state(a["conv"], self._conv_channels(a))

    def ctor_args(self, node):
        a = node.attrs
        args = [f"heads={a['heads']!r}", f"head_dim={a['head_dim']!r}", f"value_dim={a['value_dim']!r}"]
        for key, default in (("conv", 4), ("norm_eps", 1e-5), ("dt_min", 1e-3), ("dt_max", 0.1)):
            if a[key] != default:
                args.append(f"{key}={a[key]!r}")
        return args


_DELTA_ATTRS = {
    "heads": A(int, positive=True), "head_dim": A((int, type(None)), None), "value_dim": A((int, type(None)), None),
    "conv": A(int, 4), "gate": A(str, "swish", choices=GATES), "norm_eps": A(float, 1e-5, positive=True),
    **_DECAY, "chunk": A(int, 64, choices=DELTA_CHUNKS), **_KERNEL_ATTRS,
}


@register
class GatedDeltaNetCore(_DeltaRuleOp):
    name = "gated_deltanet_core"
    mixer = "gated_deltanet"
    runtime = "GatedDeltaNetCore"
    inputs = ("q", "k", "v", "a", "beta", "g")
    attrs = dict(_DELTA_ATTRS)

    def _decay_width(self, a):
        return a["heads"]

    def _decay_text(self, a):
        return "g_t = -exp(A_log) softplus(a_t + dt_bias)"

    def _transition(self):
        return "exp(g_t) (I - beta_t k_t k_t^T)"


@register
class KDACore(_DeltaRuleOp):
    name = "kda_core"
    mixer = "kda"
    runtime = "KDACore"
    inputs = ("q", "k", "v", "f", "beta", "g")
    attrs = {**_DELTA_ATTRS, "safe_gate": A(bool, False), "lower_bound": A(float, -5.0)}

    def _decay_width(self, a):
        return a["heads"] * a["head_dim"]

    def _decay_text(self, a):
        if a["safe_gate"]:
            return f"g_t = {a['lower_bound']!r} sigmoid(exp(A_log) (f_t + dt_bias))"
        return "g_t = -exp(A_log) softplus(f_t + dt_bias)"

    def _transition(self):
        return "(I - beta_t k_t k_t^T) Diag(exp(g_t))"

    def ctor_args(self, node):
        a = node.attrs
        args = super().ctor_args(node)
        if a["safe_gate"]:
            args.append("safe_gate=True")
            if a["lower_bound"] != -5.0:
                args.append(f"lower_bound={a['lower_bound']!r}")
        return args


# ----------------------------------------------------------------------------- lowering


def ratio_of(value: float, span, what: str) -> Fraction:
    ratio = Fraction(value).limit_denominator(64)
    if ratio <= 0 or abs(float(ratio) - value) > 1e-9:
        raise SpecError(f"`{what}` must be a positive ratio of small integers (such as 1, 2, 0.5), got {value!r}",
                        span)
    return ratio


def scaled(base: int | None, ratio: Fraction, span, what: str, heads: int = 1):
    """`base × ratio / heads` as a number when base is known, else a width relative to the input."""
    if base is not None:
        value = base * ratio
        if value.denominator != 1:
            raise SpecError(f"{what}: {base} × {float(ratio)} is not a whole number of channels", span)
        return int(value) // heads
    return Width(ratio.numerator, ratio.denominator * heads,
                 why=f"{what}: the input width {{width}} × {float(ratio)}"
                     + (f" does not split into heads={heads}" if heads > 1 else " is not a whole number"))


def check_conv(v, span) -> None:
    if v["conv"] < 0:
        raise SpecError(f"`conv` is the short convolution's width (0 for none), got {v['conv']}", span)
    if v.get("dt_min") is not None and not v["dt_min"] <= v["dt_max"]:
        raise SpecError(f"`dt_min` ({v['dt_min']}) must not exceed `dt_max` ({v['dt_max']})", span)


def out_projection(ctx, core: str, x: str, v) -> str:
    """The mixer's output linear, back to the width of its input."""
    out_bias = v["bias"] if v.get("out_bias") is None else v["out_bias"]
    return ctx.linear(core, Width(of=x), "o", bias=out_bias)


COMMON = {
    "heads": A(int, positive=True),
    "head_dim": A((int, type(None)), None, positive=True),
}
BIAS = {"bias": A(bool, False), "out_bias": A((bool, type(None)), None)}


@composite("linear_attn", cls="LinearAttention", default_name="mixer", attrs={
    **COMMON,
    "feature": A(str, "elu1", choices=FEATURES),
    "normalize": A(bool, True),
    "eps": A(float, 1e-6, positive=True),
    "chunk": A(int, 64, choices=SCALAR_DECAY_CHUNKS),
    **BIAS,
})
def lower_linear_attn(ctx, args, v) -> str:
    (x,) = args
    heads, hd = v["heads"], v["head_dim"]
    width = heads * hd if hd else Width()
    q = ctx.linear(x, width, "q", bias=v["bias"])
    k = ctx.linear(x, width, "k", bias=v["bias"])
    val = ctx.linear(x, width, "v", bias=v["bias"])
    core = ctx.core("linear_attention_core", [q, k, val],
                    {"heads": heads, "head_dim": hd, "value_dim": None, "feature": v["feature"],
                     "normalize": v["normalize"], "eps": v["eps"], "chunk": v["chunk"]})
    return out_projection(ctx, core, x, v)


@composite("ssd", cls="Mamba2", default_name="mixer", attrs={
    **COMMON,
    "state": A(int, 128, positive=True),
    "expand": A((int, type(None)), None, positive=True),
    "groups": A(int, 1, positive=True),
    "conv": A(int, 4),
    "conv_bias": A(bool, True),
    "D": A(bool, True),
    "norm": A(bool, True),
    "norm_eps": A(float, 1e-5, positive=True),
    **_DECAY,
    "chunk": A(int, 64, choices=SCALAR_DECAY_CHUNKS),
    **BIAS,
})
def lower_ssd(ctx, args, v) -> str:
    (x,) = args
    check_conv(v, ctx.span)
    heads, hd, n, groups = v["heads"], v["head_dim"], v["state"], v["groups"]
    if hd is not None and v["expand"] is None:
        inner = heads * hd
    else:
        inner = Width(v["expand"] or 2, why="")
    # In Mamba-2's order, so the fused projection is mamba's in_proj: [z, x, B, C, dt].
    z = ctx.linear(x, inner, "z", bias=v["bias"])
    xs = ctx.linear(x, inner, "x", bias=v["bias"])
    b = ctx.linear(x, groups * n, "b", bias=v["bias"])
    c = ctx.linear(x, groups * n, "c", bias=v["bias"])
    dt = ctx.linear(x, heads, "dt", bias=v["bias"])
    z = ctx.act("silu", z, var="z")
    core = ctx.core("ssd_core", [xs, b, c, dt, z],
                    {"heads": heads, "head_dim": hd, "state": n, "groups": groups, "conv": v["conv"],
                     "conv_bias": v["conv_bias"], "D": v["D"], "norm": v["norm"], "norm_eps": v["norm_eps"],
                     "dt_min": v["dt_min"], "dt_max": v["dt_max"], "chunk": v["chunk"]})
    return out_projection(ctx, core, x, v)


def _gate(ctx, g: str, kind: str) -> str:
    return ctx.act("silu" if kind == "swish" else "sigmoid", g, var="g")


def _beta(ctx, b: str, v) -> str:
    beta = ctx.act("sigmoid", b, var="beta")
    if v["neg_eigval"]:  # beta in (0, 2): the transition may have negative eigenvalues (Grazzi et al.)
        beta = ctx.scale(beta, 2.0, var="beta")
    return beta


def _delta_common(v, span):
    check_conv(v, span)
    heads, hd = v["heads"], v["head_dim"]
    ratio = ratio_of(v["expand_v"], span, "expand_v")
    qk = heads * hd if hd else Width()
    val = scaled(heads * hd if hd else None, ratio, span, "expand_v")
    return heads, hd, ratio, qk, val


def _core_attrs(v, hd) -> dict:
    return {"heads": v["heads"], "head_dim": hd, "value_dim": None, "conv": v["conv"], "gate": v["gate"],
            "norm_eps": v["norm_eps"],
            "dt_min": v["dt_min"], "dt_max": v["dt_max"], "chunk": v["chunk"]}


@composite("gated_deltanet", cls="GatedDeltaNet", default_name="mixer", attrs={
    **COMMON,
    "expand_v": A(float, 2.0, positive=True),
    "conv": A(int, 4),
    "gate": A(str, "swish", choices=GATES),
    "neg_eigval": A(bool, False),
    "norm_eps": A(float, 1e-5, positive=True),
    **_DECAY,
    "chunk": A(int, 64, choices=DELTA_CHUNKS),
    **BIAS,
})
def lower_gated_deltanet(ctx, args, v) -> str:
    (x,) = args
    heads, hd, _ratio_v, qk, val = _delta_common(v, ctx.span)
    q = ctx.linear(x, qk, "q", bias=v["bias"])
    k = ctx.linear(x, qk, "k", bias=v["bias"])
    vv = ctx.linear(x, val, "v", bias=v["bias"])
    a = ctx.linear(x, heads, "a", bias=v["bias"])
    b = ctx.linear(x, heads, "b", bias=v["bias"])
    ins = [q, k, vv, a]
    g = ctx.linear(x, val, "g", bias=v["bias"]) if v["gate"] != "none" else None
    ins.append(_beta(ctx, b, v))
    if g is not None:
        ins.append(_gate(ctx, g, v["gate"]))
    core = ctx.core("gated_deltanet_core", ins, _core_attrs(v, hd))
    return out_projection(ctx, core, x, v)


@composite("kda", cls="KimiDeltaAttention", default_name="mixer", attrs={
    **COMMON,
    "expand_v": A(float, 1.0, positive=True),
    "conv": A(int, 4),
    "rank": A((int, type(None)), None, positive=True),
    "gate": A(str, "sigmoid", choices=GATES),
    "safe_gate": A(bool, False),
    "lower_bound": A(float, -5.0),
    "neg_eigval": A(bool, False),
    "norm_eps": A(float, 1e-5, positive=True),
    **_DECAY,
    "chunk": A(int, 64, choices=DELTA_CHUNKS),
    **BIAS,
})
def lower_kda(ctx, args, v) -> str:
    (x,) = args
    heads, hd, ratio, qk, val = _delta_common(v, ctx.span)
    # The low-rank gates' inner width: one head's value width unless `rank` is given (FLA).
    rank = v["rank"] if v["rank"] is not None else scaled(heads * hd if hd else None, ratio, ctx.span,
                                                          "kda head value width", heads)
    q = ctx.linear(x, qk, "q", bias=v["bias"])
    k = ctx.linear(x, qk, "k", bias=v["bias"])
    vv = ctx.linear(x, val, "v", bias=v["bias"])
    f = ctx.linear(x, rank, "f")
    b = ctx.linear(x, heads, "b", bias=v["bias"])
    g = ctx.linear(x, rank, "g") if v["gate"] != "none" else None
    f = ctx.linear(f, Width(of=q), "f_up", var="f")
    ins = [q, k, vv, f, _beta(ctx, b, v)]
    if g is not None:
        g = ctx.linear(g, Width(of=vv), "g_up", bias=True, var="g")
        ins.append(_gate(ctx, g, v["gate"]))
    core = ctx.core("kda_core", ins,
                    {**_core_attrs(v, hd), "safe_gate": v["safe_gate"], "lower_bound": v["lower_bound"]})
    return out_projection(ctx, core, x, v)
