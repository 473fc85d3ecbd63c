"""Symbolic sizes: the dims of shapes, and the sizes a spec computes from them.

A dim in the IR is an int or a string over the spec's symbols (`"T"`, `"B*T"`, `"L + N"`, `"T - 1"`,
`"B*T/4"`). `Poly` reads such a string as a polynomial with rational coefficients, so that dims made by
different ops compare by value (`N + L` is `L + N`), add up (concat), split, multiply out (reshape,
flatten) and print in one canonical form. Division is exact: `T/2` is a size only where 2 divides T.

`Size` is a size as the spec writes it — `T - 1`, `N + L`, `B` — before shapes are known: an expression
over axes of tensors (`("axis", node, i)`: the size of axis i of that node). Lowering binds the nodes to
the argument positions of the op that reads the size (they become its arguments, so passes keep them);
`infer_shapes` resolves a Size to a dim, and code generation writes it as an int or `x.size(i)`.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import Any

import attrs

Dim = int | str
Monomial = tuple[str, ...]  # symbols, sorted, with repeats


@attrs.frozen
class Poly:
    """A dim as a polynomial: monomial -> coefficient (no zero coefficients; () is the constant)."""

    terms: tuple[tuple[Monomial, Fraction], ...]

    @staticmethod
    def of(terms: dict[Monomial, Fraction]) -> Poly:
        return Poly(tuple(sorted((m, c) for m, c in terms.items() if c)))

    @staticmethod
    def const(value: int | Fraction) -> Poly:
        return Poly.of({(): Fraction(value)})

    @staticmethod
    def symbol(name: str) -> Poly:
        return Poly.of({(name,): Fraction(1)})

    @staticmethod
    def parse(dim: Dim) -> Poly:
        return _parse(dim) if isinstance(dim, str) else Poly.const(dim)

    def __add__(self, other: Poly) -> Poly:
        out = dict(self.terms)
        for m, c in other.terms:
            out[m] = out.get(m, Fraction(0)) + c
        return Poly.of(out)

    def __neg__(self) -> Poly:
        return Poly.of({m: -c for m, c in self.terms})

    def __sub__(self, other: Poly) -> Poly:
        return self + -other

    def __mul__(self, other: Poly) -> Poly:
        out: dict[Monomial, Fraction] = {}
        for m1, c1 in self.terms:
            for m2, c2 in other.terms:
                m = tuple(sorted(m1 + m2))
                out[m] = out.get(m, Fraction(0)) + c1 * c2
        return Poly.of(out)

    def divide(self, other: Poly) -> Poly | None:
        """Exact division by a constant, or by a single symbol product that divides every term; else None."""
        if other.constant is not None:
            return None if other.constant == 0 else Poly.of({m: c / other.constant for m, c in self.terms})
        if len(other.terms) != 1:
            return None
        (m2, c2), out = other.terms[0], {}
        for m, c in self.terms:
            rest = list(m)
            for s in m2:
                if s not in rest:
                    return None
                rest.remove(s)
            out[tuple(rest)] = c / c2
        return Poly.of(out)

    @property
    def constant(self) -> Fraction | None:
        """The value when there is no symbol, else None."""
        if not self.terms:
            return Fraction(0)
        if len(self.terms) == 1 and self.terms[0][0] == ():
            return self.terms[0][1]
        return None

    def symbols(self) -> list[str]:
        return sorted({s for m, _c in self.terms for s in m})

    def value(self, sizes: dict[str, int | float]) -> float:
        total = 0.0
        for m, c in self.terms:
            term = float(c)
            for s in m:
                term *= sizes[s]
            total += term
        return total

    def dim(self) -> Dim:
        """The canonical dim: an int when constant (and whole), else the canonical string."""
        const = self.constant
        if const is not None and const.denominator == 1:
            return int(const)
        return _format(self)


def _format(poly: Poly) -> str:
    # symbols first (by degree, then name), the constant last: `L + N`, `T - 1`, `B*T/4`
    ordered = sorted(poly.terms, key=lambda t: (t[0] == (), -len(t[0]), t[0]))
    parts = []
    for i, (m, c) in enumerate(ordered):
        sign = "-" if c < 0 else "+"
        c = abs(c)
        num, den = c.numerator, c.denominator
        factors = ([str(num)] if num != 1 or not m else []) + list(m)
        text = "*".join(factors) + (f"/{den}" if den != 1 else "")
        if i == 0:
            parts.append(("-" if sign == "-" else "") + text)
        else:
            parts.append(f" {sign} {text}")
    return "".join(parts) or "0"


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_][A-Za-z0-9_]*)|(.))")


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> Poly:
    tokens = [(n, s, o) for n, s, o in _TOKEN.findall(text) if n or s or o.strip()]
    pos = 0

    def peek():
        return tokens[pos] if pos < len(tokens) else ("", "", "")

    def expr() -> Poly:
        nonlocal pos
        value = term()
        while peek()[2] in ("+", "-"):
            op = peek()[2]
            pos += 1
            value = value + term() if op == "+" else value - term()
        return value

    def term() -> Poly:
        nonlocal pos
        value = factor()
        while peek()[2] in ("*", "/"):
            op = peek()[2]
            pos += 1
            right = factor()
            if op == "*":
                value = value * right
            else:
                quotient = value.divide(right)
                if quotient is None:
                    raise ValueError(f"cannot divide in dim {text!r}")
                value = quotient
        return value

    def factor() -> Poly:
        nonlocal pos
        number, symbol, other = peek()
        pos += 1
        if number:
            return Poly.const(int(number))
        if symbol:
            return Poly.symbol(symbol)
        if other == "-":
            return -factor()
        if other == "(":
            value = expr()
            pos += 1  # ")"
            return value
        raise ValueError(f"malformed dim {text!r}")

    result = expr()
    if pos != len(tokens):
        raise ValueError(f"malformed dim {text!r}")
    return result


def same(a: Dim, b: Dim) -> bool:
    """Two dims of equal size (whatever their spelling)."""
    return a == b or Poly.parse(a) == Poly.parse(b)


def add(a: Dim, b: Dim) -> Dim:
    return (Poly.parse(a) + Poly.parse(b)).dim()


def sub(a: Dim, b: Dim) -> Dim:
    return (Poly.parse(a) - Poly.parse(b)).dim()


def mul(a: Dim, b: Dim) -> Dim:
    return (Poly.parse(a) * Poly.parse(b)).dim()


def div(a: Dim, b: Dim) -> Dim | None:
    """a / b when it divides exactly (as far as the symbols show), else None."""
    q = Poly.parse(a).divide(Poly.parse(b))
    if q is None:
        return None
    const = q.constant
    if const is not None and const.denominator != 1:
        return None
    return q.dim()


def product(dims) -> Dim:
    out = Poly.const(1)
    for d in dims:
        out = out * Poly.parse(d)
    return out.dim()


# ----------------------------------------------------------------------------- sizes the spec computes


@attrs.frozen
class Size:
    """A size the spec computes from the sizes of tensors: a leaf `("axis", ref, i)` (axis i of `ref`: a
    node id while lowering, an argument position once bound to the op that reads it), an int
    `("const", n)`, or `(op, left, right)` with op one of + - * //."""

    expr: tuple

    @staticmethod
    def axis(ref: Any, i: int) -> Size:
        return Size(("axis", ref, i))

    @staticmethod
    def lift(value: Any) -> Size:
        return value if isinstance(value, Size) else Size(("const", value))

    def combine(self, op: str, other: Any, *, left: bool = False) -> Size:
        a, b = (Size.lift(other), self) if left else (self, Size.lift(other))
        return Size((op, a, b))

    def refs(self) -> list:
        kind = self.expr[0]
        if kind == "axis":
            return [self.expr[1]]
        if kind == "const":
            return []
        return [*self.expr[1].refs(), *self.expr[2].refs()]

    def bind(self, index: dict) -> Size:
        """The same size with each node id replaced by `index[node id]`."""
        kind = self.expr[0]
        if kind == "axis":
            return Size(("axis", index[self.expr[1]], self.expr[2]))
        if kind == "const":
            return self
        return Size((kind, self.expr[1].bind(index), self.expr[2].bind(index)))

    def poly(self, shapes) -> Poly:
        """The size as a polynomial, reading axis sizes from `shapes` (one shape per argument)."""
        kind = self.expr[0]
        if kind == "axis":
            shape = shapes[self.expr[1]]
            i = self.expr[2]
            return Poly.parse(shape[i])
        if kind == "const":
            return Poly.const(self.expr[1])
        a, b = self.expr[1].poly(shapes), self.expr[2].poly(shapes)
        if kind == "+":
            return a + b
        if kind == "-":
            return a - b
        if kind == "*":
            return a * b
        q = a.divide(b)
        if q is None:
            raise ValueError("not divisible")
        return q

    def dim(self, shapes) -> Dim:
        return self.poly(shapes).dim()

    def code(self, args: list[str], shapes) -> str:
        """Python for this size in generated code: the int when the shapes fix it, else from `x.size(i)`."""
        resolved = self.dim(shapes)
        if isinstance(resolved, int):
            return repr(resolved)
        return self._code(args, top=True)

    def _code(self, args: list[str], top: bool = False) -> str:
        kind = self.expr[0]
        if kind == "axis":
            return f"{args[self.expr[1]]}.size({self.expr[2]})"
        if kind == "const":
            return repr(self.expr[1])
        text = f"{self.expr[1]._code(args)} {kind} {self.expr[2]._code(args)}"
        return text if top else f"({text})"

    def __repr__(self) -> str:
        kind = self.expr[0]
        if kind == "axis":
            return f"%{self.expr[1]}.size({self.expr[2]})" if isinstance(self.expr[1], str) \
                else f"arg{self.expr[1]}.size({self.expr[2]})"
        if kind == "const":
            return repr(self.expr[1])
        return f"({self.expr[1]!r} {kind} {self.expr[2]!r})"


def sizes_in(value: Any) -> list[Size]:
    """The Sizes inside an attribute value (a Size, or a list of them and ints)."""
    if isinstance(value, Size):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for item in value for s in sizes_in(item)]
    return []


def bind_sizes(value: Any, index: dict) -> Any:
    if isinstance(value, Size):
        return value.bind(index)
    if isinstance(value, list):
        return [bind_sizes(v, index) for v in value]
    if isinstance(value, tuple):
        return tuple(bind_sizes(v, index) for v in value)
    return value


def resolve(value: Any, shapes) -> Any:
    """An attribute value with every Size replaced by its dim."""
    if isinstance(value, Size):
        return value.dim(shapes)
    if isinstance(value, list):
        return [resolve(v, shapes) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve(v, shapes) for v in value)
    return value
