"""The basic ops: inputs, embeddings, positions, linear maps (and their fused form), norms,
activations, dropout; and the built-ins `mlp` and `swiglu` that lower to them."""

from __future__ import annotations

from typing import ClassVar

from archc.compiler import dims
from archc.compiler.ops.base import (
    REGISTRY,
    ZEROS,
    A,
    OpDef,
    Width,
    composite,
    fmt_shape,
    init_arg,
    initialised,
    need_width,
    numel,
    register,
)
from archc.dsl.diagnostics import SpecError

# ---- inputs and embeddings ---------------------------------------------------


@register
class Input(OpDef):
    name = "input"
    inputs = ()
    attrs = {"kind": A(str), "dims": A(list)}
    pure = False  # two inputs of one shape are two values
    user = False

    def infer(self, node, ins, graph):
        return tuple(node.attrs["dims"])


@register
class Embedding(OpDef):
    name = "embedding"
    inputs = ("tokens",)
    attrs = {"num": A(int, positive=True), "dim": A(int, positive=True), "init": init_arg()}
    pure = False

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] != "long":
            raise SpecError("`embedding` looks up integer ids (`Tokens`), but this tensor holds "
                            + ("true/false" if dtypes[0] == "bool" else "floats"), span)
        return "float"

    def infer(self, node, ins, graph):
        return (*ins[0], node.attrs["dim"])

    def weights(self, node, ins):
        return {"weight": (node.attrs["num"], node.attrs["dim"])}

    def roles(self, node):
        return {"weight": "embedding"}

    def init(self, node, ins):
        return initialised(f"nn.Embedding({node.attrs['num']!r}, {node.attrs['dim']!r})", node.attrs.get("init"))

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


@register
class PosEmbedding(OpDef):
    """Learned absolute positions for a [B, T, D] stream: returns [T, D] to add."""

    name = "pos_embedding"
    attrs = {"max_len": A(int, positive=True)}
    pure = False

    def infer(self, node, ins, graph):
        if len(ins[0]) != 3:
            raise SpecError(f"pos_embedding expects a [B, T, D] stream, got {fmt_shape(ins[0])}", node.span)
        return (ins[0][1], need_width(node, ins[0], "input"))

    def weights(self, node, ins):
        return {"weight": (node.attrs["max_len"], ins[0][-1])}

    def roles(self, node):
        return {"weight": "embedding"}

    def init(self, node, ins):
        return f"AF.LearnedPositions({node.attrs['max_len']!r}, {ins[0][-1]!r})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


# ---- linear maps -------------------------------------------------------------


@register
class Linear(OpDef):
    name = "linear"
    attrs = {"out": A((int, Width)), "bias": A(bool, True), "tie": A((str, type(None)), None), "init": init_arg(),
             "bias_init": init_arg()}
    pure = False
    is_linear_map = True

    def default(self, name, given):
        if name == "bias" and "tie" in given:
            return False  # a tied linear borrows the embedding's weight; a bias of its own is asked for
        return super().default(name, given)

    def infer(self, node, ins, graph):
        width = need_width(node, ins[0], "input")
        out = node.attrs["out"]
        if isinstance(out, Width):
            base = width if out.of is None else graph.node(out.of).shape[-1]
            if (base * out.num) % out.den:
                raise SpecError(out.why.format(width=base) if out.why else
                                f"the width {base} times {out.num}/{out.den} is not a whole number", node.span)
            out = node.attrs["out"] = base * out.num // out.den
        if out <= 0:
            raise SpecError(f"`linear`: `out` must be positive, got {out}", node.span)
        tie = node.attrs.get("tie")
        if tie is not None and node.attrs.get("init") is not None:
            raise SpecError("a tied linear reuses the embedding's weight: its `init=` goes on the embedding",
                            node.span)
        if node.attrs.get("bias_init") is not None and not node.attrs["bias"]:
            raise SpecError("`bias_init=` on a linear without a bias", node.span, hint="drop it, or give bias=true")
        if tie is not None:
            target = graph.node(tie)
            want = (out, width)
            have = tuple(REGISTRY[target.op].weights(target, [graph.node(a).shape for a in graph.args(tie)])["weight"])
            if have != want:
                raise SpecError(
                    f"cannot tie this linear ([{width}] -> [{out}]) to `{target.name}`: its weight has shape "
                    f"{fmt_shape(have)} but the tied weight must be {fmt_shape(want)}",
                    node.span,
                )
        return (*ins[0][:-1], out)

    def weights(self, node, ins):
        w = {} if node.attrs.get("tie") else {"weight": (node.attrs["out"], ins[0][-1])}
        if node.attrs["bias"]:
            w["bias"] = (node.attrs["out"],)
        return w

    def flops(self, node, ins, out, sizes):
        return 2 * numel(ins[0], sizes) * node.attrs["out"]

    def init(self, node, ins):
        a = node.attrs
        bias_init = a.get("bias_init") or (ZEROS if a.get("init") else None)  # zeros when init= is given
        if a.get("tie"):  # uses the tied module's weight; a bias of its own lives in a small module
            return initialised(f"AF.Bias({a['out']!r})", bias=bias_init) if a["bias"] else None
        return initialised(f"nn.Linear({ins[0][-1]!r}, {a['out']!r}, bias={a['bias']!r})", a.get("init"),
                           bias_init if a["bias"] else None)

    def forward(self, node, args, out, mod, ins):
        tie = node.attrs.get("tie")
        if tie:
            bias = f", {mod}.bias" if node.attrs["bias"] else ""
            return [f"{out} = F.linear({args[0]}, {node.attrs['tie_ref']}{bias})"]
        return [f"{out} = {mod}({args[0]})"]


@register
class Conv2d(OpDef):
    """2-D convolution of [B, C, H, W] to [B, out, H', W'], H' = (H + 2·padding − kernel) // stride + 1."""

    name = "conv2d"
    attrs = {"out": A(int, positive=True), "kernel": A(int, positive=True), "stride": A(int, 1, positive=True),
             "padding": A(int, 0), "bias": A(bool, True)}
    pure = False

    def infer(self, node, ins, graph):
        a, x = node.attrs, ins[0]
        if len(x) != 4:
            raise SpecError(f"conv2d expects an image [B, C, H, W], got {fmt_shape(x)}", node.span)
        need_width(node, x[:2], "input's channel dim")
        spatial = []
        for d in x[2:]:
            size = dims.add(d, 2 * a["padding"] - a["kernel"])
            if isinstance(size, int) and size < 0:
                raise SpecError(f"conv2d: kernel {a['kernel']} is larger than the padded image side {d} + "
                                f"2·{a['padding']}", node.span)
            steps = dims.div(size, a["stride"])
            if steps is None:
                if not isinstance(size, int):
                    raise SpecError(f"conv2d: the stride {a['stride']} does not divide the symbolic side {size}; "
                                    "give the image a known size", node.span)
                steps = size // a["stride"]
            spatial.append(dims.add(steps, 1))
        return (x[0], a["out"], *spatial)

    def weights(self, node, ins):
        a = node.attrs
        w = {"weight": (a["out"], ins[0][1], a["kernel"], a["kernel"])}
        if a["bias"]:
            w["bias"] = (a["out"],)
        return w

    def flops(self, node, ins, out, sizes):
        a = node.attrs
        return 2 * numel(out, sizes) * ins[0][1] * a["kernel"] * a["kernel"]

    def init(self, node, ins):
        a = node.attrs
        return (f"nn.Conv2d({ins[0][1]!r}, {a['out']!r}, kernel_size={a['kernel']!r}, stride={a['stride']!r}, "
                f"padding={a['padding']!r}, bias={a['bias']!r})")

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


@register
class FusedLinear(OpDef):
    """Several linears reading one input, as one matmul; `split_part` nodes take the pieces."""

    name = "fused_linear"
    attrs = {"parts": A(list), "bias": A(bool)}
    pure = False
    user = False
    is_linear_map = True

    def infer(self, node, ins, graph):
        return (*ins[0][:-1], sum(size for _name, size in node.attrs["parts"]))

    def weights(self, node, ins):
        total = sum(size for _name, size in node.attrs["parts"])
        w = {"weight": (total, ins[0][-1])}
        if node.attrs["bias"]:
            w["bias"] = (total,)
        return w

    def flops(self, node, ins, out, sizes):
        return 2 * numel(ins[0], sizes) * out[-1]

    def init(self, node, ins):
        total = sum(size for _name, size in node.attrs["parts"])
        return f"nn.Linear({ins[0][-1]!r}, {total!r}, bias={node.attrs['bias']!r})"

    def forward(self, node, args, out, mod, ins):
        # codegen binds the split_part users directly (see codegen._emit_fused)
        return [f"{out} = {mod}({args[0]})"]


@register
class SplitPart(OpDef):
    name = "split_part"
    attrs = {"index": A(int), "start": A(int), "size": A(int)}
    user = False

    def infer(self, node, ins, graph):
        return (*ins[0][:-1], node.attrs["size"])

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        return [f"{out} = {args[0]}[..., {a['start']!r}:{a['start'] + a['size']!r}]"]


# ---- normalisation, activations, dropout ------------------------------------


@register
class LayerNorm(OpDef):
    """`affine=false`: no weight and no bias (DiT's adaLN supplies its own scale and shift)."""

    name = "layer_norm"
    attrs = {"eps": A(float, 1e-5, positive=True), "bias": A(bool, True), "affine": A(bool, True)}
    pure = False

    def weights(self, node, ins):
        d = need_width(node, ins[0], "input")
        if not node.attrs.get("affine", True):
            return {}
        return {"weight": (d,), "bias": (d,)} if node.attrs["bias"] else {"weight": (d,)}

    def init(self, node, ins):
        if not node.attrs.get("affine", True):
            return f"nn.LayerNorm({ins[0][-1]!r}, eps={node.attrs['eps']!r}, elementwise_affine=False)"
        return f"nn.LayerNorm({ins[0][-1]!r}, eps={node.attrs['eps']!r}, bias={node.attrs['bias']!r})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


@register
class RMSNorm(OpDef):
    name = "rms_norm"
    attrs = {"eps": A(float, 1e-6, positive=True)}
    pure = False

    def weights(self, node, ins):
        return {"weight": (need_width(node, ins[0], "input"),)}

    def init(self, node, ins):
        return f"nn.RMSNorm({ins[0][-1]!r}, eps={node.attrs['eps']!r})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


class Activation(OpDef):
    call: ClassVar[str]

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {self.call.format(x=args[0])}"]


ACTIVATIONS: dict[str, str] = {
    "relu": "F.relu({x})",
    "gelu": "F.gelu({x})",
    "gelu_tanh": 'F.gelu({x}, approximate="tanh")',
    "silu": "F.silu({x})",
    "sigmoid": "torch.sigmoid({x})",
    "tanh": "torch.tanh({x})",
    "softplus": "F.softplus({x})",
    "relu2": "F.relu({x}).square()",
}

for _act, _call in ACTIVATIONS.items():
    register(type(f"Act_{_act}", (Activation,), {"name": _act, "call": _call}))


@register
class Dropout(OpDef):
    name = "dropout"
    attrs = {"p": A(float, unit=True)}
    pure = False  # random: two dropouts of one input are not the same value
    random = True

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = F.dropout({args[0]}, p={node.attrs['p']!r}, training=self.training)"]


@register
class DropPath(OpDef):
    """Stochastic depth: while training, each example's whole value is zeroed with probability p and the rest
    scaled by 1 / (1 - p) (timm's DropPath, as ViT and DiT train with); the identity in eval mode."""

    name = "drop_path"
    attrs = {"p": A(float, unit=True)}
    pure = False
    random = True

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = AF.drop_path({args[0]}, {node.attrs['p']!r}, self.training)"]


# ---- built-ins: feed-forward blocks -------------------------------------------


@composite("mlp", cls="MLP", default_name="mlp", attrs={
    "hidden": A(int, positive=True),
    "out": A((int, type(None)), None, positive=True),
    "act": A(str, "gelu", choices=tuple(ACTIVATIONS)),
    "bias": A(bool, True),
    "dropout": A(float, 0.0, unit=True),
})
def lower_mlp(ctx, args, v) -> str:
    (x,) = args
    out = v["out"] if v["out"] is not None else Width(of=x)
    h = ctx.linear(x, v["hidden"], "fc", bias=v["bias"])
    h = ctx.act(v["act"], h, var="h")
    if v["dropout"]:
        h = ctx.add("dropout", [h], {"p": v["dropout"]}, var="h")
    return ctx.linear(h, out, "proj", bias=v["bias"])


@composite("swiglu", cls="SwiGLU", default_name="mlp", attrs={
    "hidden": A(int, positive=True),
    "out": A((int, type(None)), None, positive=True),
    "bias": A(bool, False),
})
def lower_swiglu(ctx, args, v) -> str:
    (x,) = args
    out = v["out"] if v["out"] is not None else Width(of=x)
    gate = ctx.linear(x, v["hidden"], "gate", bias=v["bias"])
    up = ctx.linear(x, v["hidden"], "up", bias=v["bias"])
    act = ctx.act("silu", gate, var="gate")
    h = ctx.add("mul", [act, up], {"scalar": None, "scalar_left": False}, var="h")
    return ctx.linear(h, out, "down", bias=v["bias"])
