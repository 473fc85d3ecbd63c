"""The typed AST of a .arch file.

Frozen attrs classes, built at the parse boundary (parser.py) so that no
`lark.Tree` travels further. Every node carries a `Span` into its source.
"""

from __future__ import annotations

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
    op: str  # one of + - * / // % ** & | ^ << >> == != < <= > >= in and or
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
    # `op(...) as label shared`: every call so labelled in one body is one module
    shared: bool = False


@attrs.frozen
class Slice:
    """`a:b:c` inside `x[...]`; a missing part is None (`:` is the whole axis)."""

    start: Expr | None
    stop: Expr | None
    step: Expr | None
    span: Span


@attrs.frozen
class EllipsisIndex:
    """`...` inside `x[...]`: as many whole axes as the other items leave."""

    span: Span


@attrs.frozen
class Index:
    """`x[i, a:b, ...]`: each item an expression (one position), a Slice or `...`."""

    value: Expr
    items: tuple[Expr | Slice | EllipsisIndex, ...]
    span: Span


Expr = Num | Str | Bool | Name | ListExpr | BinOp | UnaryOp | Call | Index


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
class Unpack:
    """`a, b = f(x)` (one value holding as many parts) or `a, b = b, a` (one value per name).

    A target `_` discards its part.
    """

    targets: tuple[str, ...]
    target_spans: tuple[Span, ...]
    values: tuple[Expr, ...]
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


Stmt = Assign | AugAssign | Unpack | Repeat | If | Return


def expressions(stmt: Stmt):
    """The expressions a statement evaluates itself (not those of the statements it holds)."""
    if isinstance(stmt, (Assign, AugAssign)):
        return (stmt.value,)
    if isinstance(stmt, Unpack):
        return stmt.values
    if isinstance(stmt, Repeat):
        return (stmt.start, stmt.stop)
    if isinstance(stmt, If):
        return tuple(cond for cond, _body in stmt.branches)
    if isinstance(stmt, Return):
        return stmt.values
    return ()


def bodies(stmt: Stmt) -> tuple[tuple[Stmt, ...], ...]:
    """The statement lists a statement holds: a repeat's body, an if's branches."""
    if isinstance(stmt, Repeat):
        return (stmt.body,)
    if isinstance(stmt, If):
        return (*(body for _cond, body in stmt.branches), stmt.orelse)
    return ()


def subexpressions(expr):
    """`expr` and every expression inside it, outermost first (kwargs as their values)."""
    stack = [expr]
    while stack:
        node = stack.pop()
        if node is None:
            continue
        yield node
        if isinstance(node, ListExpr):
            stack.extend(reversed(node.items))
        elif isinstance(node, BinOp):
            stack.extend((node.right, node.left))
        elif isinstance(node, UnaryOp):
            stack.append(node.operand)
        elif isinstance(node, Call):
            stack.extend(reversed([*node.args, *(kw.value for kw in node.kwargs)]))
        elif isinstance(node, Index):
            stack.extend(reversed([node.value, *node.items]))
        elif isinstance(node, Slice):
            stack.extend((node.step, node.stop, node.start))


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
    """A spec-level parameter, overridable with `-D name=value`; `in [...]` lists the values it may take."""

    name: str
    type: ScalarType
    default: Expr
    span: Span
    choices: Expr | None = None


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
