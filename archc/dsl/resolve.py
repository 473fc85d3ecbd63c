"""Names and labels in a whole spec, checked before lowering, every problem in one run.

Lowering stops at its first error, and a spec written from a paper holds a
dozen small mistakes at once. This pass walks every block of every file once
and collects each unknown value, op, block and argument (with a "did you
mean" of the kind that fits there, never the model's own name) and each
label that cannot take effect, then raises them together.

It knows the compiler's ops only through the `Vocabulary` it is given, so
the front end stays free of the compiler. `label_errors` needs no vocabulary:
`parse()` runs it on each file with that file's own blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs

from archc.dsl import ast
from archc.dsl.diagnostics import Collector, SpecError, did_you_mean
from archc.dsl.planned import PLANNED_ARGUMENTS, PLANNED_OPS

# Initialisation rules: they stand only as the value of `init=` / `bias_init=`.
INIT_RULES: dict[str, tuple[str, ...]] = {
    "zeros": (),
    "ones": (),
    "constant": ("value",),
    "normal": ("std", "mean"),
    "trunc_normal": ("std", "mean", "low", "high"),
    "uniform": ("low", "high"),
}
INIT_ARGUMENTS = frozenset({"init", "bias_init"})
SCALAR_FUNCTIONS = frozenset({"min", "max"})


@attrs.frozen
class Vocabulary:
    """What a spec may call besides its blocks, as the compiler defines it.

    `ops` maps each op to its argument names in positional order, or to None
    when its arguments are checked only by lowering (`experts`).
    """

    ops: Mapping[str, tuple[str, ...] | None]
    functions: frozenset[str] = SCALAR_FUNCTIONS
    block_arguments: frozenset[tuple[str, str]] = frozenset()  # (op, argument) that names a block: `body=`


def check_names(modules: Sequence[ast.Module], vocabulary: Vocabulary) -> None:
    """Raise every unknown name and ineffective label in `modules` (a spec and what it uses) at once."""
    blocks = {block.name: block for module in modules for block in module.blocks}
    errors = Collector()
    for module in modules:
        _Walk(module, blocks, vocabulary, errors).module()
    errors.raise_any()


def label_errors(module: ast.Module, blocks: Mapping[str, ast.BlockDef]) -> list[SpecError]:
    """Labels in `module` that cannot take effect, given the blocks known so far."""
    errors = Collector(limit=1000)
    _Walk(module, blocks, None, errors).module()
    err = errors.error()
    return list(err.errors) if err else []


@attrs.define
class _Label:
    func: str
    shared: bool
    span: ast.Span
    in_repeat: bool
    uses: int = 1


@attrs.define
class _Scope:
    """One body being walked: its values and the labels its modules carry."""

    env: dict[str, str]  # name -> what it is: "param", "tensor", "dim", "value", "loop"
    labels: dict[str, _Label]  # labels this namespace has claimed
    visible: set[str]  # every label `tie=` may name here
    shared: dict[str, _Label]  # `as NAME shared` labels of the whole block body
    in_repeat: bool = False

    def branch(self, *, repeat: bool = False) -> _Scope:
        return _Scope(dict(self.env), {} if repeat else dict(self.labels), set(self.visible), self.shared,
                      self.in_repeat or repeat)


class _Walk:
    def __init__(self, module: ast.Module, blocks: Mapping[str, ast.BlockDef], vocabulary: Vocabulary | None,
                 errors: Collector) -> None:
        self.module_ast = module
        self.blocks = blocks
        self.vocabulary = vocabulary  # None: labels only
        self.errors = errors
        self.models = {name for name, block in blocks.items() if block.is_model}

    def error(self, message: str, span, hint: str | None = None, notes=()) -> None:
        self.errors.add(SpecError(message, span, hint=hint, notes=notes))

    # ---- definitions ---------------------------------------------------------------

    def module(self) -> None:
        params: dict[str, str] = {}
        for decl in self.module_ast.params:
            self.value(decl.default, _Scope(dict(params), {}, set(), {}))
            params[decl.name] = "param"
        for block in self.module_ast.blocks:
            self.block(block, params)

    def block(self, block: ast.BlockDef, params: dict[str, str]) -> None:
        scope = _Scope(dict(params), {}, set(), {})
        for p in block.params:
            if p.default is not None:
                self.value(p.default, scope)
            scope.env[p.name] = "tensor" if isinstance(p.type, ast.TensorType) else "param"
        for p in block.params:
            if isinstance(p.type, ast.TensorType):
                for dim in p.type.dims:
                    self.dim(dim, scope)
        self.body(block.body, scope)
        for name, label in scope.shared.items():
            if label.uses == 1 and not label.in_repeat:
                self.error(f"`as {name} shared` has no effect: no other call here is labelled `{name}`", label.span,
                           hint=f"label every call that should reuse this module `as {name} shared`, or drop "
                                "`shared`")

    def dim(self, dim, scope: _Scope) -> None:
        """A dim is a number, a parameter, an expression of them, or a symbol such as B or T."""
        if isinstance(dim, ast.Name) and dim.id not in scope.env:
            if self.vocabulary is not None and dim.id[:1].islower():
                # `Tensor[B, T, d_modle]` would silently make `d_modle` a symbol
                self.error(f"unknown name `{dim.id}` in a shape", dim.span,
                           hint=did_you_mean(dim.id, _values(scope.env))
                           or "symbolic dims start with a capital letter (B, T, D)")
            scope.env[dim.id] = "dim"
            return
        self.value(dim, scope)

    # ---- statements ----------------------------------------------------------------

    def body(self, stmts, scope: _Scope) -> None:
        for stmt in stmts:
            self.stmt(stmt, scope)

    def stmt(self, stmt, scope: _Scope) -> None:
        if isinstance(stmt, ast.Assign):
            self.value(stmt.value, scope)
            scope.env[stmt.target] = "value"
        elif isinstance(stmt, ast.AugAssign):
            if self.vocabulary is not None and stmt.target not in scope.env:
                self.error(f"`{stmt.target} += ...` needs `{stmt.target}` to exist first", stmt.span,
                           hint=did_you_mean(stmt.target, _values(scope.env)))
            self.value(stmt.value, scope)
            scope.env[stmt.target] = "value"
        elif isinstance(stmt, ast.Unpack):
            for value in stmt.values:
                self.value(value, scope)
            scope.env.update((name, "value") for name in stmt.targets if name != "_")
        elif isinstance(stmt, ast.Repeat):
            self.repeat(stmt, scope)
        elif isinstance(stmt, ast.If):
            self.branches(stmt, scope)
        elif isinstance(stmt, ast.Return):
            for value in stmt.values:
                self.value(value, scope)

    def repeat(self, stmt: ast.Repeat, scope: _Scope) -> None:
        self.value(stmt.start, scope)
        self.value(stmt.stop, scope)
        # A name set anywhere in the body may be read by a later step: count it as set from the start.
        assigned = _assigned(stmt.body)
        inner = scope.branch(repeat=True)
        inner.env.update(dict.fromkeys(assigned, "value"))
        inner.env[stmt.var] = "loop"
        self.ineffective_step_label(stmt)
        self.body(stmt.body, inner)
        scope.env.update(dict.fromkeys(assigned, "value"))
        scope.visible |= inner.visible

    def branches(self, stmt: ast.If, scope: _Scope) -> None:
        # Only one branch is built, so each starts from what came before; after the `if`,
        # whatever any branch set counts as set (lowering reports the branch that did not).
        ends = []
        for cond, body in [*stmt.branches, (None, stmt.orelse)]:
            if cond is not None:
                self.value(cond, scope)
            inner = scope.branch()
            self.body(body, inner)
            ends.append(inner)
        for inner in ends:
            for name, kind in inner.env.items():
                scope.env.setdefault(name, kind)
            for name, label in inner.labels.items():
                scope.labels.setdefault(name, label)
            scope.visible |= inner.visible

    def ineffective_step_label(self, stmt: ast.Repeat) -> None:
        """`x = Layer(x) as l` alone in a repeat: the step *is* that block, so the label names nothing."""
        if len(stmt.body) != 1 or not isinstance(stmt.body[0], ast.Assign):
            return
        call = stmt.body[0].value
        if not isinstance(call, ast.Call) or call.label is None or call.shared:
            return
        block = self.blocks.get(call.func)
        if block is None or block.is_model:
            return
        steps = stmt.name or "layers"
        span = call.span
        written = span.source.text.split("\n")[span.line - 1][span.column - 1:span.end_column - 1] \
            if span.end_line == span.line else f"{call.func}(...) as {call.label}"
        self.error(f"the label `{call.label}` has no effect: a `repeat` step that only calls `{call.func}` is that "
                   f"block itself (`{steps}.0`, `{steps}.1`, ...), each step with weights of its own", call.span,
                   hint=f"to use one `{call.func}`'s weights at every step write `{stmt.body[0].target} = "
                        f"{written} shared`; to name the list of steps write `repeat {stmt.var} in ... as "
                        f"{call.label}`")

    # ---- expressions ---------------------------------------------------------------

    def value(self, expr, scope: _Scope, *, init: bool = False) -> None:
        if expr is None:
            return
        if isinstance(expr, ast.Name):
            self.name(expr, scope)
        elif isinstance(expr, ast.Call):
            self.call(expr, scope, init=init)
        elif isinstance(expr, ast.ListExpr):
            for item in expr.items:
                self.value(item, scope, init=init)
        elif isinstance(expr, ast.BinOp):
            self.value(expr.left, scope)
            self.value(expr.right, scope)
        elif isinstance(expr, ast.UnaryOp):
            self.value(expr.operand, scope)
        elif isinstance(expr, ast.Index):
            self.value(expr.value, scope)
            for item in expr.items:
                if isinstance(item, ast.Slice):
                    for part in (item.start, item.stop, item.step):
                        self.value(part, scope)
                elif not isinstance(item, ast.EllipsisIndex):
                    self.value(item, scope)

    def name(self, expr: ast.Name, scope: _Scope) -> None:
        if self.vocabulary is None or expr.id in scope.env:
            return
        if expr.id in self.blocks and expr.id not in self.models:
            return  # a block passed as an argument: `experts(..., body=Expert)`
        if expr.id in scope.visible:
            self.error(f"`{expr.id}` is the label of a module, not a value", expr.span,
                       hint="a label names the module an op makes (`tie=` takes one); to use its output, assign "
                            f"it: `h = f(x) as {expr.id}`")
            return
        self.error(f"unknown name `{expr.id}`", expr.span,
                   hint=did_you_mean(expr.id, _values(scope.env), scope.visible, exclude=self.models))

    def call(self, call: ast.Call, scope: _Scope, *, init: bool) -> None:
        self.callee(call, init)
        for arg in call.args:
            self.value(arg, scope)
        for kw in call.kwargs:
            if kw.name == "tie" and isinstance(kw.value, ast.Name):
                self.tie(kw.value, scope)
            elif self.vocabulary is not None and (call.func, kw.name) in self.vocabulary.block_arguments:
                self.block_argument(kw)
            else:
                self.value(kw.value, scope, init=kw.name in INIT_ARGUMENTS)
        if call.label is not None:
            self.label(call, scope)

    def callee(self, call: ast.Call, init: bool) -> None:
        if self.vocabulary is None:
            return
        func = call.func
        block = self.blocks.get(func)
        if block is not None:
            if block.is_model:
                self.error(f"`{func}` is a model; only blocks can be called", call.func_span)
            else:
                self.arguments(call, tuple(p.name for p in block.params), f"block `{func}`")
        elif func in self.vocabulary.ops:
            names = self.vocabulary.ops[func]
            if names is not None:
                self.arguments(call, names, f"`{func}`")
        elif func in INIT_RULES:
            if not init:
                self.error(f"`{func}(...)` is an initialisation rule; it goes in `init=`", call.func_span,
                           hint=f"as in `linear(x, 64, init={func}(...))` or `learned([64], init={func}(...))`")
            else:
                self.arguments(call, INIT_RULES[func], f"the init rule `{func}`")
        elif func not in self.vocabulary.functions and func not in PLANNED_OPS:
            ops = [*self.vocabulary.ops, *self.vocabulary.functions, *PLANNED_OPS]
            blocks = [name for name in self.blocks if name not in self.models]
            kinds = (blocks, ops) if func[:1].isupper() else (ops, blocks)
            self.error(f"unknown op or block `{func}`", call.func_span,
                       hint=did_you_mean(func, *kinds, exclude=self.models))

    def arguments(self, call: ast.Call, names: Sequence[str], what: str) -> None:
        if len(call.args) > len(names):
            self.error(f"{what} takes at most {len(names)} positional arguments"
                       + (f" ({', '.join(names)})" if names else "") + f", got {len(call.args)}",
                       call.args[len(names)].span)
        for kw in call.kwargs:
            if kw.name not in names and (call.func, kw.name) not in PLANNED_ARGUMENTS:
                self.error(f"{what} has no argument `{kw.name}`", kw.span,
                           hint=did_you_mean(kw.name, names) or
                           (f"its arguments are: {', '.join(names)}" if names else "it takes no arguments"))

    def block_argument(self, kw: ast.Kwarg) -> None:
        """`body=Expert` names a block; `branches=[A, B]` lists blocks: each name must be one."""
        blocks = [name for name in self.blocks if name not in self.models]
        listed = isinstance(kw.value, ast.ListExpr)
        for value in kw.value.items if listed else (kw.value,):
            if not isinstance(value, ast.Name) or value.id not in blocks:
                what = f"`{value.id}`" if isinstance(value, ast.Name) else "this"
                self.error(f"`{kw.name}=` {'lists blocks' if listed else 'names a block'}, but no block here is "
                           f"called {what}", value.span,
                           hint=did_you_mean(value.id, blocks) if isinstance(value, ast.Name) else None)

    def tie(self, target: ast.Name, scope: _Scope) -> None:
        if self.vocabulary is not None and target.id not in scope.visible:
            self.error(f"`tie=` names a module labelled with `as`, but nothing before it here is labelled "
                       f"`{target.id}`", target.span,
                       hint=did_you_mean(target.id, scope.visible) or
                       "label the embedding, e.g. `embedding(tokens, vocab, d) as wte`, and write `tie=wte`")

    def label(self, call: ast.Call, scope: _Scope) -> None:
        name = call.label
        scope.visible.add(name)
        if call.shared:
            first = scope.shared.get(name)
            if first is None:
                if name in scope.labels:
                    self.unshared(name, scope.labels[name].span, call.span)
                scope.shared[name] = _Label(call.func, True, call.span, scope.in_repeat)
            elif first.func != call.func:
                self.error(f"the shared module `{name}` is `{first.func}`, so this call cannot be `{call.func}`",
                           call.func_span, notes=[(f"`{name}` is first made here", first.span)])
            else:
                first.uses += 1
            return
        if name in scope.shared:
            self.unshared(name, scope.shared[name].span, call.span)
        elif name in scope.labels:
            self.error(f"the name `{name}` is already used in this block", call.span,
                       notes=[(f"`{name}` is first used here", scope.labels[name].span)],
                       hint=f"give each module its own label, or write `as {name} shared` on every call "
                            "that should reuse one module")
        scope.labels[name] = _Label(call.func, False, call.span, scope.in_repeat)

    def unshared(self, name: str, first: ast.Span, span: ast.Span) -> None:
        self.error(f"`{name}` labels a shared module, so every call labelled `{name}` must say `shared`", span,
                   notes=[(f"`{name}` is also used here", first)],
                   hint=f"write `as {name} shared` on each of them, or give this call a label of its own")


def _values(env: Mapping[str, str]) -> list[str]:
    return [name for name, kind in env.items() if kind != "dim"]


def _assigned(stmts) -> set[str]:
    """Every name a statement list (and the statements inside it) assigns."""
    names: set[str] = set()
    for stmt in stmts:
        if isinstance(stmt, ast.Assign):
            names.add(stmt.target)
        elif isinstance(stmt, ast.Unpack):
            names.update(n for n in stmt.targets if n != "_")
        for body in ast.bodies(stmt):
            names |= _assigned(body)
    return names
