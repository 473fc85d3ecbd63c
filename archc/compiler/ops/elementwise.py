"""Elementwise arithmetic and reductions: `a op b` of tensors (and numbers) with PyTorch's broadcasting,
`exp`, `log`, `sqrt`, `sin`, `cos`, `abs`, `softmax` and `log_softmax`, `logsumexp`, and `mean` / `sum` / `max` / `min`
over axes.

Dtypes follow the values: on `Tokens` (integers) `+ - * // % **` and the bit operations `& | ^ << >>`
stay integers, `/` and floats give floats, comparisons give a mask (true/false) that `& | ^`, `not`
and `where(...)` take. That is what n-gram hashing in a spec needs. A combination PyTorch would refuse
or silently change (a bit operation on floats, arithmetic on masks) is a located error.
"""

from __future__ import annotations

from typing import ClassVar

from archc.compiler.dims import Size, same
from archc.compiler.ops.base import A, OpDef, axis_of, dim_arg, fmt_shape, register
from archc.dsl.diagnostics import SpecError

# ---- a op b ------------------------------------------------------------------


def broadcast(node, a, b, verb: str):
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if same(da, db) or db == 1:
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


ARITHMETIC, COMPARISON, BITS, SHIFTS = "arithmetic", "comparison", "bits", "shifts"


class Binary(OpDef):
    """`a op b` of two tensors, or of a tensor and the number `scalar` (attr)."""

    symbol: ClassVar[str]
    verb: ClassVar[str]
    kind: ClassVar[str]
    user = False
    attrs = {"scalar": A((int, float, type(None)), None), "scalar_left": A(bool, False)}

    def infer(self, node, ins, graph):
        if len(ins) == 1:
            return ins[0]
        return broadcast(node, ins[0], ins[1], self.verb)

    def dtype(self, attrs, dtypes, span):
        scalar = attrs.get("scalar")
        kinds = [*dtypes, *(["float" if isinstance(scalar, float) else "long"] if scalar is not None else [])]
        if self.kind == COMPARISON:
            return "bool"
        if self.kind in (BITS, SHIFTS):
            if "float" in kinds or (self.kind == SHIFTS and "bool" in kinds):
                what = "integers (`Tokens`)" + (" or masks" if self.kind == BITS else "")
                raise SpecError(f"`{self.symbol}` takes {what}; this operand is "
                                + ("a float tensor" if "float" in dtypes else "a mask" if "bool" in dtypes
                                   else f"the number {scalar!r}"), span)
            return "bool" if all(k == "bool" for k in kinds) else "long"
        if "bool" in dtypes:
            raise SpecError(f"a mask (true/false) takes `&`, `|`, `^`, `not` and `where(...)`, not `{self.symbol}`",
                            span, hint="turn it into numbers with where(mask, 1.0, 0.0)")
        if self.name == "div" or "float" in kinds:
            return "float"
        return "long"

    def forward(self, node, args, out, mod, ins):
        if len(args) == 1:
            scalar = repr(node.attrs["scalar"])
            lhs, rhs = (scalar, args[0]) if node.attrs["scalar_left"] else (args[0], scalar)
        else:
            lhs, rhs = args
        return [f"{out} = {lhs} {self.symbol} {rhs}"]


# the spec's operator -> (its op, Python's operator, verb for errors, kind)
_BINARY = {
    "+": ("add", "add", ARITHMETIC), "-": ("sub", "subtract", ARITHMETIC), "*": ("mul", "multiply", ARITHMETIC),
    "/": ("div", "divide", ARITHMETIC), "//": ("floordiv", "divide", ARITHMETIC),
    "%": ("mod", "take the remainder of", ARITHMETIC), "**": ("pow", "raise", ARITHMETIC),
    "==": ("eq", "compare", COMPARISON), "!=": ("ne", "compare", COMPARISON), "<": ("lt", "compare", COMPARISON),
    "<=": ("le", "compare", COMPARISON), ">": ("gt", "compare", COMPARISON), ">=": ("ge", "compare", COMPARISON),
    "&": ("bit_and", "combine", BITS), "|": ("bit_or", "combine", BITS), "^": ("bit_xor", "combine", BITS),
    "<<": ("lshift", "shift", SHIFTS), ">>": ("rshift", "shift", SHIFTS),
}
BINARY_OPS = {symbol: name for symbol, (name, _verb, _kind) in _BINARY.items()}
for _sym, (_name, _verb, _kind) in _BINARY.items():
    register(type(f"Binary_{_name}", (Binary,), {"name": _name, "symbol": _sym, "verb": _verb, "kind": _kind}))


@register
class Not(OpDef):
    """`not m` of a mask."""

    name = "not"
    attrs = {}
    user = False

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] != "bool":
            raise SpecError("`not` of a tensor needs a mask (true/false), as comparisons give", span)
        return "bool"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = ~{args[0]}"]


# ---- elementwise functions -----------------------------------------------------


def _floats(op: str, dtypes: list[str], span, *, integers: bool) -> str:
    """A float function's value dtype; a located error for an input it does not take."""
    if dtypes[0] == "bool" or (dtypes[0] == "long" and not integers):
        raise SpecError(f"`{op}` takes a float tensor, and this one holds "
                        + ("true/false" if dtypes[0] == "bool" else "integers"), span,
                        hint="make it floats first: `where(mask, 1.0, 0.0)` or `ids * 1.0`")
    return "float"


class Unary(OpDef):
    """A float function of each element (of integers too, which it turns into floats)."""

    call: ClassVar[str]

    def dtype(self, attrs, dtypes, span):
        return _floats(self.name, dtypes, span, integers=True)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {self.call.format(x=args[0])}"]


for _fn in ("exp", "log", "sqrt", "sin", "cos"):
    register(type(f"Unary_{_fn}", (Unary,), {"name": _fn, "call": f"torch.{_fn}({{x}})"}))


@register
class Abs(OpDef):
    name = "abs"

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] == "bool":  # torch has no abs of booleans; a mask is already its own magnitude
            raise SpecError("`abs` takes numbers, and this tensor holds true/false", span,
                            hint="a mask needs no abs; for 0/1 numbers write `where(mask, 1.0, 0.0)`")
        return dtypes[0]

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = torch.abs({args[0]})"]


class Softmax(OpDef):
    """softmax / log_softmax along one axis (computed in float32, as attention's softmax is)."""

    attrs = {"dim": dim_arg(-1)}
    call: ClassVar[str]

    def dtype(self, attrs, dtypes, span):
        return _floats(self.name, dtypes, span, integers=False)

    def infer(self, node, ins, graph):
        axis_of(node, ins[0], node.attrs["dim"], ins)
        return ins[0]

    def forward(self, node, args, out, mod, ins):
        dim = axis_of(node, ins[0], node.attrs["dim"], ins, code=True)
        return [f"{out} = {self.call}({args[0]}, dim={dim})"]


register(type("Softmax_softmax", (Softmax,), {"name": "softmax", "call": "F.softmax"}))
register(type("Softmax_log_softmax", (Softmax,), {"name": "log_softmax", "call": "F.log_softmax"}))


# ---- reductions --------------------------------------------------------------------


class Reduction(OpDef):
    """A reduction over one axis or several (`dim` a number, a named dim, or a list of them)."""

    method: ClassVar[str]
    attrs = {"dim": A((int, Size, list)), "keepdim": A(bool, False)}

    def axes(self, node, ins, *, code: bool = False) -> list:
        dims = node.attrs["dim"] if isinstance(node.attrs["dim"], list) else [node.attrs["dim"]]
        if not dims:
            raise SpecError(f"`{self.name}` needs at least one axis in `dim`", node.span)
        axes = [axis_of(node, ins[0], d, ins) for d in dims]
        if len(set(axes)) != len(axes):
            raise SpecError(f"`{self.name}` names one axis twice in dim={dims!r}", node.span)
        return [axis_of(node, ins[0], d, ins, code=True) for d in dims] if code else axes

    def infer(self, node, ins, graph):
        axes = self.axes(node, ins)
        if node.attrs["keepdim"]:
            return tuple(1 if i in axes else d for i, d in enumerate(ins[0]))
        return tuple(d for i, d in enumerate(ins[0]) if i not in axes)

    def dtype(self, attrs, dtypes, span):
        if self.method in ("mean", "logsumexp"):
            return _floats(self.name, dtypes, span, integers=False)
        return "long" if dtypes[0] == "bool" else dtypes[0]

    def forward(self, node, args, out, mod, ins):
        axes = self.axes(node, ins, code=True)
        dim = axes[0] if len(axes) == 1 else "(" + ", ".join(map(str, axes)) + ")"
        keep = ", keepdim=True" if node.attrs["keepdim"] else ""
        return [f"{out} = {args[0]}.{self.method}(dim={dim}{keep})"]


for _name, _method in (("mean", "mean"), ("sum", "sum"), ("max", "amax"), ("min", "amin")):
    register(type(f"Reduction_{_name}", (Reduction,), {"name": _name, "method": _method}))


@register
class CumSum(OpDef):
    """Running sums along one axis (integers stay integers, a mask counts)."""

    name = "cumsum"
    attrs = {"dim": dim_arg(-1)}

    def dtype(self, attrs, dtypes, span):
        return "long" if dtypes[0] == "bool" else dtypes[0]

    def infer(self, node, ins, graph):
        axis_of(node, ins[0], node.attrs["dim"], ins)
        return ins[0]

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.cumsum(dim={axis_of(node, ins[0], node.attrs['dim'], ins, code=True)})"]


@register
class LogSumExp(Reduction):
    name = "logsumexp"
    method = "logsumexp"
    attrs = {"dim": A((int, Size, list), -1), "keepdim": A(bool, False)}
