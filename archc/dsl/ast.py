"""The typed AST of a .arch file.

Frozen attrs classes, built at the parse boundary (parser.py) so that no
`lark.Tree` travels further. Every node carries a `Span` into its source.
"""

from __future__ import annotations

from typing import Union

import attrs


@attrs.frozen(eq=False)
class SourceFile:
    """A spec's text and the name errors show for it (a path as the user gave it)."""

    name: str
    text: str

    def line(self, lineno: int) -> str:
        lines = self.text.splitlines()
        return lines[lineno - 1] if 0 < lineno <= len(lines) else ""


@attrs.frozen
class Span:
    source: SourceFile = attrs.field(eq=False, repr=False)
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.source.name}:{self.line}:{self.column}"

    @property
    def short(self) -> str:
        """`file.arch:12` — used in provenance comments of generated code."""
        return f"{self.source.name.rsplit('/', 1)[-1]}:{self.line}"


# ---- expressions -------------------------------------------------------------


@attrs.frozen
class Num:
    value: int | float
    span: Span


@attrs.frozen
class Str:
    value: str
    span: Span


@attrs.frozen
class Bool:
    value: bool
    span: Span


@attrs.frozen
class Name:
    id: str
    span: Span


@attrs.frozen
class ListExpr:
    items: tuple[Expr, ...]
    span: Span


@attrs.frozen
class BinOp:
    op: str  # one of + - * / // % ** == != < <= > >= in and or
    left: Expr
    right: Expr
    span: Span


@attrs.frozen
class UnaryOp:
    op: str  # "-" or "not"
    operand: Expr
    span: Span


@attrs.frozen
class Kwarg:
    name: str
    value: Expr
    span: Span


@attrs.frozen
class Call:
    func: str
    args: tuple[Expr, ...]
    kwargs: tuple[Kwarg, ...]
    label: str | None  # `op(...) as label` names the module in generated code
    span: Span
    func_span: Span


Expr = Union[Num, Str, Bool, Name, ListExpr, BinOp, UnaryOp, Call]


# ---- types -------------------------------------------------------------------


@attrs.frozen
class ScalarType:
    name: str  # int | float | bool | str
    span: Span


@attrs.frozen
class TensorType:
    kind: str  # Tokens | Tensor | Image | ...
    dims: tuple[Expr, ...]
    span: Span


# ---- statements --------------------------------------------------------------


@attrs.frozen
class Assign:
    target: str
    value: Expr
    span: Span


@attrs.frozen
class AugAssign:
    """`x += f(x)`: a residual update."""

    target: str
    value: Expr
    span: Span


@attrs.frozen
class Repeat:
    var: str
    start: Expr
    stop: Expr
    name: str | None  # the ModuleList's name in generated code
    body: tuple[Stmt, ...]
    span: Span


@attrs.frozen
class If:
    branches: tuple[tuple[Expr, tuple[Stmt, ...]], ...]
    orelse: tuple[Stmt, ...]
    span: Span


@attrs.frozen
class Return:
    values: tuple[Expr, ...]
    span: Span


Stmt = Union[Assign, AugAssign, Repeat, If, Return]


# ---- top level ---------------------------------------------------------------


@attrs.frozen
class Param:
    """A block or model parameter: `heads: int = 4` or `x: Tensor[B, T, D]`."""

    name: str
    type: ScalarType | TensorType
    default: Expr | None
    span: Span


@attrs.frozen
class ParamDecl:
    """A spec-level parameter, overridable with `-D name=value`."""

    name: str
    type: ScalarType
    default: Expr
    span: Span


@attrs.frozen
class Use:
    path: str
    span: Span


@attrs.frozen
class BlockDef:
    name: str
    params: tuple[Param, ...]
    body: tuple[Stmt, ...]
    span: Span
    is_model: bool = False


@attrs.frozen
class Module:
    source: SourceFile
    uses: tuple[Use, ...]
    params: tuple[ParamDecl, ...]
    blocks: tuple[BlockDef, ...]  # models included, flagged by is_model
