"""What every op family builds on: op definitions, attribute specs, the registries, the argument
binder and the lowering context.

An op family is one file in this package holding its IR ops (`OpDef` subclasses registered with
`@register`), the built-ins a spec calls that lower to them (functions registered with
`@composite`), and their checks. Shape rules raise `SpecError`s that name the dims (einops-style),
located at the spec expression the node came from.

FLOPs count matmul work only (2·m·n·k per product), as `torch.utils.flop_counter` does and as the
6N-per-token rule assumes; elementwise ops, norms and softmax are left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import attrs

from archc.compiler.dims import Poly, Size
from archc.compiler.dims import same as dims_same
from archc.compiler.ir import Graph, Node, Shape
from archc.compiler.scalars import InitRule, evaluate
from archc.dsl import ast
from archc.dsl.ast import Span
from archc.dsl.diagnostics import SpecError, closest, did_you_mean
from archc.dsl.resolve import Vocabulary

REQUIRED = object()


class BlockName:
    """The type of an attribute that names a block of the spec (`body=Expert`): kept as the name, not
    evaluated."""


class BlockNames:
    """The type of an attribute that lists blocks of the spec (`branches=[Attn, Mlp]`): kept as their names;
    an item that is no name is kept as "" (no block has it)."""


BLOCK_TYPES = (BlockName, BlockNames)


class A:
    """An attribute of an op as the spec writes it: type, default, allowed values."""

    def __init__(self, type_: type | tuple, default: Any = REQUIRED, *, choices: tuple = (),
                 positive: bool = False, unit: bool = False) -> None:
        self.type = type_
        self.default = default
        self.choices = choices
        self.positive = positive
        self.unit = unit  # a probability in [0, 1)

    @property
    def types(self) -> tuple:
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def check(self, name: str, value: Any) -> str | None:
        """Why `value` is not acceptable for this attribute, or None."""
        types = self.types
        value = self.coerce(value)
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            want = " or ".join(_TYPE_WORDS[t] for t in types if t in _TYPE_WORDS)  # not internal ones (Width)
            return f"`{name}` must be {want}, got {_show(value)}"
        if self.choices and value not in self.choices:
            near = closest(value, self.choices) if isinstance(value, str) else None
            return (f"`{name}` must be one of {', '.join(map(_quote, self.choices))}, got {_quote(value)}"
                    + (f"; did you mean {_quote(near)}?" if near else ""))
        if self.positive and value is not None and value <= 0:
            return f"`{name}` must be positive, got {value}"
        if self.unit and value is not None and not 0.0 <= value < 1.0:
            return f"`{name}` must be in [0, 1), got {value}"
        return None

    def coerce(self, value: Any) -> Any:
        """An int where a float (and no int) is accepted becomes that float."""
        if float in self.types and int not in self.types and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


_TYPE_WORDS = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string",
               type(None): "nothing", list: "a list", Size: "a size", InitRule: "an init rule such as normal(0.02)"}


def _quote(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return f"list {value!r}"
    return f"{type(value).__name__} {value!r}"


# ----------------------------------------------------------------------------- shapes


def fmt_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def dim_value(dim, sizes: dict[str, int]) -> float:
    """The size of a dim: a number, a symbol, or an expression of them such as `B*T*2/8` or `N + L`."""
    return dim if isinstance(dim, int) else Poly.parse(dim).value(sizes)


def dim_symbols(dim) -> list[str]:
    return [] if isinstance(dim, int) else Poly.parse(dim).symbols()


def dim_arg(default: Any = REQUIRED) -> A:
    """An axis argument: a number (negative from the end) or a named dim (`dim=T`: the one axis of size T)."""
    return A((int, Size), default)


def axis_of(node: Node, shape: Shape, dim: Any, ins: list[Shape], *, code: bool = False, extra: int = 0):
    """The axis `dim` names in `shape` as a non-negative index (`extra`: axes the op adds, as unsqueeze's
    one); with `code`, how generated code writes it (the number as the spec gave it, else the index)."""
    rank = len(shape) + extra
    if isinstance(dim, Size):
        if extra:
            raise SpecError(f"{node.op}: a new axis is named by its position, not by a dim", node.span)
        size = dim.dim(ins)
        axes = [i for i, d in enumerate(shape) if dims_same(d, size)]
        if len(axes) != 1:
            why = "no axis" if not axes else f"{len(axes)} axes"
            raise SpecError(f"{node.op}: dim={size} names an axis by its size, but {why} of {fmt_shape(shape)} "
                            f"{'has' if len(axes) < 2 else 'have'} that size", node.span,
                            hint="name the axis by its position (dim=1, or dim=-1 for the last)")
        return str(axes[0]) if code else axes[0]
    if not -rank <= dim < rank:
        raise SpecError(f"{node.op}: dim={dim} is out of range for {fmt_shape(shape)} ({len(shape)} axes"
                        + (f", {extra} added" if extra else "") + ")", node.span)
    return repr(dim) if code else dim % rank


def numel(shape: Shape, sizes: dict[str, int]) -> int:
    return round(math.prod(dim_value(d, sizes) for d in shape))


def need_width(node: Node, shape: Shape, what: str) -> int:
    """The last dim of `shape` as a number, or a located error saying why the op needs one."""
    if not shape:
        raise SpecError(f"{node.op} needs a tensor with a width (a last dim), but the {what} is a single number "
                        "(shape [])", node.span)
    width = shape[-1]
    if not isinstance(width, int):
        raise SpecError(
            f"{node.op} needs a known width to create its weights, but the {what} has shape "
            f"{fmt_shape(shape)} whose last dim is the symbol {width!r}",
            node.span,
            hint="declare the width with a parameter, e.g. `x: Tensor[B, T, d_model]`",
        )
    return width


class Width:
    """A width relative to a known one: the width of node `of` (default: the op's own
    input) times num/den. `infer_shapes` replaces it with the number."""

    def __init__(self, num: int = 1, den: int = 1, of: str | None = None, why: str = "") -> None:
        self.num, self.den, self.of, self.why = num, den, of, why

    def __repr__(self) -> str:
        base = f"width(%{self.of})" if self.of else "width(in)"
        return base if (self.num, self.den) == (1, 1) else f"{base}*{self.num}/{self.den}"


# ----------------------------------------------------------------------------- initialisation


ZEROS = InitRule("zeros", ())


def init_arg() -> A:
    """`init=` / `bias_init=`: an initialisation rule (`normal(0.02)`), or none for the default."""
    return A((InitRule, type(None)), None)


def init_code(rule: InitRule) -> str:
    """A rule as generated code writes it: `AF.Init.normal(std=0.02)` (names from a fixed set, numbers)."""
    return f"AF.Init.{rule.rule}({', '.join(f'{k}={v!r}' for k, v in rule.args)})"


def initialised(ctor: str, weight: InitRule | None = None, bias: InitRule | None = None) -> str:
    """A module constructor, wrapped to initialise its weight and bias by the spec's rules when it gives any."""
    rules = [f"{name}={init_code(rule)}" for name, rule in (("weight", weight), ("bias", bias)) if rule is not None]
    return f"AF.initialised({ctor}, {', '.join(rules)})" if rules else ctor


# ----------------------------------------------------------------------------- ops


class OpDef:
    """One IR op: its attributes, shape rule, weights, FLOPs and code."""

    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ("x",)  # tensor arguments, in order
    attrs: ClassVar[dict[str, A]] = {}  # scalar attributes, in positional order
    list_input: ClassVar[str | None] = None  # the input that is a list of tensors (`concat([a, b])`)
    number_inputs: ClassVar[frozenset[str]] = frozenset()  # inputs that may be a number (kept as attributes)
    optional_inputs: ClassVar[frozenset[str]] = frozenset()
    pure: ClassVar[bool] = True  # no weights, no randomness: safe to CSE
    random: ClassVar[bool] = False  # impure only for its randomness: it makes no module with weights
    user: ClassVar[bool] = True  # callable from a spec
    # The kernel family (archc.kernels.registry) whose face the `kernel` attribute names, and the
    # words `--kernel` patterns may use for this op ("attention", or "mixers" and the mixer's name).
    kernel_family: ClassVar[str | None] = None
    kernel_groups: ClassVar[tuple[str, ...]] = ()
    # weights() keys are relative to the node's own path, or to its scope when this is set
    weights_at_scope: ClassVar[bool] = False
    is_linear_map: ClassVar[bool] = False  # a dense map whose 2-D weight is a `matrix` or the `head`
    is_loss: ClassVar[bool] = False  # what feeds it directly is the model's head (analysis.param_roles)
    # codegen ends the last forward line with the spec line it came from
    line_comment: ClassVar[bool] = True
    # the order positional arguments bind in, when not the inputs then the attributes (einsum's equation first)
    positional: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def signature(cls) -> tuple[str, ...]:
        return cls.positional or (*cls.inputs, *cls.attrs)

    def infer(self, node: Node, ins: list[Shape], graph: Graph) -> Shape:
        return ins[0]

    def dtype(self, attrs: dict[str, Any], dtypes: list[str], span: Span) -> str:
        """The dtype of this op's value (`float`, `long` or `bool`) from its tensor inputs'; a located error
        where they cannot combine."""
        return "float"

    def default(self, name: str, given: dict[str, ast.Expr]) -> Any:
        """The value of attribute `name` when a call leaves it out (some follow other arguments)."""
        return self.attrs[name].default

    def parts(self, values: dict[str, Any], call: ast.Call) -> int | None:
        """How many values a call gives, for an op that gives several (`chunk`: one node per value);
        None for one."""
        return None

    def weights(self, node: Node, ins: list[Shape]) -> dict[str, Shape]:
        return {}

    def flops(self, node: Node, ins: list[Shape], out: Shape, sizes: dict[str, int]) -> int:
        return 0

    def roles(self, node: Node) -> dict[str, str]:
        """Optimizer roles (analysis.param_roles) of weights() keys whose shape does not tell it, e.g. a
        2-D table of positions that is an `embedding`, not a Muon `matrix`."""
        return {}

    # kernel choice (ops with a kernel_family): see passes/choose_kernels.py
    def choose_kernel(self, node: Node, graph: Graph) -> tuple[str, str]:
        """The default kernel and why, when `--kernel` does not force one."""
        raise NotImplementedError(self.name)

    def unfit(self, node: Node, kernel: str, graph: Graph) -> str | None:
        """Why `kernel` (a face of this op's family) cannot run this node, or None."""
        return None

    def kv_per_token(self, node: Node) -> float:
        """Floats a decoding cache keeps per token (0: none that grows with the sequence)."""
        return 0

    def active_share(self, node: Node) -> tuple[str, float] | None:
        """(scope path, fraction): the parameters under that scope serve only this fraction of the tokens
        (routed experts: top_k of n); None for ops that route nothing."""
        return None

    def active_shares(self, node: Node) -> dict[str, float]:
        """Scope path -> the fraction of the tokens its parameters serve (`active_share`'s, or several)."""
        share = self.active_share(node)
        return dict([share]) if share else {}

    def summary_line(self, node: Node, count: Callable[..., int]) -> tuple[str, str] | None:
        """(label, text): a line for `archc summary` about this node (a gated layer's branches), or None;
        `count(scope, active=False)` gives the parameters under a scope (with `active`, those one token uses)."""
        return None

    def memory_per_token(self, node: Node) -> int:
        """Entries of this node's `memory` weights (roles()) one token reads; 0 for ops without memory."""
        return 0

    def cannot_decode(self, node: Node, ins: list[Shape]) -> str | None:
        """Why the module holding this node cannot continue a sequence call by call (a sequence mixer
        without a cache to decode from), or None."""
        return None

    def describe_node(self, node: Node) -> str:
        """A few words on what this node is, for error messages (`causal, window=64`)."""
        return node.op

    def warnings(self, node: Node, graph: Graph) -> list:
        """SpecWarnings about this node in the whole model: a spec that compiles but likely does not mean what it
        says (a next-token loss over bidirectional attention)."""
        return []

    def after_lowering(self, graph: Graph) -> None:
        """Whole-graph work once a spec using this op is lowered (e.g. adding auxiliary losses)."""

    # code generation: the modules built in __init__, and the forward lines
    def init(self, node: Node, ins: list[Shape]) -> str | None:
        """The constructor of this node's module (`self.<name> = ...`), if it has one."""
        return None

    def extra_modules(self, node: Node, ins: list[Shape]) -> list[tuple[str, str]]:
        """Further (attribute, constructor) pairs in the enclosing module."""
        return []

    def forward(self, node: Node, args: list[str], out: str, mod: str, ins: list[Shape]) -> list[str]:
        raise NotImplementedError(self.name)


REGISTRY: dict[str, OpDef] = {}


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: the op `cls.name` is `cls()`."""
    if cls.name in REGISTRY:
        raise ValueError(f"op {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls()
    return cls


# ----------------------------------------------------------------------------- built-ins that lower


Lower = Callable[["LowerContext", list[str], dict[str, Any]], str]


@attrs.frozen
class Composite:
    """A built-in the spec calls that lowers to a scope of IR ops (a class in the generated code)."""

    name: str  # the spec op
    cls: str  # class name in generated code
    default_name: str  # attribute name unless labelled with `as`
    inputs: tuple[str, ...]
    attrs: dict[str, A]
    lower: Lower  # (ctx, input node ids (None for an optional one left out), attribute values) -> output node id
    optional: tuple[str, ...] = ()  # tensor inputs that may be left out (`mask=`), after `attrs` in position


COMPOSITES: dict[str, Composite] = {}


def vocabulary() -> Vocabulary:
    """What a spec may call besides its blocks, with each op's argument names in positional order: the
    `Vocabulary` the front end's name resolver (archc.dsl.resolve) checks a whole spec against."""
    return Vocabulary({
        **{name: op.signature() for name, op in REGISTRY.items() if op.user},
        **{name: (*comp.inputs, *comp.attrs, *comp.optional) for name, comp in COMPOSITES.items()},
    }, block_arguments=frozenset((name, arg) for name, comp in COMPOSITES.items()
                                 for arg, spec in comp.attrs.items() if spec.type in BLOCK_TYPES))


def composite(name: str, *, cls: str, default_name: str, attrs: dict[str, A],
              inputs: tuple[str, ...] = ("x",), optional: tuple[str, ...] = ()) -> Callable[[Lower], Lower]:
    """Function decorator: `name(...)` in a spec lowers through the decorated function."""

    def wrap(fn: Lower) -> Lower:
        if name in COMPOSITES:
            raise ValueError(f"built-in {name!r} is registered twice")
        COMPOSITES[name] = Composite(name, cls, default_name, inputs, attrs, fn, optional)
        return fn

    return wrap


# ----------------------------------------------------------------------------- arguments


def bind(call: ast.Call, names: list[str] | tuple[str, ...], what: str) -> dict[str, ast.Expr]:
    """Match a call's arguments to parameter names; unknown keywords get a did-you-mean."""
    names = list(names)
    if len(call.args) > len(names):
        raise SpecError(f"{what} takes at most {len(names)} positional arguments "
                        f"({', '.join(names)}), got {len(call.args)}", call.args[len(names)].span)
    bound = dict(zip(names, call.args))
    for kw in call.kwargs:
        if kw.name not in names:
            raise SpecError(f"{what} has no argument `{kw.name}`", kw.span,
                            hint=did_you_mean(kw.name, names) or f"its arguments are: {', '.join(names)}")
        if kw.name in bound:
            raise SpecError(f"argument `{kw.name}` is given twice", kw.span)
        bound[kw.name] = kw.value
    return bound


def attr_values(call: ast.Call, bound: dict[str, ast.Expr], specs: dict[str, A], scalars: dict[str, Any],
                what: str) -> dict[str, Any]:
    """The attributes of a call as values: evaluated, checked against their specs, defaults filled in."""
    values: dict[str, Any] = {}
    for name, spec in specs.items():
        if name in bound and spec.type is BlockName:
            expr = bound[name]
            values[name] = expr.id if isinstance(expr, ast.Name) else ""  # not a name: no block has it
        elif name in bound and spec.type is BlockNames:
            expr = bound[name]
            if not isinstance(expr, ast.ListExpr):
                raise SpecError(f"{what}: `{name}` is a list of blocks, as in `{name}=[A, B]`", expr.span)
            values[name] = [item.id if isinstance(item, ast.Name) else "" for item in expr.items]
        elif name in bound:
            value = evaluate(bound[name], scalars)
            problem = spec.check(name, value)
            if problem:
                raise SpecError(f"{what}: {problem}", bound[name].span)
            values[name] = spec.coerce(value)
        elif spec.default is REQUIRED:
            raise SpecError(f"{what} needs its `{name}` argument", call.span)
        else:
            values[name] = spec.default
    return values


# ----------------------------------------------------------------------------- lowering


class LowerContext:
    """What a built-in's lowering sees: the graph, the scope it lowers into, and the language.

    `add` and the helpers after it create nodes in this scope; `call` lowers a block or built-in
    call here (as the spec would write it); `step` opens a numbered child scope, like one step of
    a `repeat`. The lowerer behind it stays private.
    """

    def __init__(self, lowerer, frame, path: str, span: Span, bound: dict[str, ast.Expr]) -> None:
        self._lowerer = lowerer
        self._frame = frame  # the calling block's frame (its scalars)
        self._bound = bound
        self.graph: Graph = lowerer.graph
        self.path = path
        self.span = span

    def given(self, arg: str) -> bool:
        """Whether the call gives argument `arg` (rather than leaving it to its default)."""
        return arg in self._bound

    def where(self, arg: str) -> Span:
        """The span of argument `arg` as the call gives it, else the whole call's."""
        return self._bound[arg].span if arg in self._bound else self.span

    def claim(self, name: str) -> str:
        """A module attribute name in this scope: `name`, or `name_1`, ... when taken."""
        return self._lowerer.names[self.path].claim(name, False, self.span)

    def add(self, op: str, args: list[str], attrs_: dict[str, Any] | None = None, *, name: str | None = None,
            var: str = "", module: bool = False, dtype: str = "float") -> str:
        """A node of `op` in this scope; `module`: it is a module attribute, so its name is claimed."""
        name = name or op
        return self.graph.add(op, args, attrs_ or {}, scope=self.path, name=self.claim(name) if module else name,
                              span=self.span, dtype=dtype, var=var).id

    def linear(self, x: str, out, name: str, *, bias: bool = False, var: str = "") -> str:
        return self.add("linear", [x], {"out": out, "bias": bias, "tie": None}, name=name, var=var, module=True)

    def rms_norm(self, x: str, eps: float, name: str) -> str:
        return self.add("rms_norm", [x], {"eps": eps}, name=name, var=name, module=True)

    def act(self, op: str, x: str, var: str) -> str:
        return self.add(op, [x], var=var)

    def scale(self, x: str, factor: float, var: str) -> str:
        return self.add("mul", [x], {"scalar": factor, "scalar_left": False}, name="mul", var=var)

    def split(self, x: str, index: int, start: int, size: int, var: str) -> str:
        return self.add("split_part", [x], {"index": index, "start": start, "size": size}, name=var, var=var)

    def core(self, op: str, args: list[str], attrs_: dict[str, Any]) -> str:
        """The one core op of a built-in, as the module `core`; its kernel is chosen by a pass."""
        kernel = {"kernel": None, "kernel_reason": None} if REGISTRY[op].kernel_family else {}
        return self.add(op, args, {**attrs_, **kernel}, name="core", var="y", module=True)

    def block(self, name: str | None, arg: str, why: str) -> ast.BlockDef:
        """The spec's block `name`, given as argument `arg`; else a located error saying `why`."""
        blocks = self._lowerer.spec.blocks
        if name not in blocks:
            raise SpecError(why, self.where(arg), hint=did_you_mean(name or "?", [b for b, (d, _m) in blocks.items()
                                                                                  if not d.is_model]))
        return blocks[name][0]

    def call(self, func: str, tensors: list[str], kwargs: dict[str, Any] | None = None,
             label: str | None = None) -> str:
        """Lower `func(tensors..., **kwargs) as label` in this scope; the output node id."""
        return self._lowerer.call_in(self._frame, self.path, func, tensors, kwargs or {}, label, self.span)

    @contextmanager
    def step(self, attr: str, index: int) -> Iterator[LowerContext]:
        """Child scope `<path>.<attr>.<index>` (one step of a list); a step holding only one block or built-in
        call becomes that module itself."""
        path = f"{self.path}.{attr}.{index}"
        with self._lowerer.step(path, attr, self.span):
            yield LowerContext(self._lowerer, self._frame, path, self.span, self._bound)
