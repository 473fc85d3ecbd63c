"""The basic ops: inputs, embeddings, positions, linear maps (and their fused form), norms,
activations, dropout, elementwise arithmetic, the next-token loss; and the built-ins `mlp` and
`swiglu` that lower to them."""

from __future__ import annotations

from typing import ClassVar

from archc.compiler.ops.base import (
    REGISTRY,
    A,
    OpDef,
    Width,
    composite,
    fmt_shape,
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
    attrs = {"num": A(int, positive=True), "dim": A(int, positive=True)}
    pure = False

    def infer(self, node, ins, graph):
        return (*ins[0], node.attrs["dim"])

    def weights(self, node, ins):
        return {"weight": (node.attrs["num"], node.attrs["dim"])}

    def roles(self, node):
        return {"weight": "embedding"}

    def init(self, node, ins):
        return f"nn.Embedding({node.attrs['num']!r}, {node.attrs['dim']!r})"

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
    attrs = {"out": A((int, Width)), "bias": A(bool, True), "tie": A((str, type(None)), None)}
    pure = False
    is_linear_map = True

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
        if tie is not None and node.attrs["bias"]:
            raise SpecError("a tied linear reuses the embedding's weight and has no bias of its own", node.span,
                            hint="write `bias=false` with `tie=`")
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
        if node.attrs.get("tie"):
            return None  # uses the tied module's weight
        return f"nn.Linear({ins[0][-1]!r}, {node.attrs['out']!r}, bias={node.attrs['bias']!r})"

    def forward(self, node, args, out, mod, ins):
        tie = node.attrs.get("tie")
        if tie:
            return [f"{out} = F.linear({args[0]}, {node.attrs['tie_ref']})"]
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
    name = "layer_norm"
    attrs = {"eps": A(float, 1e-5, positive=True), "bias": A(bool, True)}
    pure = False

    def weights(self, node, ins):
        d = need_width(node, ins[0], "input")
        return {"weight": (d,), "bias": (d,)} if node.attrs["bias"] else {"weight": (d,)}

    def init(self, node, ins):
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


# ---- elementwise arithmetic --------------------------------------------------


def broadcast(node, a, b, verb: str):
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise SpecError(
                f"cannot {verb} tensors of shapes {fmt_shape(a)} and {fmt_shape(b)}: "
                f"dim {-i} differs ({da} vs {db})",
                node.span,
            )
    return tuple(reversed(out))


class Binary(OpDef):
    """`a op b` of two tensors, or of a tensor and the number `scalar` (attr)."""

    symbol: ClassVar[str]
    verb: ClassVar[str]
    user = False
    attrs = {"scalar": A((int, float, type(None)), None), "scalar_left": A(bool, False)}

    def infer(self, node, ins, graph):
        if len(ins) == 1:
            return ins[0]
        return broadcast(node, ins[0], ins[1], self.verb)

    def forward(self, node, args, out, mod, ins):
        if len(args) == 1:
            scalar = repr(node.attrs["scalar"])
            lhs, rhs = (scalar, args[0]) if node.attrs["scalar_left"] else (args[0], scalar)
        else:
            lhs, rhs = args
        return [f"{out} = {lhs} {self.symbol} {rhs}"]


BINARY_OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}  # the spec's operator -> its op
for _name, _sym, _verb in (("add", "+", "add"), ("sub", "-", "subtract"), ("mul", "*", "multiply"),
                           ("div", "/", "divide")):
    register(type(f"Binary_{_name}", (Binary,), {"name": _name, "symbol": _sym, "verb": _verb}))


# ---- objectives --------------------------------------------------------------


@register
class NextTokenLoss(OpDef):
    """Mean cross-entropy of logits[:, :-1] against tokens[:, 1:]."""

    name = "next_token_loss"
    inputs = ("logits", "tokens")
    attrs = {}
    is_loss = True

    def infer(self, node, ins, graph):
        logits, tokens = ins
        if len(logits) != 3 or len(tokens) != 2 or logits[:2] != tokens:
            raise SpecError(
                f"next_token_loss expects logits [B, T, V] and tokens [B, T], got {fmt_shape(logits)} and "
                f"{fmt_shape(tokens)}",
                node.span,
            )
        return ()

    def forward(self, node, args, out, mod, ins):
        logits, tokens = args
        return [
            f"{out} = F.cross_entropy(",
            f"    {logits}[:, :-1].reshape(-1, {logits}.shape[-1]).float(), {tokens}[:, 1:].reshape(-1)",
            ")",
        ]


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
