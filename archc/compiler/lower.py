"""Lower the typed AST of a spec (and the files it `use`s) to the graph IR.

Lowering unrolls `repeat`, decides `if` conditions, inlines blocks into
scopes and expands built-ins through the op families' lowerings (archc/compiler/ops/,
which see only an `ops.LowerContext`). Every op the spec calls, and every
operator and index on tensors, becomes nodes through one path (`_call_op` and
`_node`). Attributes of primitive ops stay as expressions (`Unfolded`) for the
`fold_params` pass, unless they hold sizes (`T - 1`: dims.Size), which are bound
to the tensors that carry them; shapes are left to `infer_shapes`.

Inside residual lanes (`lanes(...)` … `merge_lanes(...)`, ops/lanes.py) the stream is n
lanes: an op reading it reads the open residual site's branch input, and `x += y`
writes y back through that site.

Values are tensors (`TensorRef`), several tensors at once (`Several`: `chunk`,
`split`, a block that returns several, named by `a, b = ...`), lists, sizes
and scalars. A module labelled `as name shared` is made by its first call and
run again by the others (their scopes `name#k` own no weights). Every name,
type and call is checked here, and every problem is a `SpecError` located in
the spec.
"""

from __future__ import annotations

import ast as pyast
import hashlib
import keyword
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs

from archc.compiler import ops
from archc.compiler.dims import Size, bind_sizes, sizes_in
from archc.compiler.ir import Graph, Scope
from archc.compiler.ops import lanes
from archc.compiler.ops.base import attr_values
from archc.compiler.scalars import (
    BUILTINS,
    Unfolded,
    check_size,
    coerce,
    evaluate,
    pick,
    scalar_op,
    show,
    type_name,
)
from archc.dsl import ast
from archc.dsl.ast import Span
from archc.dsl.diagnostics import Collector, SpecError, closest, did_you_mean, end_of
from archc.dsl.parser import parse, parse_file
from archc.dsl.planned import unbuilt
from archc.dsl.resolve import check_names

TENSOR_KINDS = {"Tokens": "long", "Tensor": "float", "Image": "float", "Mask": "bool"}
SCALAR_TYPES = ("int", "float", "bool", "str")
# Attribute names nn.Module already uses; a module named so would shadow them.
RESERVED = frozenset({
    "forward", "training", "to", "cuda", "cpu", "float", "half", "double", "type", "train", "eval",
    "parameters", "buffers", "children", "modules", "state_dict", "load_state_dict", "apply",
    "register_buffer", "register_parameter", "add_module", "zero_grad", "named_parameters",
    "named_buffers", "named_children", "named_modules", "requires_grad_", "extra_repr", "get_submodule",
    "get_parameter", "get_buffer", "share_memory", "bfloat16", "dump_patches", "call_super_init", "self",
})


@attrs.frozen
class TensorRef:
    node: str


@attrs.frozen
class Several:
    """The values of an expression that gives more than one (`chunk`, `split`, a block that returns several),
    to be named by `a, b = ...`."""

    values: tuple[TensorRef, ...]
    what: str  # the expression in the user's words, for errors: "`chunk(...)`", "block `Joint`"


@attrs.define
class Spec:
    """A parsed spec with everything it `use`s."""

    module: ast.Module
    modules: list[ast.Module]  # the main module first
    blocks: dict[str, tuple[ast.BlockDef, ast.Module]]

    @property
    def model(self) -> ast.BlockDef:
        models = [b for b in self.module.blocks if b.is_model]
        if not models:
            blocks = self.module.blocks
            raise SpecError(
                "this spec defines no `model`", header_span(blocks[0]) if blocks else end_of(self.module.source),
                hint="the entry point is declared with `model`, e.g. `model Name(tokens: Tokens[B, T]) { ... }`")
        if len(models) > 1:
            raise SpecError("a spec defines exactly one `model`", header_span(models[1]),
                            notes=[("the first one is here", header_span(models[0]))])
        return models[0]


def header_span(block: ast.BlockDef) -> Span:
    """The `block Name` (or `model Name`) words that open a definition."""
    span = block.span
    line = span.source.text.split("\n")[span.line - 1]  # lines as the parser counts them
    match = re.match(r"(block|model)\s+\w+", line[span.column - 1:])
    width = match.end() if match else 1
    return Span(span.source, span.line, span.column, span.line, span.column + width)


def load_spec(path_or_text: str | Path, name: str | None = None) -> Spec:
    """Parse a spec file (or text) and everything it `use`s, rejecting cycles and clashes; then report every
    construct not built yet and every unknown name, argument or label of all of them at once."""
    if isinstance(path_or_text, Path) or (isinstance(path_or_text, str) and path_or_text.endswith(".arch")
                                          and "\n" not in path_or_text):
        main = parse_file(path_or_text, unbuilt=True)
        base = Path(path_or_text).parent
    else:
        main = parse(str(path_or_text), name or "<spec>", unbuilt=True)
        base = Path(".")
    modules: list[ast.Module] = []
    blocks: dict[str, tuple[ast.BlockDef, ast.Module]] = {}
    _load(main, base, modules, blocks, stack=[str(Path(main.source.name))])
    errors = Collector()
    for module in modules:
        for err in unbuilt(module):
            errors.add(err)
    with errors.attempt():
        check_names(modules, ops.vocabulary())
    errors.raise_any()
    return Spec(main, modules, blocks)


def _load(module, base, modules, blocks, stack) -> None:
    modules.append(module)
    for block in module.blocks:
        if block.name in blocks:
            other = blocks[block.name][0]
            raise SpecError(f"block `{block.name}` is defined twice", header_span(block),
                            notes=[("the other definition is here", header_span(other))])
        if keyword.iskeyword(block.name):
            kind = "model" if block.is_model else "block"
            raise SpecError(f"`{block.name}` cannot name a {kind}: it becomes a Python class, and Python reserves "
                            "the word", header_span(block),
                            hint=f"rename it, e.g. `{_camel(block.name)}{kind.title()}`")
        if block.name in ops.REGISTRY or block.name in ops.COMPOSITES:
            raise SpecError(f"block `{block.name}` has the name of a built-in op", header_span(block),
                            hint="rename the block, e.g. `My" + _camel(block.name) + "`")
        blocks[block.name] = (block, module)
    for use in module.uses:
        target = (base / use.path)
        key = str(target)
        # Compare resolved paths, so `a.arch` and `../dir/a.arch` are one file.
        resolved = [Path(s).resolve() for s in stack]
        if target.resolve() in resolved:
            chain = " -> ".join([*stack[resolved.index(target.resolve()):], key])
            raise SpecError(f"`use` cycle: {chain}", use.span)
        if any(Path(m.source.name).resolve() == target.resolve() for m in modules):
            continue  # already loaded through another path
        if not target.is_file():
            where = "" if key == use.path else f" (looked for {target})"
            what = "it is a directory, not a spec file" if target.is_dir() else "no such file"
            near = [p.name for p in target.parent.glob("*.arch")] if target.parent.is_dir() else []
            raise SpecError(f'cannot `use "{use.path}"`: {what}{where}', use.span,
                            hint=did_you_mean(target.name, near))
        if target.suffix != ".arch":  # parse errors quote lines: never show those of a file that is not a spec
            raise SpecError(f'cannot `use "{use.path}"`: only .arch spec files can be used', use.span)
        try:
            sub = parse_file(target, unbuilt=True)
        except SpecError as err:
            if err.span is not None:
                raise
            raise SpecError(err.message, use.span, hint=err.hint) from None
        _load(sub, target.parent, modules, blocks, [*stack, key])


def parse_override(text: str) -> tuple[str, Any]:
    """`name=value` from `-D`; the value is read as a literal (never executed)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*\.)?[A-Za-z_][A-Za-z0-9_]*", name):
        raise SpecError(f"bad override {text!r}: expected -D name=value, e.g. -D d_model=512 (a used file's "
                        "parameter: -D file.name=value)")
    raw = raw.strip()
    if raw in ("true", "false"):
        return name, raw == "true"
    try:
        value = pyast.literal_eval(raw)
    except (ValueError, SyntaxError, MemoryError, RecursionError):  # the last two: absurdly nested text
        value = raw  # a bare word is a string
    if not isinstance(value, (int, float, bool, str)):
        raise SpecError(f"bad override {text!r}: the value must be a number, true/false or a string")
    return name, value


def resolve_params(spec: Spec, overrides: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the main spec's parameters in order, applying type-checked overrides. An override
    `stem.name` sets parameter `name` of the used file `stem.arch` (`-D blt_entropy.d_model=768`); the
    result holds every used file's parameters under such names, so compiling again with it gives the
    same model."""
    used = used_modules(spec)
    for name in overrides:
        stem, dot, rest = name.rpartition(".")
        module = used.get(stem) if dot else spec.module
        if module is None:
            raise SpecError(f"unknown parameter `{name}` in override: no used file is called `{stem}`", None,
                            hint=did_you_mean(stem, used) or (f"the used files are: {', '.join(used)}" if used else
                                                               "this spec uses no other file"))
        _known_param(module, rest if dot else name, name, "the spec's" if not dot else f"{stem}.arch's")
    env = module_params(spec.module, overrides)
    for stem, module in used.items():
        mine = {name.partition(".")[2]: v for name, v in overrides.items() if name.rpartition(".")[0] == stem}
        env.update({f"{stem}.{name}": value for name, value in module_params(module, mine, prefix=f"{stem}.").items()})
    return env


def used_modules(spec: Spec) -> dict[str, ast.Module]:
    """The files the main spec uses, by stem (`blt_entropy` for "blt_entropy.arch")."""
    out: dict[str, ast.Module] = {}
    for module in spec.modules[1:]:
        stem = Path(module.source.name).stem
        if stem in out:  # two used files of one name in different folders: their parameters cannot be told apart
            out[stem] = None
        else:
            out[stem] = module
    return {k: v for k, v in out.items() if v is not None}


def _known_param(module: ast.Module, name: str, written: str, whose: str) -> None:
    decls = {p.name: p for p in module.params}
    if name in decls:
        return
    near = closest(name, decls)
    if near:
        notes = [(f"`{near}` is declared here", decls[near].span)]
    else:
        notes = [(f"{whose} parameters are declared here", p.span) for p in module.params[:1]]
    known = f"{whose} parameters are: {', '.join(decls) or 'none'}"
    raise SpecError(f"unknown parameter `{written}` in override", None, notes=notes,
                    hint=did_you_mean(name, decls) or known)


def module_params(module: ast.Module, overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """One file's parameters in order: defaults, or the overrides (by unqualified name), each type-checked."""
    env: dict[str, Any] = {}
    for decl in module.params:
        check_type(decl.type)
        if decl.name in env:
            raise SpecError(f"parameter `{decl.name}` is declared twice", decl.span,
                            notes=[("the first declaration is here",
                                    next(p for p in module.params if p.name == decl.name).span)])
        flag = f"-D {prefix}{decl.name}"
        if decl.name in overrides:
            value = overrides[decl.name]
            try:
                check_size(value, decl.span)
            except SpecError:
                raise SpecError(f"bad override {flag}=...: the number is too large", decl.span) from None
            try:
                env[decl.name] = coerce(value, decl.type.name, decl.type.span, f"`{decl.name}`")
            except SpecError as err:
                try:
                    example = f", e.g. {flag}={show(evaluate(decl.default, env))}"
                except SpecError:
                    example = ""
                article = "an" if decl.type.name[:1] in "aeiou" else "a"
                raise SpecError(
                    f"bad override {flag}={show(value)}: `{decl.name}` is declared {decl.type.name}",
                    decl.span, hint=err.hint or f"give it {article} {decl.type.name} value{example}") from None
        else:
            env[decl.name] = coerce(evaluate(decl.default, env), decl.type.name, decl.default.span,
                                    f"parameter `{decl.name}`")
        if decl.choices is not None:
            _check_choice(decl, env, flag if decl.name in overrides else None)
    return env


def _check_choice(decl: ast.ParamDecl, env: dict[str, Any], flag: str | None) -> None:
    """`param ff: str in ["relu", "gated-gelu"] = "relu"`: a value outside the list is refused, by name."""
    choices = evaluate(decl.choices, env)
    if not isinstance(choices, list) or not choices:
        raise SpecError(f"`in` after `{decl.name}`'s type lists the values it may take, as in `in ['a', 'b']`",
                        decl.choices.span)
    value = env[decl.name]
    if any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in choices):
        return
    listed = ", ".join(show(c) for c in choices)
    strings = [c for c in choices if isinstance(c, str)]
    hint = did_you_mean(value, strings) if isinstance(value, str) and strings else None
    if flag:
        raise SpecError(f"bad override {flag}={show(value)}: `{decl.name}` is one of {listed}", decl.span,
                        hint=hint)
    raise SpecError(f"the default of `{decl.name}` ({show(value)}) is not one of {listed}", decl.default.span)


def check_type(t: ast.ScalarType) -> None:
    """Reject an unknown scalar type where it is written, before any value is checked against it."""
    if t.name in SCALAR_TYPES:
        return
    if t.name in TENSOR_KINDS:
        raise SpecError(f"`{t.name}` needs its dims here, e.g. `{t.name}[B, T, 64]`", t.span)
    raise SpecError(f"unknown type `{t.name}`", t.span, hint=did_you_mean(t.name, [*SCALAR_TYPES, *TENSOR_KINDS])
                    or f"use one of {', '.join(SCALAR_TYPES)}")


class _Names:
    """Attribute names inside one module: explicit labels must be unique, defaults get _1, _2."""

    def __init__(self) -> None:
        self.taken: dict[str, Any] = {}

    def claim(self, name: str, explicit: bool, span) -> str:
        if explicit:
            if name in RESERVED or name.startswith("__") or keyword.iskeyword(name):
                raise SpecError(f"`{name}` cannot name a module: nn.Module or Python already uses it", span)
            if name in self.taken:
                raise SpecError(f"the name `{name}` is already used in this block", span,
                                notes=[(f"`{name}` is first used here", self.taken[name])],
                                hint="give each module its own label")
            self.taken[name] = span
            return name
        candidate, i = name, 0
        while candidate in self.taken or candidate in RESERVED or keyword.iskeyword(candidate):
            i += 1
            candidate = f"{name}_{i}"
        self.taken[candidate] = span
        return candidate


@attrs.define
class _Shared:
    """A `shared` label of one body: the module its first call made, and the arguments every call repeats."""

    func: str
    args: dict[str, Any]  # the call's scalar arguments, defaults filled in
    owner: str  # the first call's node id (an op) or scope path (a block or built-in)
    span: Span
    uses: int = 1


@attrs.define
class _Frame:
    """One block body being lowered."""

    scope: str
    module: ast.Module
    names: _Names
    labels: dict[str, str]  # label -> node id (for tie=)
    env: dict[str, Any]
    shared: dict[str, _Shared] = attrs.Factory(dict)  # this body's `as label shared` modules
    # In the steps of a `repeat` that calls a shared module: its label. Such steps are no modules of their
    # own (the shared module belongs to the body around the repeat), so they can make none.
    reusing: str | None = None


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


class Lowerer:
    def __init__(self, spec: Spec, params: dict[str, Any]) -> None:
        self.spec = spec
        self.graph = Graph(spec.model.name)
        self.graph.params = dict(params)
        self.module_env = {id(spec.module): params}
        for stem, module in used_modules(spec).items():  # a used file's own parameters, or their overrides
            mine = {name.partition(".")[2]: v for name, v in params.items() if name.rpartition(".")[0] == stem}
            self.module_env[id(module)] = module_params(module, mine)
        for module in spec.modules[1:]:
            self.module_env.setdefault(id(module), module_params(module, {}))
        self.call_stack: list[str] = []
        self.names: dict[str, _Names] = {}

    # ---- entry ---------------------------------------------------------------

    def lower(self) -> Graph:
        model = self.spec.model
        g = self.graph
        g.scopes[""] = Scope("", model.name, "model", model.span)
        self.names[""] = _Names()
        env = dict(self.module_env[id(self.spec.module)])
        frame = _Frame("", self.spec.module, self.names[""], {}, env)
        for p in model.params:
            if isinstance(p.type, ast.TensorType):
                kind = p.type.kind
                if kind not in TENSOR_KINDS:
                    raise SpecError(f"unknown tensor type `{kind}`", p.type.span,
                                    hint=did_you_mean(kind, TENSOR_KINDS) or f"use one of {', '.join(TENSOR_KINDS)}")
                dims = self._dims(p.type, env)
                node = g.add("input", [], {"kind": kind, "dims": list(dims)}, scope="", name=p.name,
                             span=p.span, dtype=TENSOR_KINDS[kind], var=p.name)
                env[p.name] = TensorRef(node.id)
                g.scopes[""].inputs.append(node.id)
                g.scopes[""].arg_names.append(p.name)
                _bind_dims(p.type, node.id, env)
            else:
                env[p.name] = self._param_default(p, env)
        self.call_stack.append(model.name)
        returned = self._body(model.body, frame)
        if not returned:
            raise SpecError(f"model `{model.name}` returns nothing; end it with `return logits, loss`",
                            header_span(model))
        for i, (expr, value) in enumerate(returned):
            if not isinstance(value, TensorRef):
                raise SpecError("a model returns tensors", expr.span)
            name = expr.id if isinstance(expr, ast.Name) else f"out{i}"
            if any(n == name for n, _ in g.outputs):
                raise SpecError(f"output `{name}` is returned twice", expr.span)
            g.outputs.append((name, value.node))
        for op in dict.fromkeys(ops.REGISTRY[n.op] for n in g.nodes()):
            op.after_lowering(g)
        g.meta["source"] = self.spec.module.source.name
        g.meta["sha256"] = hashlib.sha256(
            "\n".join(m.source.text for m in self.spec.modules).encode()
        ).hexdigest()[:12]
        return g

    def _param_default(self, p: ast.Param, env) -> Any:
        check_type(p.type)
        if p.default is None:
            raise SpecError(f"model parameter `{p.name}` needs a default", p.span)
        return coerce(evaluate(p.default, env), p.type.name, p.default.span, f"`{p.name}`")

    def _dims(self, t: ast.TensorType, env) -> tuple:
        dims = []
        for d in t.dims:
            if isinstance(d, ast.Name) and (d.id not in env or isinstance(env[d.id], (TensorRef, Size))):
                dims.append(d.id)  # a symbol such as B or T
            else:
                value = evaluate(d, env)
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    raise SpecError(f"a dimension must be a positive int or a symbol, got {value!r}", d.span)
                dims.append(value)
        return tuple(dims)

    # ---- statements ----------------------------------------------------------

    def _body(self, stmts, frame: _Frame) -> list[tuple[ast.Expr, Any]] | None:
        for i, stmt in enumerate(stmts):
            result = self._stmt(stmt, frame)
            if result is not None:
                if i != len(stmts) - 1:
                    raise SpecError("statements after `return` are never run", stmts[i + 1].span)
                return result
        return None

    def _stmt(self, stmt, frame: _Frame):
        env = frame.env
        if isinstance(stmt, ast.Assign):
            value = self._expr(stmt.value, frame)
            if isinstance(value, Several):
                names = ", ".join(f"{stmt.target}{i}" for i in range(len(value.values)))
                raise SpecError(f"{value.what} gives {len(value.values)} values; name each of them", stmt.span,
                                hint=f"write `{names} = ...` (`_` for a value you do not need)")
            self._name_value(value, stmt.target)
            env[stmt.target] = value
        elif isinstance(stmt, ast.Unpack):
            self._unpack(stmt, frame)
        elif isinstance(stmt, ast.AugAssign):
            old = env.get(stmt.target)
            if old is None:
                raise SpecError(f"`{stmt.target} += ...` needs `{stmt.target}` to exist first", stmt.span,
                                hint=did_you_mean(stmt.target, env))
            update = self._tensor_or_scalar(stmt.value, frame)
            if isinstance(old, TensorRef) and isinstance(update, TensorRef) and lanes.is_lanes(self.graph, old.node):
                env[stmt.target] = TensorRef(lanes.write(self._context(frame, stmt.span), old.node, update.node,
                                                         stmt.target))
            elif isinstance(old, TensorRef) and isinstance(update, TensorRef):
                node = self.graph.add("add", [old.node, update.node], {}, scope=frame.scope, name="add",
                                      span=stmt.span, var=stmt.target)
                env[stmt.target] = TensorRef(node.id)
            elif not isinstance(old, TensorRef) and not isinstance(update, TensorRef):
                env[stmt.target] = scalar_op("+", old, update, stmt.span)
            else:
                raise SpecError(f"`+=` mixes a tensor and a {type_name(update if isinstance(old, TensorRef) else old)}",
                                stmt.span)
        elif isinstance(stmt, ast.Repeat):
            self._repeat(stmt, frame)
        elif isinstance(stmt, ast.If):
            for cond, body in stmt.branches:
                value = evaluate(cond, env)
                if not isinstance(value, bool):
                    raise SpecError(f"an `if` condition must be true or false, got {type_name(value)}", cond.span)
                if value:
                    return self._body(body, frame)
            return self._body(stmt.orelse, frame)
        elif isinstance(stmt, ast.Return):
            return [(e, self._tensor_or_scalar(e, frame)) for e in stmt.values]
        return None

    def _unpack(self, stmt: ast.Unpack, frame: _Frame) -> None:
        """`a, b, c = chunk(m, 3)` (one expression giving several values) or `a, b = b, a` (one each)."""
        n = len(stmt.targets)
        if len(stmt.values) == 1:
            value = self._expr(stmt.values[0], frame)
            if not isinstance(value, Several):
                raise SpecError(f"{n} names but the expression gives one value", stmt.values[0].span,
                                hint="several names take `chunk`, `split`, a block that returns several tensors, "
                                     "or as many expressions: `a, b = x, y`")
            if len(value.values) != n:
                raise SpecError(f"{n} names but {value.what} gives {len(value.values)} values", stmt.span,
                                hint="`_` stands for a value you do not need")
            values = list(value.values)
        else:
            if len(stmt.values) != n:
                raise SpecError(f"{n} names but {len(stmt.values)} expressions", stmt.span)
            values = [self._tensor_or_scalar(e, frame) for e in stmt.values]  # all before any is named
        for target, value in zip(stmt.targets, values):
            if target != "_":
                self._name_value(value, target)
                frame.env[target] = value

    def _name_value(self, value: Any, name: str) -> None:
        """The first name a tensor gets is the hint for its variable in generated code."""
        if isinstance(value, TensorRef):
            node = self.graph.node(value.node)
            if not node.var:
                node.var = name

    def _repeat(self, stmt: ast.Repeat, frame: _Frame) -> None:
        start, stop = evaluate(stmt.start, frame.env), evaluate(stmt.stop, frame.env)
        for bound, expr in ((start, stmt.start), (stop, stmt.stop)):
            if not isinstance(bound, int) or isinstance(bound, bool):
                raise SpecError(f"`repeat` bounds must be ints, got {type_name(bound)}", expr.span)
        if stop < start:
            raise SpecError(f"`repeat` from {start} to {stop} has a negative number of steps ({stop - start})",
                            stmt.span, hint="a count that goes here (such as n_layers) must be 0 or more")
        if stop - start > 10_000:
            raise SpecError(f"`repeat` of {stop - start} steps is more than the 10000 allowed", stmt.span)
        reusing = frame.reusing or _shared_label(stmt.body)
        if reusing:
            self._repeat_reusing(stmt, frame, reusing, range(start, stop))
            return
        attr = frame.names.claim(stmt.name or "layers", stmt.name is not None, stmt.span)
        for i in range(start, stop):
            path = f"{frame.scope}.{attr}.{i}" if frame.scope else f"{attr}.{i}"
            with self.step(path, attr, stmt.span):
                frame.env[stmt.var] = i
                step = _Frame(path, frame.module, self.names[path], frame.labels, frame.env, frame.shared)
                if self._body(stmt.body, step) is not None:
                    raise SpecError("`return` cannot appear inside `repeat`", _first_return(stmt.body) or stmt.span,
                                    hint="return after the loop, from the enclosing block")
        frame.env.pop(stmt.var, None)

    def _repeat_reusing(self, stmt: ast.Repeat, frame: _Frame, reusing: str, steps: range) -> None:
        """A `repeat` whose steps call a shared module: each step runs in the body around it, calling the one
        module (ALBERT's layer applied n times) rather than making a list of its own."""
        if stmt.name is not None:
            raise SpecError(f"`as {stmt.name}` names the list of a `repeat`'s modules, but these steps reuse the "
                            f"shared module `{reusing}` and make no list", stmt.span,
                            hint=f"drop `as {stmt.name}`; the shared module is `{reusing}`")
        step = _Frame(frame.scope, frame.module, frame.names, frame.labels, frame.env, frame.shared, reusing)
        for i in steps:
            frame.env[stmt.var] = i
            if self._body(stmt.body, step) is not None:
                raise SpecError("`return` cannot appear inside `repeat`", _first_return(stmt.body) or stmt.span,
                                hint="return after the loop, from the enclosing block")
        frame.env.pop(stmt.var, None)

    def _module(self, call: ast.Call, frame: _Frame, default: str, args: dict[str, Any]) -> tuple[str, _Shared | None]:
        """The attribute name of the module `call` makes in `frame`, and the shared module it calls again
        instead (None: the call makes its own). `args` are its scalar arguments, which every call of one
        shared module must repeat."""
        if call.shared:
            first = frame.shared.get(call.label)
            if first is None:
                return frame.names.claim(call.label, True, call.span), None
            if first.func != call.func:
                raise SpecError(f"the shared module `{call.label}` is `{first.func}`, so this call cannot be "
                                f"`{call.func}`", call.func_span, notes=[(f"`{call.label}` is first made here",
                                                                          first.span)])
            for name, value in args.items():
                if first.args.get(name) != value:
                    raise SpecError(
                        f"the shared module `{call.label}` was made with {name}={show(first.args.get(name))}; every "
                        f"call of it repeats its arguments (but its tensors), and this one gives {name}={show(value)}",
                        call.span, notes=[(f"`{call.label}` is first made here", first.span)])
            return call.label, first
        if frame.reusing:
            raise SpecError(f"a `repeat` step that calls the shared module `{frame.reusing}` cannot make a module "
                            f"of its own (this `{call.func}`) yet: the step is no module to hold it", call.span,
                            hint=f"share it too (`as {call.label or default} shared`), or make it outside the "
                                 "`repeat`")
        return frame.names.claim(call.label or default, call.label is not None, call.span), None

    def _remember_shared(self, call: ast.Call, frame: _Frame, args: dict[str, Any], owner: str) -> None:
        if call.shared and call.label not in frame.shared:
            frame.shared[call.label] = _Shared(call.func, args, owner, call.span)

    def _shared_scope(self, first: _Shared, cls: str, kind: str, span: Span, **fields) -> Scope:
        """The scope of a later call of the shared module `first` made: `<its path>#<k>`, owning no weights."""
        path = f"{first.owner}#{first.uses}"
        first.uses += 1
        return Scope(path, cls, kind, span, shares=first.owner, **fields)

    @contextmanager
    def step(self, path: str, attr: str, span: Span) -> Iterator[None]:
        """The scope of one step of a list (`repeat`, the experts of a MoE); a step whose only content
        turns out to be one block or built-in call becomes that module itself."""
        self.graph.scopes[path] = Scope(path, _camel(attr) + "Step", "step", span)
        self.names[path] = _Names()
        first_node = self.graph._next
        yield
        self._collapse_step(path, first_node)

    def _collapse_step(self, path: str, first_node: int) -> None:
        g = self.graph
        # Only what this step created can change: the nodes numbered since it began, and the
        # scopes inserted after its own (dicts keep insertion order).
        new_nodes = [g.node(f"n{i}") for i in range(first_node, g._next) if f"n{i}" in g]
        inner = []
        for p in reversed(g.scopes):
            if p == path:
                break
            inner.append(p)
        children = [p for p in inner if p.startswith(path + ".") and "." not in p[len(path) + 1:]]
        direct = [n for n in new_nodes if n.scope == path]
        if len(children) != 1 or direct:
            return
        child = children[0]
        child_scope = g.scopes[child]
        if child_scope.kind not in ("block", "composite"):
            return
        del g.scopes[path]
        for p in [p for p in reversed(inner) if p == child or p.startswith(child + ".")]:
            scope = g.scopes.pop(p)
            scope.path = path + p[len(child):]
            g.scopes[scope.path] = scope
        for n in new_nodes:
            if n.scope == child or n.scope.startswith(child + "."):
                n.scope = path + n.scope[len(child):]
        for p in [p for p in self.names if p == child or p.startswith(child + ".")]:
            self.names[path + p[len(child):]] = self.names.pop(p)

    # ---- expressions ---------------------------------------------------------

    def _expr(self, expr, frame: _Frame) -> Any:
        """The value of an expression: a tensor (TensorRef), several (Several), a list, a Size, a scalar."""
        if isinstance(expr, ast.Name):
            if expr.id not in frame.env:
                known = list(frame.env) + list(frame.labels)
                raise SpecError(f"unknown name `{expr.id}`", expr.span, hint=did_you_mean(expr.id, known))
            return frame.env[expr.id]
        if isinstance(expr, ast.Call):
            return self._call(expr, frame)
        if isinstance(expr, ast.ListExpr):
            return [self._tensor_or_scalar(item, frame) for item in expr.items]
        if isinstance(expr, ast.Index):
            return self._index(expr, frame)
        if isinstance(expr, ast.BinOp):
            left, right = self._tensor_or_scalar(expr.left, frame), self._tensor_or_scalar(expr.right, frame)
            if not isinstance(left, TensorRef) and not isinstance(right, TensorRef):
                return scalar_op(expr.op, left, right, expr.span)
            return self._tensor_binop(expr, left, right, frame)
        if isinstance(expr, ast.UnaryOp):
            value = self._tensor_or_scalar(expr.operand, frame)
            if isinstance(value, TensorRef):
                if expr.op == "-":
                    return self._node("mul", [value.node], {"scalar": -1, "scalar_left": True}, frame, expr.span,
                                      name="neg")
                return self._node("not", [value.node], {}, frame, expr.span)
        return evaluate(expr, frame.env)

    def _tensor_or_scalar(self, expr, frame: _Frame) -> Any:
        """`_expr`, where one value is due: several (an unnamed `chunk(...)`) is an error."""
        value = self._expr(expr, frame)
        if isinstance(value, Several):
            raise SpecError(f"{value.what} gives {len(value.values)} values; name them first", expr.span,
                            hint=f"`{', '.join(chr(97 + i) for i in range(len(value.values)))} = ...`, then use "
                                 "the one you need")
        return value

    def _node(self, op: str, tensors: list[str], attrs_: dict[str, Any], frame: _Frame, span: Span, *,
              name: str | None = None, var: str = "") -> TensorRef:
        """A node of `op` reading `tensors`, in this frame's scope. The tensors whose sizes its attributes
        read (`T - 1` in `x[:, :T - 1]`) become further arguments, so the sizes follow the graph."""
        index: dict[str, int] = {}
        args = list(tensors)
        for size in (s for value in attrs_.values() for s in sizes_in(value)):
            for ref in size.refs():
                if ref not in index:
                    index[ref] = args.index(ref) if ref in args else len(args)
                    if index[ref] == len(args):
                        args.append(ref)
        attrs_ = {k: bind_sizes(v, index) for k, v in attrs_.items()}
        dtype = ops.REGISTRY[op].dtype(attrs_, [self.graph.node(t).dtype for t in tensors], span)
        node = self.graph.add(op, args, attrs_, scope=frame.scope, name=name or op, span=span, dtype=dtype, var=var)
        return TensorRef(node.id)

    def _index(self, expr: ast.Index, frame: _Frame) -> Any:
        """`x[...]`: a tensor indexed and sliced (an `index` node), or a list of numbers picked from."""
        value = self._tensor_or_scalar(expr.value, frame)
        if not isinstance(value, TensorRef):
            return pick(value, expr, frame.env)
        items: list = []
        for item in expr.items:
            if isinstance(item, ast.EllipsisIndex):
                items.append(["..."])
            elif isinstance(item, ast.Slice):
                parts = [None if part is None else self._position(part, frame) for part in
                         (item.start, item.stop, item.step)]
                if parts[2] is not None and (not isinstance(parts[2], int) or parts[2] <= 0):
                    raise SpecError("a slice step must be a positive int", item.step.span)
                items.append(["slice", *parts])
            else:
                items.append(["at", self._position(item, frame)])
        if sum(1 for item in items if item[0] == "...") > 1:
            raise SpecError("`...` may appear once in an index", expr.span)
        return self._node("index", [value.node], {"items": items}, frame, expr.span)

    def _position(self, expr, frame: _Frame) -> Any:
        value = self._tensor_or_scalar(expr, frame)
        if isinstance(value, TensorRef):
            raise SpecError("indexing with a tensor is not built: positions are ints or sizes (`T - 1`)", expr.span,
                            hint="to pick by a mask use `where(mask, a, b)`")
        if not isinstance(value, Size) and (not isinstance(value, int) or isinstance(value, bool)):
            raise SpecError(f"a position must be an int or a size, got {type_name(value)} {show(value)}",
                            expr.span)
        return value

    def _tensor_binop(self, expr: ast.BinOp, left, right, frame: _Frame) -> TensorRef:
        if expr.op == "@":
            if not (isinstance(left, TensorRef) and isinstance(right, TensorRef)):
                scalar = right if isinstance(left, TensorRef) else left
                raise SpecError(f"`@` multiplies two tensors, not a tensor and {type_name(scalar)} {show(scalar)}",
                                expr.span, hint="scale with `*`")
            return self._node("matmul", [left.node, right.node], {}, frame, expr.span)
        op = ops.BINARY_OPS.get(expr.op)
        if op is None:
            raise SpecError(f"`{expr.op}` is not defined for tensors", expr.span,
                            hint="tensors take + - * / // % ** & | ^ << >> and comparisons")
        if isinstance(left, TensorRef) and isinstance(right, TensorRef):
            return self._node(op, [left.node, right.node], {}, frame, expr.span)
        tensor, scalar = (left, right) if isinstance(left, TensorRef) else (right, left)
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            raise SpecError(f"`{expr.op}` cannot combine a tensor and {type_name(scalar)} {show(scalar)}",
                            expr.span, hint="tensors combine with tensors and numbers" + (
                                "; a size enters a tensor's shape through reshape, expand or indexing"
                                if isinstance(scalar, Size) else ""))
        return self._node(op, [tensor.node], {"scalar": scalar, "scalar_left": tensor is right}, frame, expr.span)

    def _call(self, call: ast.Call, frame: _Frame) -> Any:
        if call.func in self.spec.blocks:
            return self._call_block(call, frame)
        if call.func in ops.COMPOSITES:
            return self._call_composite(ops.COMPOSITES[call.func], call, frame)
        op = ops.REGISTRY.get(call.func)
        if call.func in BUILTINS:  # `max(a, b)` of numbers; of a tensor it is the reduction
            first = self._tensor_or_scalar(call.args[0], frame) if call.args and op is not None else None
            if not isinstance(first, TensorRef):
                return evaluate(call, frame.env)
            return self._call_op(op, call, frame, first=first)
        if op is not None and op.user:
            return self._call_op(op, call, frame)
        known = [*self.spec.blocks, *ops.COMPOSITES, *(n for n, o in ops.REGISTRY.items() if o.user), *BUILTINS]
        raise SpecError(f"unknown op or block `{call.func}`", call.func_span,
                        hint=did_you_mean(call.func, known, exclude=[self.spec.model.name]))

    def _tensor_arg(self, expr: ast.Expr, frame: _Frame, what: str) -> TensorRef:
        value = self._tensor_or_scalar(expr, frame)
        if not isinstance(value, TensorRef):
            raise SpecError(f"{what} must be a tensor, got {type_name(value)} {show(value)}", expr.span)
        return value

    def _context(self, frame: _Frame, span: Span) -> ops.LowerContext:
        return ops.LowerContext(self, frame, frame.scope, span, {})

    def _stream(self, ref: TensorRef, frame: _Frame, span: Span, op: str) -> TensorRef:
        """What op `op` reads of `ref`: inside residual lanes, the open residual site's branch input."""
        if not lanes.is_lanes(self.graph, ref.node) or lanes.keeps_lanes(op):
            return ref
        return TensorRef(lanes.branch_input(self._context(frame, span), ref.node))

    def _call_op(self, op: ops.OpDef, call: ast.Call, frame: _Frame, first: TensorRef | None = None) -> Any:
        """Every built-in op the spec calls lowers here: tensors (or a list of them, or a number where the op
        takes one) become the node's arguments; other arguments its attributes, left as expressions for
        `fold_params` unless they hold sizes (then resolved here and bound to the tensors they read); an op
        that gives several values (`chunk`) becomes one node per value."""
        what = f"`{op.name}`"
        bound = ops.bind(call, op.signature(), what)
        tensors: list[str] = []
        attrs_: dict[str, Any] = {}
        for i, name in enumerate(op.inputs):
            if name not in bound:
                if name in op.optional_inputs:
                    continue
                raise SpecError(f"{what} needs its `{name}` argument", call.span)
            # `first`: the first argument, already lowered (to tell `max` of a tensor from `max` of numbers)
            value = first if i == 0 and first is not None else self._tensor_or_scalar(bound[name], frame)
            if name == op.list_input:
                if not isinstance(value, list) or not value or not all(isinstance(v, TensorRef) for v in value):
                    raise SpecError(f"`{name}` of {what} is a list of tensors, as in `[a, b]`", bound[name].span)
                tensors += [v.node for v in value]
                attrs_["count"] = len(value)
            elif isinstance(value, TensorRef):
                tensors.append(self._stream(value, frame, call.span, op.name).node)
            elif name in op.number_inputs and isinstance(value, (int, float)) and not isinstance(value, bool):
                attrs_[name] = value
            else:
                raise SpecError(f"`{name}` of {what} must be a tensor"
                                + (" or a number" if name in op.number_inputs else "")
                                + f", got {type_name(value)} {show(value)}", bound[name].span)
        given: dict[str, Any] = {}  # every attribute's value, for sharing and for ops that give several
        for name, spec in op.attrs.items():
            if name == "tie" and name in bound:
                attrs_[name] = given[name] = self._tie_target(bound[name], frame)
            elif name in bound:
                value = given[name] = evaluate(bound[name], frame.env)
                if sizes_in(value):  # resolved once shapes are known; checked now
                    problem = spec.check(name, value)
                    if problem:
                        raise SpecError(f"{what}: {problem}", bound[name].span)
                    attrs_[name] = value
                else:
                    attrs_[name] = Unfolded(bound[name], _scalars(frame.env))
            elif spec.default is ops.REQUIRED:
                raise SpecError(f"{what} needs its `{name}` argument", call.span)
            else:
                attrs_[name] = given[name] = op.default(name, bound)
        first = None
        if op.pure or op.random:
            if call.shared:
                raise SpecError(f"`{op.name}` makes no module, so `shared` has nothing to share", call.span,
                                hint=f"drop `shared`; a label on `{op.name}` only names its value")
            name = frame.names.claim(call.label or op.name, call.label is not None, call.span) if op.random \
                else (call.label or op.name)
        else:
            name, first = self._module(call, frame, op.name, given)
        parts = op.parts(given, call)
        if parts is not None:
            refs = [self._node(op.name, tensors, {**attrs_, "index": i}, frame, call.span, name=name)
                    for i in range(parts)]
            return Several(tuple(refs), f"`{op.name}(...)`")
        ref = self._node(op.name, tensors, attrs_, frame, call.span, name=name)
        if first is not None:
            self.graph.node(ref.node).shares = first.owner
        elif not (op.pure or op.random):
            self._remember_shared(call, frame, given, ref.node)
        if call.label:
            frame.labels.setdefault(call.label, ref.node)
        return ref

    def _tie_target(self, expr: ast.Expr, frame: _Frame) -> str:
        how = "label the embedding, e.g. `embedding(tokens, vocab, d) as wte`, and write `tie=wte`"
        if not isinstance(expr, ast.Name):
            raise SpecError("`tie=` takes the label of an embedding in this block, as in `tie=wte`", expr.span,
                            hint=how)
        if expr.id not in frame.labels:
            raise SpecError(f"`tie=` names an embedding labelled with `as`, but nothing in this block is labelled "
                            f"`{expr.id}`", expr.span, hint=did_you_mean(expr.id, frame.labels) or how)
        target = self.graph.node(frame.labels[expr.id])
        if target.op != "embedding":
            raise SpecError(f"`tie=` must name an embedding, but `{expr.id}` is a {target.op}", expr.span, hint=how)
        return target.id

    def _call_composite(self, comp: ops.Composite, call: ast.Call, frame: _Frame) -> TensorRef:
        what = f"`{comp.name}`"
        bound = ops.bind(call, [*comp.inputs, *comp.attrs, *comp.optional], what)
        args: list[str | None] = []
        for name in (*comp.inputs, *comp.optional):
            if name not in bound:
                if name in comp.optional:
                    args.append(None)
                    continue
                raise SpecError(f"{what} needs its `{name}` argument", call.span)
            args.append(self._stream(self._tensor_arg(bound[name], frame, f"`{name}` of {what}"), frame, call.span,
                                     comp.name).node)
        values = attr_values(call, bound, comp.attrs, _scalars(frame.env), what)
        attr, first = self._module(call, frame, comp.default_name, values)
        given = [(arg, name) for arg, name in zip(args, (*comp.inputs, *comp.optional)) if arg is not None]
        fields = {"inputs": [a for a, _n in given], "arg_names": [n for _a, n in given], "builtin": comp.name,
                  "call": call.span}
        if first is not None:
            scope = self._shared_scope(first, comp.cls, "composite", call.span, **fields)
        else:
            scope = Scope(f"{frame.scope}.{attr}" if frame.scope else attr, comp.cls, "composite", call.span,
                          **fields)
            self._remember_shared(call, frame, values, scope.path)
        path = scope.path
        self.graph.scopes[path] = scope
        self.names[path] = _Names()
        scope.outputs = [comp.lower(ops.LowerContext(self, frame, path, call.span, bound), args, values)]
        return TensorRef(scope.outputs[0])

    def call_in(self, frame: _Frame, path: str, func: str, tensors: list[str], kwargs: dict[str, Any],
                label: str | None, span: Span) -> str:
        """Lower `func(tensors..., **kwargs) as label` in scope `path` (for a built-in's lowering), with the
        scalars of `frame`; the output node id."""
        env = {**_scalars(frame.env), **{f"__arg{i}": TensorRef(t) for i, t in enumerate(tensors)}}
        call = ast.Call(func, tuple(ast.Name(f"__arg{i}", span) for i in range(len(tensors))),
                        tuple(ast.Kwarg(k, _literal(v, span), span) for k, v in kwargs.items()), label, span, span)
        return self._call(call, _Frame(path, frame.module, self.names[path], {}, env)).node

    def _call_block(self, call: ast.Call, frame: _Frame) -> Any:
        block, module = self.spec.blocks[call.func]
        if block.is_model:
            raise SpecError(f"`{call.func}` is a model; only blocks can be called", call.func_span)
        if call.func in self.call_stack:
            chain = " -> ".join([*self.call_stack[self.call_stack.index(call.func):], call.func])
            raise SpecError(f"block `{call.func}` calls itself: {chain}", call.func_span)
        bound = ops.bind(call, [p.name for p in block.params], f"block `{block.name}`")
        env = dict(self.module_env[id(module)])
        caller_scalars = _scalars(frame.env)
        inputs, arg_names = [], []
        for p in block.params:
            if isinstance(p.type, ast.TensorType):
                if p.name not in bound:
                    raise SpecError(f"block `{block.name}` needs its tensor argument `{p.name}`", call.span)
                ref = self._tensor_arg(bound[p.name], frame, f"`{p.name}` of `{block.name}`")
                env[p.name] = ref
                inputs.append(ref.node)
                arg_names.append(p.name)
                continue
            check_type(p.type)
            if p.name in bound:
                value = evaluate(bound[p.name], caller_scalars)
                env[p.name] = coerce(value, p.type.name, bound[p.name].span, f"`{p.name}` of `{block.name}`")
            elif p.default is not None:
                env[p.name] = coerce(evaluate(p.default, env), p.type.name, p.default.span, f"`{p.name}`")
            else:
                raise SpecError(f"block `{block.name}` needs its argument `{p.name}`", call.span)
        attr, first = self._module(call, frame, snake(block.name), {p.name: env[p.name] for p in block.params
                                                                    if not isinstance(p.type, ast.TensorType)})
        fields = {"inputs": inputs, "arg_names": arg_names, "call": call.span}
        if first is not None:
            scope = self._shared_scope(first, block.name, "block", block.span, **fields)
        else:
            scope = Scope(f"{frame.scope}.{attr}" if frame.scope else attr, block.name, "block", block.span, **fields)
            self._remember_shared(call, frame, {p.name: env[p.name] for p in block.params
                                                if not isinstance(p.type, ast.TensorType)}, scope.path)
        path = scope.path
        for p in block.params:
            if isinstance(p.type, ast.TensorType):
                if p.type.kind not in TENSOR_KINDS:
                    raise SpecError(f"unknown tensor type `{p.type.kind}`", p.type.span,
                                    hint=did_you_mean(p.type.kind, TENSOR_KINDS))
                node = env[p.name].node
                scope.expected.append((node, lanes.block_dims(self.graph, node, self._dims(p.type, env)), p.type.span))
        for p in block.params:
            if isinstance(p.type, ast.TensorType):
                _bind_dims(p.type, env[p.name].node, env)
        self.graph.scopes[path] = scope
        self.names[path] = _Names()
        self.call_stack.append(block.name)
        returned = self._body(block.body, _Frame(path, module, self.names[path], {}, env))
        self.call_stack.pop()
        if not returned:
            raise SpecError(f"block `{block.name}` returns nothing; end it with `return x`", header_span(block))
        for expr, value in returned:
            if not isinstance(value, TensorRef):
                raise SpecError(f"a block returns tensors, and this is {type_name(value)} {show(value)}", expr.span)
            node = self.graph.node(value.node)
            if not node.var:  # named inside the block, not after whatever its caller calls the result
                node.var = node.name if not ops.REGISTRY[node.op].pure else "out"
        scope.outputs = [value.node for _expr, value in returned]
        scope.output_names = [expr.id if isinstance(expr, ast.Name) else "out" for expr, _value in returned]
        if len(returned) == 1:
            return returned[0][1]
        return Several(tuple(value for _expr, value in returned), f"block `{block.name}`")


def _bind_dims(t: ast.TensorType, node: str, env: dict[str, Any]) -> None:
    """The symbols of a tensor's declared type (`B`, `T`) are values of the body: the sizes of its axes."""
    for i, d in enumerate(t.dims):
        if isinstance(d, ast.Name) and d.id not in env:
            env[d.id] = Size.axis(node, i)


def _shared_label(stmts) -> str | None:
    """The first `as label shared` label called in `stmts` (looking into `if` and `repeat`, not into blocks)."""
    for stmt in stmts:
        for expr in ast.expressions(stmt):
            for node in ast.subexpressions(expr):
                if isinstance(node, ast.Call) and node.shared:
                    return node.label
        for body in ast.bodies(stmt):
            found = _shared_label(body)
            if found:
                return found
    return None


def _first_return(stmts) -> Span | None:
    """The span of the first `return` in `stmts`, looking into `if` branches."""
    for stmt in stmts:
        if isinstance(stmt, ast.Return):
            return stmt.span
        if isinstance(stmt, ast.If):
            for body in [*(b for _c, b in stmt.branches), stmt.orelse]:
                found = _first_return(body)
                if found:
                    return found
    return None


def _scalars(env: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in env.items() if not isinstance(v, TensorRef)}


def _literal(value: Any, span: Span) -> ast.Expr:
    """A scalar as the spec would write it."""
    if isinstance(value, bool):
        return ast.Bool(value, span)
    if isinstance(value, str):
        return ast.Str(value, span)
    return ast.Num(value, span)


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part)


def lower(spec: Spec, params: dict[str, Any]) -> Graph:
    return Lowerer(spec, params).lower()
