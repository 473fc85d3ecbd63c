"""Scalar expressions of the language: parameters, arithmetic, conditions.

`evaluate` computes an expression over an environment of scalar values; it
never runs user text as code. `Unfolded` is an op attribute that lowering
leaves as an expression for the `fold_params` pass to evaluate and check.
Besides numbers, flags, strings and lists, a value may be a `Size` (the size
of a symbolic dim such as `T`, and arithmetic on it: `T - 1`, `N + L`) or an
`InitRule` (`normal(0.02)`, the value of `init=`).
"""

from __future__ import annotations

import json
import math
import operator
from typing import Any

import attrs

from archc.compiler.dims import Size
from archc.dsl import ast
from archc.dsl.diagnostics import SpecError, did_you_mean
from archc.dsl.resolve import INIT_RULES

Scalar = int | float | bool | str | list | Size

_ARITH = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "**": operator.pow,
}
_BITS = {"&": operator.and_, "|": operator.or_, "^": operator.xor, "<<": operator.lshift, ">>": operator.rshift}
_COMPARE = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
def _of_one(name: str, fn):
    def apply(values: list) -> float:
        if len(values) != 1:
            raise ValueError(f"`{name}` of numbers takes one, got {len(values)}")
        return fn(values[0])
    return apply


# Functions of numbers the spec may call while compiling; of a tensor, the same names are ops.
BUILTINS = {"min": min, "max": max, "sqrt": _of_one("sqrt", math.sqrt), "exp": _of_one("exp", math.exp),
            "log": _of_one("log", math.log), "sin": _of_one("sin", math.sin), "cos": _of_one("cos", math.cos)}
MAX_INT_BITS = 1000  # larger ints are surely mistakes, and every int this size converts to a float


@attrs.frozen
class InitRule:
    """An initialisation rule as the spec writes it (`normal(0.02)`): its name and its arguments by name."""

    rule: str
    args: tuple[tuple[str, float], ...]

    def __repr__(self) -> str:
        return f"{self.rule}({', '.join(f'{k}={v!r}' for k, v in self.args)})"


# Arguments an init rule needs (the others default as GRAMMAR.md says).
_INIT_REQUIRED = {"constant": ("value",), "normal": ("std",), "trunc_normal": ("std",), "uniform": ("low", "high")}


@attrs.frozen(eq=False)
class Unfolded:
    """An attribute still written as a spec expression, with the scalars it may name."""

    expr: ast.Expr
    env: dict[str, Any]

    def __repr__(self) -> str:
        return "<unfolded>"


def show(value: Any) -> str:
    """A value as the spec would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        text = "[" + ", ".join(show(v) for v in value) + "]"
        return text if len(text) <= 60 else text[:56] + " ...]"
    return repr(value)


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "list", Size: "size", InitRule: "init rule"}.get(
        type(value), "tensor")


def scalar_op(op: str, a: Any, b: Any, span) -> Any:
    """Apply a binary operator to two scalars with the language's rules."""
    if op in ("and", "or"):
        _want_bool(op, a, span)
        _want_bool(op, b, span)
        return (a and b) if op == "and" else (a or b)
    if op == "in":
        if not isinstance(b, list):
            raise SpecError(f"`in` needs a list on its right, got {type_name(b)}", span)
        return a in b
    if op in _COMPARE:
        if op not in ("==", "!=") and not (_is_number(a) and _is_number(b) or
                                             isinstance(a, str) and isinstance(b, str)):
            raise SpecError(f"cannot compare {type_name(a)} with {type_name(b)}", span,
                            hint="`<`, `<=`, `>` and `>=` compare two numbers or two strings")
        return _COMPARE[op](a, b)
    if op == "@":
        raise SpecError(f"`@` is the matrix product of tensors, not of {type_name(a)} and {type_name(b)}", span)
    if isinstance(a, Size) or isinstance(b, Size):
        return _size_op(op, a, b, span)
    if op in _BITS:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)):
            raise SpecError(f"`{op}` takes ints, got {type_name(a)} and {type_name(b)}", span)
        if op in ("<<", ">>") and not 0 <= b <= 64:
            raise SpecError(f"a shift by {show(b) if abs(b) < 10**6 else '(a huge number)'} is out of range: 0 to 64",
                            span)
        return check_size(_BITS[op](a, b), span)
    numeric = (int, float)
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        return a + b
    if not (isinstance(a, numeric) and isinstance(b, numeric)) or isinstance(a, bool) or isinstance(b, bool):
        raise SpecError(f"cannot apply `{op}` to {type_name(a)} and {type_name(b)}", span)
    if op in ("/", "//", "%") and b == 0:
        raise SpecError("division by zero", span)
    if op == "**" and abs(b) > 64:
        raise SpecError(f"exponent {show(b) if abs(b) < 10**6 else '(a huge number)'} is too large: at most 64",
                        span)
    try:
        result = _ARITH[op](a, b)
    except ZeroDivisionError:
        raise SpecError("division by zero", span) from None
    except OverflowError:
        raise SpecError(f"the result of `{op}` is too large", span) from None
    if isinstance(result, complex):
        raise SpecError(f"`{op}` gives a complex number here; a negative base needs a whole exponent", span)
    return check_size(result, span)


def _size_op(op: str, a: Any, b: Any, span) -> Size:
    """Arithmetic on the size of a symbolic dim: `+ - *` with ints or sizes, `//` by them (exactly)."""
    for value in (a, b):
        if not isinstance(value, Size) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise SpecError(f"cannot apply `{op}` to a size and {type_name(value)} {show(value)}", span,
                            hint="sizes of symbolic dims combine with ints: `T - 1`, `N + L`, `2 * T`")
    if op not in ("+", "-", "*", "//"):
        raise SpecError(f"`{op}` is not defined on the size of a symbolic dim (known only when the model runs)",
                        span, hint="sizes take `+`, `-`, `*` and `//`" + (
                            "; an `if` on a dim's size cannot be decided when compiling" if op in _COMPARE else ""))
    return Size.lift(a).combine(op, b)


def init_rule(call: ast.Call, env: dict[str, Any]) -> InitRule:
    """`normal(0.02, mean=0.0)` and the like, as a value (each argument a number)."""
    names = INIT_RULES[call.func]
    if len(call.args) > len(names):
        raise SpecError(f"the init rule `{call.func}` takes at most {len(names)} arguments"
                        + (f" ({', '.join(names)})" if names else ""), call.args[len(names)].span)
    given = dict(zip(names, call.args))
    for kw in call.kwargs:
        if kw.name not in names:
            raise SpecError(f"the init rule `{call.func}` has no argument `{kw.name}`", kw.span,
                            hint=did_you_mean(kw.name, names) or f"its arguments are: {', '.join(names) or 'none'}")
        given[kw.name] = kw.value
    args = []
    for name in names:
        if name not in given:
            if name in _INIT_REQUIRED.get(call.func, ()):
                raise SpecError(f"the init rule `{call.func}` needs its `{name}`", call.span)
            continue
        value = evaluate(given[name], env)
        if not _is_number(value):
            raise SpecError(f"`{name}` of `{call.func}` must be a number, got {type_name(value)}", given[name].span)
        args.append((name, float(value)))
    rule = InitRule(call.func, tuple(args))
    values = dict(args)
    if call.func in ("normal", "trunc_normal") and values["std"] <= 0:
        raise SpecError(f"`std` of `{call.func}` must be positive, got {show(values['std'])}", given["std"].span)
    if call.func == "uniform" and values["low"] >= values["high"]:
        raise SpecError(f"`uniform` needs low < high, got low={show(values['low'])}, high={show(values['high'])}",
                        call.span)
    return rule


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_size(value: Any, span) -> Any:
    """`value`, unless it is a number too large to be meant (an int past MAX_INT_BITS, an infinite float)."""
    if isinstance(value, float) and not math.isfinite(value) or \
            isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise SpecError("this number is too large", span)
    return value


def _want_bool(op: str, value: Any, span) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"`{op}` needs true/false on both sides, got {type_name(value)}", span)


def evaluate(expr: ast.Expr, env: dict[str, Any]) -> Any:
    """The scalar value of `expr`; names resolve in `env`."""
    if isinstance(expr, ast.Num):
        return check_size(expr.value, expr.span)
    if isinstance(expr, (ast.Str, ast.Bool)):
        return expr.value
    if isinstance(expr, ast.Name):
        if expr.id not in env:
            raise SpecError(f"unknown name `{expr.id}`", expr.span, hint=did_you_mean(expr.id, env))
        value = env[expr.id]
        if not isinstance(value, (int, float, bool, str, list, Size)):
            raise SpecError(f"`{expr.id}` is a tensor, but a number or flag is expected here", expr.span)
        return value
    if isinstance(expr, ast.ListExpr):
        return [evaluate(item, env) for item in expr.items]
    if isinstance(expr, ast.UnaryOp):
        value = evaluate(expr.operand, env)
        if expr.op == "not":
            _want_bool("not", value, expr.span)
            return not value
        if isinstance(value, Size):
            return value.combine("*", -1)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SpecError(f"cannot negate {type_name(value)}", expr.span)
        return -value
    if isinstance(expr, ast.BinOp):
        return scalar_op(expr.op, evaluate(expr.left, env), evaluate(expr.right, env), expr.span)
    if isinstance(expr, ast.Call):
        if expr.func in INIT_RULES:
            return init_rule(expr, env)
        if expr.func in BUILTINS:
            if expr.kwargs:
                raise SpecError(f"`{expr.func}` takes no keyword arguments", expr.kwargs[0].span)
            if not expr.args:
                raise SpecError(f"`{expr.func}` needs at least one number, as in `{expr.func}(a, b)`", expr.span)
            values = [evaluate(a, env) for a in expr.args]
            for arg, value in zip(expr.args, values):
                if not _is_number(value):
                    raise SpecError(f"`{expr.func}` takes numbers, got {type_name(value)}", arg.span)
            try:
                return check_size(BUILTINS[expr.func](values), expr.span)
            except (ValueError, OverflowError) as err:  # sqrt(-1), log(0), exp(1000), sqrt(1, 2)
                message = str(err) if str(err).startswith("`") else f"`{expr.func}` of {show(values[0])}: {err}"
                raise SpecError(message, expr.span) from None
        raise SpecError(f"a number or flag is expected here, but `{expr.func}(...)` is a call that makes a tensor",
                        expr.func_span, hint=did_you_mean(expr.func, BUILTINS))
    if isinstance(expr, ast.Index):
        return pick(evaluate(expr.value, env), expr, env)
    raise SpecError("unsupported expression", getattr(expr, "span", None))  # pragma: no cover


def pick(value: Any, expr: ast.Index, env: dict[str, Any]) -> Any:
    """`xs[i]` of a list, decided when compiling."""
    if not isinstance(value, list):
        raise SpecError(f"only tensors and lists can be indexed, not {type_name(value)}", expr.value.span)
    if len(expr.items) != 1 or isinstance(expr.items[0], (ast.Slice, ast.EllipsisIndex)):
        raise SpecError("a list takes one position, as in `xs[i]`", expr.span)
    i = evaluate(expr.items[0], env)
    if not isinstance(i, int) or isinstance(i, bool):
        raise SpecError(f"a list position must be an int, got {type_name(i)}", expr.items[0].span)
    if not -len(value) <= i < len(value):
        raise SpecError(f"position {i} is outside a list of {len(value)}", expr.items[0].span)
    return value[i]


def coerce(value: Any, type_: str, span, what: str) -> Any:
    """Check a value against a declared scalar type (int, float, bool, str)."""
    check_size(value, span)
    if type_ == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, float),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(type_)
    if ok is None:
        raise SpecError(f"unknown type `{type_}`", span, hint=did_you_mean(type_, ["int", "float", "bool", "str"]))
    if not ok:
        raise SpecError(f"{what} is declared {type_} but the value is {type_name(value)} {show(value)}", span)
    return value
