"""What the language can say but archc cannot build yet, and how to say so.

The grammar runs ahead of the compiler: GRAMMAR.md fixes the syntax of the
families still to come, and new syntax lands in the front end before its
lowering. Until a construct is built, `parse()` refuses it with a located
error that names it and its issue ("`patch` is planned (issue: byte
patching) and not built yet") rather than letting it reach a compiler that
would misread it or call it an unknown name. Building a construct deletes its
entry here; `tests/dsl/test_planned.py` fails while a built op is still listed.
"""

from __future__ import annotations

from collections.abc import Iterator

from archc.dsl import ast
from archc.dsl.diagnostics import SpecError

# Ops designed in GRAMMAR.md, not built yet: op -> its issue, by the words the issue's title uses. (Every
# op the language designs is built today; a new design lands here first, then leaves when it is built.)
PLANNED_OPS: dict[str, str] = {
}

# Arguments of built ops that are designed but not built: (op, argument) -> issue.
PLANNED_ARGUMENTS: dict[tuple[str, str], str] = {}

PLANNED_TYPES: dict[str, str] = {}

# Syntax the grammar accepts and the compiler cannot lower yet: key -> (the construct in the user's words, issue).
PLANNED_SYNTAX: dict[str, tuple[str, str]] = {}

BIT_OPS = frozenset({"&", "|", "^", "<<", ">>"})

# Further uses of one planned construct shown as notes under its error.
MAX_NOTES = 3


def planned(what: str, issue: str) -> str:
    return f"{what} is planned (issue: {issue}) and not built yet"


def unbuilt(module: ast.Module) -> list[SpecError]:
    """One error per planned construct `module` uses, at its first use, with notes for a few more."""
    own_blocks = {block.name for block in module.blocks}
    found: dict[str, tuple[str, list[ast.Span]]] = {}  # key -> (message, spans in source order)
    for key, message, span in _uses(module, own_blocks):
        found.setdefault(key, (message, []))[1].append(span)
    errors = []
    for message, spans in found.values():
        spans = sorted(spans, key=lambda s: (s.line, s.column))
        notes = [("also used here", span) for span in spans[1:1 + MAX_NOTES]]
        if len(spans) > 1 + MAX_NOTES:
            notes.append((f"and {len(spans) - 1 - MAX_NOTES} more uses", None))
        errors.append(SpecError(message, spans[0], notes=notes))
    return errors


def _uses(module: ast.Module, own_blocks: set[str]) -> Iterator[tuple[str, str, ast.Span]]:
    for decl in module.params:
        yield from _expr_uses(decl.default, own_blocks)
    for block in module.blocks:
        for p in block.params:
            if isinstance(p.type, ast.TensorType):
                if p.type.kind in PLANNED_TYPES:
                    yield (f"type {p.type.kind}",
                           planned(f"the tensor type `{p.type.kind}`", PLANNED_TYPES[p.type.kind]), p.type.span)
                for dim in p.type.dims:
                    yield from _expr_uses(dim, own_blocks)
            if p.default is not None:
                yield from _expr_uses(p.default, own_blocks)
        yield from _body_uses(block.body, block.is_model, own_blocks)


def _syntax(key: str, span: ast.Span) -> Iterator[tuple[str, str, ast.Span]]:
    """The use of a piece of syntax, if it is still planned."""
    if key in PLANNED_SYNTAX:
        what, issue = PLANNED_SYNTAX[key]
        yield key, planned(what, issue), span


def _body_uses(stmts, is_model: bool, own_blocks: set[str]) -> Iterator[tuple[str, str, ast.Span]]:
    for stmt in stmts:
        if isinstance(stmt, ast.Unpack):
            yield from _syntax("unpack", stmt.span)
        if isinstance(stmt, ast.Return) and len(stmt.values) > 1 and not is_model:
            yield from _syntax("multi_return", stmt.span)
        for expr in ast.expressions(stmt):
            yield from _expr_uses(expr, own_blocks)
        for body in ast.bodies(stmt):
            yield from _body_uses(body, is_model, own_blocks)


def _expr_uses(expr, own_blocks: set[str]) -> Iterator[tuple[str, str, ast.Span]]:
    for node in ast.subexpressions(expr):
        if isinstance(node, ast.Index):
            yield from _syntax("index", node.span)
        elif isinstance(node, ast.BinOp) and node.op in BIT_OPS:
            yield from _syntax("bit_ops", node.span)
        elif isinstance(node, ast.Call):
            if node.func in PLANNED_OPS and node.func not in own_blocks:
                yield f"op {node.func}", planned(f"`{node.func}`", PLANNED_OPS[node.func]), node.func_span
            for kw in node.kwargs:
                issue = PLANNED_ARGUMENTS.get((node.func, kw.name))
                if issue:
                    yield (f"arg {node.func}.{kw.name}",
                           planned(f"`{kw.name}=` on `{node.func}`", issue), kw.span)
