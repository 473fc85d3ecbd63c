"""Scalar expressions of the language: parameters, arithmetic, conditions.

`evaluate` computes an expression over an environment of scalar values; it
never runs user text as code. `Unfolded` is an op attribute that lowering
leaves as an expression for the `fold_params` pass to evaluate and check.
"""

from __future__ import annotations

import operator
from typing import Any

import attrs

from archc.dsl import ast
from archc.dsl.diagnostics import SpecError, did_you_mean

Scalar = int | float | bool | str | list

_ARITH = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
    "//": operator.floordiv, "%": operator.mod, "**": operator.pow,
}
_COMPARE = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
}
BUILTINS = {"min": min, "max": max}


@attrs.frozen(eq=False)
class Unfolded:
    """An attribute still written as a spec expression, with the scalars it may name."""

    expr: ast.Expr
    env: dict[str, Any]

    def __repr__(self) -> str:
        return "<unfolded>"


def type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "list"}.get(type(value), "tensor")


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
        if isinstance(a, str) != isinstance(b, str) and op not in ("==", "!="):
            raise SpecError(f"cannot compare {type_name(a)} with {type_name(b)}", span)
        return _COMPARE[op](a, b)
    numeric = (int, float)
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        return a + b
    if not (isinstance(a, numeric) and isinstance(b, numeric)) or isinstance(a, bool) or isinstance(b, bool):
        raise SpecError(f"cannot apply `{op}` to {type_name(a)} and {type_name(b)}", span)
    if op in ("/", "//", "%") and b == 0:
        raise SpecError("division by zero", span)
    if op == "**" and abs(b) > 64:
        raise SpecError(f"exponent {b} is too large", span)
    return _ARITH[op](a, b)


def _want_bool(op: str, value: Any, span) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"`{op}` needs true/false on both sides, got {type_name(value)}", span)


def evaluate(expr: ast.Expr, env: dict[str, Any]) -> Any:
    """The scalar value of `expr`; names resolve in `env`."""
    if isinstance(expr, (ast.Num, ast.Str, ast.Bool)):
        return expr.value
    if isinstance(expr, ast.Name):
        if expr.id not in env:
            raise SpecError(f"unknown name `{expr.id}`", expr.span, hint=did_you_mean(expr.id, env))
        value = env[expr.id]
        if not isinstance(value, (int, float, bool, str, list)):
            raise SpecError(f"`{expr.id}` is a tensor, but a number or flag is expected here", expr.span)
        return value
    if isinstance(expr, ast.ListExpr):
        return [evaluate(item, env) for item in expr.items]
    if isinstance(expr, ast.UnaryOp):
        value = evaluate(expr.operand, env)
        if expr.op == "not":
            _want_bool("not", value, expr.span)
            return not value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise SpecError(f"cannot negate {type_name(value)}", expr.span)
        return -value
    if isinstance(expr, ast.BinOp):
        return scalar_op(expr.op, evaluate(expr.left, env), evaluate(expr.right, env), expr.span)
    if isinstance(expr, ast.Call):
        if expr.func in BUILTINS and not expr.kwargs and expr.args:
            values = [evaluate(a, env) for a in expr.args]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise SpecError(f"`{expr.func}` takes numbers", expr.span)
            return BUILTINS[expr.func](values)
        raise SpecError(f"`{expr.func}(...)` makes a tensor, but a number or flag is expected here", expr.span)
    raise SpecError("unsupported expression", getattr(expr, "span", None))  # pragma: no cover


def coerce(value: Any, type_: str, span, what: str) -> Any:
    """Check a value against a declared scalar type (int, float, bool, str)."""
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
        raise SpecError(f"{what} is declared {type_} but the value is {type_name(value)} {value!r}", span)
    return value
