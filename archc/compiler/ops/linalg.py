"""Products of tensors and positions: `a @ b` (`matmul(a, b)`), `einsum("ij,jk->ik", a, b)`, `arange(n)`.

What a paper writes as `q @ k.T`, `softmax(scores) @ v`, CLIP's `image @ text.T` or a hyper-connection's
small mixing matrix. `matmul` follows torch.matmul (batch axes broadcast; a 1-D side is a vector),
`einsum` takes one or two operands and an equation of lowercase letters (the dims each letter stands
for must agree), and `arange(n)` gives the positions 0 … n-1 as `Tokens[n]` (n an int, a parameter or a
dim such as `B` or `T`), for targets like CLIP's `arange(B)`.
"""

from __future__ import annotations

import re

from archc.compiler import dims
from archc.compiler.dims import Size
from archc.compiler.ops.base import A, OpDef, fmt_shape, numel, register
from archc.compiler.ops.elementwise import broadcast
from archc.dsl.diagnostics import SpecError


def _floats(op: str, dtypes: list[str], span) -> str:
    if any(d != "float" for d in dtypes):
        raise SpecError(f"`{op}` multiplies float tensors, and an operand holds "
                        + ("true/false" if "bool" in dtypes else "integers"), span,
                        hint="make it floats first: `where(mask, 1.0, 0.0)` or `ids * 1.0`")
    return "float"


@register
class Matmul(OpDef):
    """torch.matmul: [..., m, k] @ [..., k, n] -> [..., m, n], batch axes broadcast."""

    name = "matmul"
    inputs = ("a", "b")

    def dtype(self, attrs, dtypes, span):
        return _floats("@", dtypes, span)

    def infer(self, node, ins, graph):
        a, b = ins
        if not a or not b:
            raise SpecError(f"`@` needs tensors with at least one axis, got {fmt_shape(a)} @ {fmt_shape(b)}",
                            node.span)
        left, right = (a if len(a) > 1 else (1, *a)), (b if len(b) > 1 else (*b, 1))
        if not dims.same(left[-1], right[-2]):
            raise SpecError(f"cannot multiply {fmt_shape(a)} @ {fmt_shape(b)}: the inner dims differ "
                            f"({left[-1]} vs {right[-2]})", node.span,
                            hint="transpose one side, e.g. `a @ transpose(b, -2, -1)`")
        batch = broadcast(node, left[:-2], right[:-2], "multiply (batch axes)")
        return (*batch, *((left[-2],) if len(a) > 1 else ()), *((right[-1],) if len(b) > 1 else ()))

    def flops(self, node, ins, out, sizes):
        inner = ins[0][-1]
        return 2 * numel(out, sizes) * numel((inner,), sizes)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]} @ {args[1]}"]


_EQUATION = re.compile(r"[a-z]+(,[a-z]+)?->[a-z]*")


@register
class Einsum(OpDef):
    """torch.einsum over one or two operands; the equation is checked letter by letter against the shapes."""

    name = "einsum"
    inputs = ("a", "b")
    optional_inputs = frozenset({"b"})
    attrs = {"equation": A(str)}
    positional = ("equation", "a", "b")  # as torch.einsum writes it

    def dtype(self, attrs, dtypes, span):
        return _floats("einsum", dtypes, span)

    def _letters(self, node, ins) -> tuple[list[str], str, dict[str, object]]:
        equation = node.attrs["equation"]
        if not _EQUATION.fullmatch(equation):
            raise SpecError(f"einsum equation {equation!r} is not of the form \"ij,jk->ik\" (lowercase letters, one "
                            "or two operands, `->` and the output's letters)", node.span)
        inputs, output = equation.split("->")
        operands = inputs.split(",")
        if len(operands) != len(ins):
            raise SpecError(f"einsum equation {equation!r} names {len(operands)} operand(s), the call gives "
                            f"{len(ins)}", node.span)
        size: dict[str, object] = {}
        for i, (letters, shape) in enumerate(zip(operands, ins)):
            if len(letters) != len(shape):
                raise SpecError(f"einsum operand {i} is {fmt_shape(shape)} ({len(shape)} axes) but `{letters}` "
                                f"names {len(letters)}", node.span)
            if len(set(letters)) != len(letters):
                raise SpecError(f"einsum operand {i}: `{letters}` repeats a letter (a diagonal is not built)",
                                node.span)
            for letter, dim in zip(letters, shape):
                if letter in size and not dims.same(size[letter], dim):
                    if size[letter] == 1 or dim == 1:
                        raise SpecError(f"einsum: `{letter}` is {size[letter]} in one operand and {dim} in "
                                        "another (einsum does not broadcast here)", node.span)
                    raise SpecError(f"einsum: `{letter}` stands for {size[letter]} and for {dim}", node.span)
                size.setdefault(letter, dim)
        if len(set(output)) != len(output) or any(letter not in size for letter in output):
            raise SpecError(f"einsum output `{output}` must name each letter of the inputs at most once", node.span)
        return operands, output, size

    def infer(self, node, ins, graph):
        _operands, output, size = self._letters(node, ins)
        return tuple(size[letter] for letter in output)

    def flops(self, node, ins, out, sizes):
        _operands, _output, size = self._letters(node, ins)
        return 2 * numel(tuple(size.values()), sizes) if len(ins) == 2 else 0

    def forward(self, node, args, out, mod, ins):
        tensors = ", ".join(args[:len(ins)])
        return [f"{out} = torch.einsum({node.attrs['equation']!r}, {tensors})"]


@register
class Arange(OpDef):
    """The positions 0 … n-1 (`Tokens[n]`); n an int or a size of the tensors (`B`, `T - 1`)."""

    name = "arange"
    inputs = ()
    attrs = {"n": A((int, Size))}

    def dtype(self, attrs, dtypes, span):
        return "long"

    def infer(self, node, ins, graph):
        n = node.attrs["n"]
        n = n.dim(ins) if isinstance(n, Size) else n
        if isinstance(n, int) and n < 1:
            raise SpecError(f"arange needs a positive count, got {n}", node.span)
        return (n,)

    def init(self, node, ins):
        n = node.attrs["n"]
        return None if isinstance(n, Size) else f"AF.Positions({n!r})"

    def forward(self, node, args, out, mod, ins):
        n = node.attrs["n"]
        if isinstance(n, Size):  # the device of a tensor whose size it reads
            return [f"{out} = torch.arange({n.code(args, ins)}, device={args[0]}.device)"]
        return [f"{out} = {mod}()"]
