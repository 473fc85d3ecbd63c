"""The op registry: for each IR op, its attributes, shape rule, weights, FLOPs and code.

A new op is one `OpDef` subclass registered here plus a test. Shape rules
raise `SpecError`s that name the dims (einops-style), located at the spec
expression the node came from.

FLOPs count matmul work only (2·m·n·k per product), as `torch.utils.flop_counter`
does and as the 6N-per-token rule assumes; elementwise ops, norms and softmax
are left out.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, ClassVar

from archc.compiler.ir import Graph, Node, Shape
from archc.compiler.pytext import comment
from archc.dsl.diagnostics import SpecError, closest

REQUIRED = object()


class A:
    """An attribute of an op as the spec writes it: type, default, allowed values."""

    def __init__(self, type_: type | tuple, default: Any = REQUIRED, *, choices: tuple = (),
                 positive: bool = False, unit: bool = False) -> None:
        self.type = type_
        self.default = default
        self.choices = choices
        self.positive = positive
        self.unit = unit  # a probability in [0, 1)

    def check(self, name: str, value: Any) -> str | None:
        """Why `value` is not acceptable for this attribute, or None."""
        types = self.type if isinstance(self.type, tuple) else (self.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
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


_TYPE_WORDS = {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a string",
               type(None): "nothing"}


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


def fmt_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def dim_value(dim, sizes: dict[str, int]) -> float:
    """The size of a dim: a number, a symbol, or a product/quotient of them such as `B*T*2/8`."""
    if isinstance(dim, int):
        return dim
    value, op = 1.0, "*"
    for part in re.split(r"([*/])", dim):
        if part in ("*", "/"):
            op = part
            continue
        factor = float(part) if part.isdigit() else sizes[part]
        value = value * factor if op == "*" else value / factor
    return value


def dim_symbols(dim) -> list[str]:
    return [] if isinstance(dim, int) else [p for p in re.split(r"[*/]", dim) if not p.isdigit()]


def numel(shape: Shape, sizes: dict[str, int]) -> int:
    return round(math.prod(dim_value(d, sizes) for d in shape))


class OpDef:
    name: ClassVar[str]
    inputs: ClassVar[tuple[str, ...]] = ("x",)  # tensor arguments, in order
    attrs: ClassVar[dict[str, A]] = {}  # scalar attributes, in positional order
    pure: ClassVar[bool] = True  # no weights, no randomness: safe to CSE
    user: ClassVar[bool] = True  # callable from a spec

    def infer(self, node: Node, ins: list[Shape], graph: Graph) -> Shape:
        return ins[0]

    def weights(self, node: Node, ins: list[Shape]) -> dict[str, Shape]:
        return {}

    def flops(self, node: Node, ins: list[Shape], out: Shape, sizes: dict[str, int]) -> int:
        return 0

    # weights() keys are relative to the node's own path, or to its scope when this is set
    weights_at_scope: ClassVar[bool] = False

    def roles(self, node: Node) -> dict[str, str]:
        """Optimizer roles (analysis.param_roles) of weights() keys whose shape does not tell it, e.g. a
        2-D table of positions that is an `embedding`, not a Muon `matrix`."""
        return {}

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
    REGISTRY[cls.name] = cls()
    return cls


def _need_width(node: Node, shape: Shape, what: str) -> int:
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


# ---- inputs and embeddings ---------------------------------------------------


@register
class Input(OpDef):
    name = "input"
    inputs = ()
    attrs = {"kind": A(str), "dims": A(list)}
    user = False

    def infer(self, node, ins, graph):
        return tuple(node.attrs["dims"])


@register
class Embedding(OpDef):
    name = "embedding"
    inputs = ("tokens",)
    attrs = {"num": A(int, positive=True), "dim": A(int, positive=True)}
    pure = False

    def infer(self, node, ins, graph):
        return (*ins[0], node.attrs["dim"])

    def weights(self, node, ins):
        return {"weight": (node.attrs["num"], node.attrs["dim"])}

    def init(self, node, ins):
        return f"nn.Embedding({node.attrs['num']!r}, {node.attrs['dim']!r})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


@register
class PosEmbedding(OpDef):
    """Learned absolute positions for a [B, T, D] stream: returns [T, D] to add."""

    name = "pos_embedding"
    attrs = {"max_len": A(int, positive=True)}
    pure = False

    def infer(self, node, ins, graph):
        if len(ins[0]) != 3:
            raise SpecError(f"pos_embedding expects a [B, T, D] stream, got {fmt_shape(ins[0])}", node.span)
        return (ins[0][1], _need_width(node, ins[0], "input"))

    def weights(self, node, ins):
        return {"weight": (node.attrs["max_len"], ins[0][-1])}

    def init(self, node, ins):
        return f"AF.LearnedPositions({node.attrs['max_len']!r}, {ins[0][-1]!r})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


# ---- linear maps -------------------------------------------------------------


class Width:
    """A width relative to a known one: the width of node `of` (default: the op's own
    input) times num/den. `infer_shapes` replaces it with the number."""

    def __init__(self, num: int = 1, den: int = 1, of: str | None = None, why: str = "") -> None:
        self.num, self.den, self.of, self.why = num, den, of, why

    def __repr__(self) -> str:
        base = f"width(%{self.of})" if self.of else "width(in)"
        return base if (self.num, self.den) == (1, 1) else f"{base}*{self.num}/{self.den}"


@register
class Linear(OpDef):
    name = "linear"
    attrs = {"out": A((int, Width)), "bias": A(bool, True), "tie": A((str, type(None)), None)}
    pure = False

    def infer(self, node, ins, graph):
        width = _need_width(node, ins[0], "input")
        out = node.attrs["out"]
        if isinstance(out, Width):
            base = width if out.of is None else graph.node(out.of).shape[-1]
            if (base * out.num) % out.den:
                raise SpecError(out.why.format(width=base) if out.why else
                                f"the width {base} times {out.num}/{out.den} is not a whole number", node.span)
            out = node.attrs["out"] = base * out.num // out.den
        if out <= 0:
            raise SpecError(f"`linear`: `out` must be positive, got {out}", node.span)
        tie = node.attrs.get("tie")
        if tie is not None and node.attrs["bias"]:
            raise SpecError("a tied linear reuses the embedding's weight and has no bias of its own", node.span,
                            hint="write `bias=false` with `tie=`")
        if tie is not None:
            target = graph.node(tie)
            want = (out, width)
            have = tuple(REGISTRY[target.op].weights(target, [graph.node(a).shape for a in graph.args(tie)])["weight"])
            if have != want:
                raise SpecError(
                    f"cannot tie this linear ([{width}] -> [{out}]) to `{target.name}`: its weight has shape "
                    f"{fmt_shape(have)} but the tied weight must be {fmt_shape(want)}",
                    node.span,
                )
        return (*ins[0][:-1], out)

    def weights(self, node, ins):
        w = {} if node.attrs.get("tie") else {"weight": (node.attrs["out"], ins[0][-1])}
        if node.attrs["bias"]:
            w["bias"] = (node.attrs["out"],)
        return w

    def flops(self, node, ins, out, sizes):
        return 2 * numel(ins[0], sizes) * node.attrs["out"]

    def init(self, node, ins):
        if node.attrs.get("tie"):
            return None  # uses the tied module's weight
        return f"nn.Linear({ins[0][-1]!r}, {node.attrs['out']!r}, bias={node.attrs['bias']!r})"

    def forward(self, node, args, out, mod, ins):
        tie = node.attrs.get("tie")
        if tie:
            return [f"{out} = F.linear({args[0]}, {node.attrs['tie_ref']})"]
        return [f"{out} = {mod}({args[0]})"]


@register
class FusedLinear(OpDef):
    """Several linears reading one input, as one matmul; `split_part` nodes take the pieces."""

    name = "fused_linear"
    attrs = {"parts": A(list), "bias": A(bool)}
    pure = False
    user = False

    def infer(self, node, ins, graph):
        return (*ins[0][:-1], sum(size for _name, size in node.attrs["parts"]))

    def weights(self, node, ins):
        total = sum(size for _name, size in node.attrs["parts"])
        w = {"weight": (total, ins[0][-1])}
        if node.attrs["bias"]:
            w["bias"] = (total,)
        return w

    def flops(self, node, ins, out, sizes):
        return 2 * numel(ins[0], sizes) * out[-1]

    def init(self, node, ins):
        total = sum(size for _name, size in node.attrs["parts"])
        return f"nn.Linear({ins[0][-1]!r}, {total!r}, bias={node.attrs['bias']!r})"

    def forward(self, node, args, out, mod, ins):
        # codegen binds the split_part users directly (see codegen._emit_fused)
        return [f"{out} = {mod}({args[0]})"]


@register
class SplitPart(OpDef):
    name = "split_part"
    attrs = {"index": A(int), "start": A(int), "size": A(int)}
    user = False

    def infer(self, node, ins, graph):
        return (*ins[0][:-1], node.attrs["size"])

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        return [f"{out} = {args[0]}[..., {a['start']!r}:{a['start'] + a['size']!r}]"]


# ---- normalisation, activations, dropout ------------------------------------


@register
class LayerNorm(OpDef):
    name = "layer_norm"
    attrs = {"eps": A(float, 1e-5, positive=True), "bias": A(bool, True)}
    pure = False

    def weights(self, node, ins):
        d = _need_width(node, ins[0], "input")
        return {"weight": (d,), "bias": (d,)} if node.attrs["bias"] else {"weight": (d,)}

    def init(self, node, ins):
        return f"nn.LayerNorm({ins[0][-1]!r}, eps={node.attrs['eps']!r}, bias={node.attrs['bias']!r})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


@register
class RMSNorm(OpDef):
    name = "rms_norm"
    attrs = {"eps": A(float, 1e-6, positive=True)}
    pure = False

    def weights(self, node, ins):
        return {"weight": (_need_width(node, ins[0], "input"),)}

    def init(self, node, ins):
        return f"nn.RMSNorm({ins[0][-1]!r}, eps={node.attrs['eps']!r})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


class Activation(OpDef):
    call: ClassVar[str]

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {self.call.format(x=args[0])}"]


ACTIVATIONS: dict[str, str] = {
    "relu": "F.relu({x})",
    "gelu": "F.gelu({x})",
    "gelu_tanh": 'F.gelu({x}, approximate="tanh")',
    "silu": "F.silu({x})",
    "sigmoid": "torch.sigmoid({x})",
    "tanh": "torch.tanh({x})",
    "softplus": "F.softplus({x})",
    "relu2": "F.relu({x}).square()",
}

for _act, _call in ACTIVATIONS.items():
    register(type(f"Act_{_act}", (Activation,), {"name": _act, "call": _call}))


@register
class Dropout(OpDef):
    name = "dropout"
    attrs = {"p": A(float, unit=True)}
    pure = False  # random: two dropouts of one input are not the same value

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = F.dropout({args[0]}, p={node.attrs['p']!r}, training=self.training)"]


# ---- elementwise arithmetic --------------------------------------------------


def broadcast(node: Node, a: Shape, b: Shape, verb: str) -> Shape:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            raise SpecError(
                f"cannot {verb} tensors of shapes {fmt_shape(a)} and {fmt_shape(b)}: "
                f"dim {-i} differs ({da} vs {db})",
                node.span,
            )
    return tuple(reversed(out))


class Binary(OpDef):
    """`a op b` of two tensors, or of a tensor and the number `scalar` (attr)."""

    symbol: ClassVar[str]
    verb: ClassVar[str]
    user = False
    attrs = {"scalar": A((int, float, type(None)), None), "scalar_left": A(bool, False)}

    def infer(self, node, ins, graph):
        if len(ins) == 1:
            return ins[0]
        return broadcast(node, ins[0], ins[1], self.verb)

    def forward(self, node, args, out, mod, ins):
        if len(args) == 1:
            lhs, rhs = (repr(node.attrs["scalar"]), args[0]) if node.attrs["scalar_left"] else (args[0], repr(node.attrs["scalar"]))
        else:
            lhs, rhs = args
        return [f"{out} = {lhs} {self.symbol} {rhs}"]


for _name, _sym, _verb in (("add", "+", "add"), ("sub", "-", "subtract"), ("mul", "*", "multiply"), ("div", "/", "divide")):
    register(type(f"Binary_{_name}", (Binary,), {"name": _name, "symbol": _sym, "verb": _verb}))


# ---- attention ---------------------------------------------------------------

# auto: decided at run time (archc.kernels.attention.resolve); sdpa: torch's SDPA, no mask or is_causal;
# sdpa_mask: SDPA with a boolean mask; flex: flex_attention with a BlockMask; local: blocked sliding
# window, linear in T; math: the explicit-mask reference.
ATTENTION_KERNELS = ("auto", "sdpa", "sdpa_mask", "flex", "local", "math")


@register
class AttentionCore(OpDef):
    """softmax(q kᵀ / √d + mask) v over heads, after RoPE and QK-norm; q comes in as [B, T, H·d],
    k and v as [B, S, K·d] (S = T for self-attention).

    The mask: `causal`, a sliding `window`, `sinks` always-visible first keys,
    a bidirectional `prefix` (archc.kernels.attention has the exact predicate).
    """

    name = "attention_core"
    inputs = ("q", "k", "v")
    attrs = {
        "heads": A(int, positive=True),
        "kv_heads": A(int, positive=True),
        "head_dim": A((int, type(None)), None),
        "causal": A(bool, True),
        "window": A((int, type(None)), None, positive=True),
        "sinks": A(int, 0),
        "prefix": A(int, 0),
        "rope": A(bool, False),
        "rope_theta": A(float, 10000.0, positive=True),
        "qk_norm": A(bool, False),
        "norm_eps": A(float, 1e-6, positive=True),
        "dropout": A(float, 0.0, unit=True),
        "kernel": A((str, type(None)), None),  # chosen by choose_attention_kernel
        "kernel_reason": A((str, type(None)), None),
    }
    pure = False
    user = False

    def infer(self, node, ins, graph):
        a = node.attrs
        q, k, v = ins
        if len(q) != 3:
            raise SpecError(f"attention expects a [B, T, D] stream, got {fmt_shape(q)}", node.span)
        if len(k) != 3 or k[:2] != v[:2] or k[0] != q[0]:
            raise SpecError(f"keys and values must be [B, S, D] streams with the queries' batch dim {q[0]}, "
                            f"got {fmt_shape(k)} and {fmt_shape(v)}", node.span)
        self._check_mask(node)
        width = _need_width(node, q, "query")
        if width % a["heads"]:
            near = [h for d in range(1, 1000) for h in (a["heads"] - d, a["heads"] + d)
                    if 0 < h <= width and width % h == 0][:2]
            such = f", such as {' or '.join(map(str, sorted(near)))}" if near else ""
            raise SpecError(f"the query width {width} does not split into heads={a['heads']}", node.span,
                            hint=f"use heads that divide {width}{such}, or give head_dim")
        if a["head_dim"] is None:
            a["head_dim"] = width // a["heads"]
        hd = a["head_dim"]
        if hd * a["heads"] != width:
            raise SpecError(f"heads={a['heads']} × head_dim={hd} = {hd * a['heads']} but queries are {width} wide", node.span)
        if a["heads"] % a["kv_heads"]:
            raise SpecError(
                f"heads={a['heads']} must be a multiple of kv_heads={a['kv_heads']} "
                "(each key/value head serves a group of query heads)",
                node.span,
            )
        for what, shape in (("key", k), ("value", v)):
            if shape[-1] != a["kv_heads"] * hd:
                raise SpecError(
                    f"{what}s have shape {fmt_shape(shape)} but kv_heads={a['kv_heads']} × head_dim={hd} "
                    f"needs width {a['kv_heads'] * hd}",
                    node.span,
                )
        if a["rope"] and hd % 2:
            raise SpecError(f"RoPE needs an even head_dim, got {hd}", node.span)
        return q

    @staticmethod
    def _check_mask(node) -> None:
        a = node.attrs
        if a["window"] is not None and a["window"] < 1:
            raise SpecError(f"attention: `window` must be at least 1 (key j is visible to query i when "
                            f"i-window < j <= i), got {a['window']}", node.span,
                            hint="leave `window` out for no window")
        for name in ("sinks", "prefix"):
            if a[name] < 0:
                raise SpecError(f"attention: `{name}` must be 0 or more, got {a[name]}", node.span)
        if a["sinks"] and a["window"] is None:
            raise SpecError(f"attention: sinks={a['sinks']} needs a window: without one every earlier key is "
                            "visible already", node.span, hint="add window=N, or drop sinks")
        if a["prefix"] and not a["causal"] and a["window"] is None:
            raise SpecError(f"attention: prefix={a['prefix']} has no effect on bidirectional attention without a "
                            "window: every position sees every other already", node.span,
                            hint="drop prefix, or use causal=true (prefix-LM)")

    @staticmethod
    def mask_words(node) -> str:
        """The mask in the spec's words, for kernel reasons: `causal, window=64, sinks=4`."""
        a = node.attrs
        words = ["causal" if a["causal"] else "bidirectional"]
        words += [f"{k}={a[k]}" for k in ("window", "sinks", "prefix") if a[k]]
        return ", ".join(words)

    def masked(self, node) -> bool:
        """A mask beyond what SDPA's is_causal expresses."""
        a = node.attrs
        return a["window"] is not None or bool(a["sinks"]) or bool(a["prefix"])

    def unfit(self, node, kernel: str, graph: Graph) -> str | None:
        """Why `kernel` cannot compute this attention, or None."""
        a = node.attrs
        if kernel == "sdpa" and self.masked(node):
            return f"SDPA's is_causal cannot express {self.mask_words(node)}"
        if kernel == "sdpa" and a["causal"] and not self.same_length(node, graph):
            return ("SDPA's is_causal aligns queries with the first keys, but keys here have another length "
                    "(archc aligns them at the end)")
        if kernel == "local" and a["window"] is None:
            return "`local` needs a window"
        if kernel == "flex" and a["dropout"]:
            return "flex_attention has no attention dropout"
        return None

    @staticmethod
    def same_length(node, graph: Graph) -> bool:
        q, k, _v = graph.args(node.id)
        return graph.node(q).shape[1] == graph.node(k).shape[1]

    weights_at_scope = True

    def weights(self, node, ins):
        hd = node.attrs["head_dim"]
        return {"q_norm.weight": (hd,), "k_norm.weight": (hd,)} if node.attrs["qk_norm"] else {}

    def extra_modules(self, node, ins):
        a = node.attrs
        mods = []
        if a["qk_norm"]:
            mods += [("q_norm", f"nn.RMSNorm({a['head_dim']!r}, eps={a['norm_eps']!r})"),
                     ("k_norm", f"nn.RMSNorm({a['head_dim']!r}, eps={a['norm_eps']!r})")]
        if a["rope"]:
            mods.append(("rope", f"AF.RotaryEmbedding({a['head_dim']!r}, theta={a['rope_theta']!r})"))
        if self.decodes(node, ins):
            mods.append(("kv_cache", "AF.KVCache()"))
        return mods

    @staticmethod
    def decodes(node, ins) -> bool:
        """Causal self-attention (keys as long as queries) decodes token by token from a KV cache."""
        return node.attrs["causal"] and ins[0][1] == ins[1][1]

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        q, k, v = args
        h, kv, hd = a["heads"], a["kv_heads"], a["head_dim"]
        s = "T" if ins[0][1] == ins[1][1] else "S"  # the keys' length, in the local names
        lines = [
            f"B, T, _ = {q}.shape",
            f"{q}_BHTd = {q}.view(B, T, {h!r}, {hd!r}).transpose(1, 2)",
            f"{k}_BK{s}d = {k}.view(B, -1, {kv!r}, {hd!r}).transpose(1, 2)",
            f"{v}_BK{s}d = {v}.view(B, -1, {kv!r}, {hd!r}).transpose(1, 2)",
        ]
        qh, kh, vh = f"{q}_BHTd", f"{k}_BK{s}d", f"{v}_BK{s}d"
        if a["qk_norm"]:
            lines.append(f"{qh}, {kh} = self.q_norm({qh}), self.k_norm({kh})")
        decodes = self.decodes(node, ins)
        if a["rope"]:
            offset = ", offset=self.kv_cache.length" if decodes else ""
            lines.append(f"{qh}, {kh} = self.rope({qh}, {kh}{offset})")
        drop = f", dropout_p={a['dropout']!r} if self.training else 0.0" if a["dropout"] else ""
        mask = "".join(f", {name}={a[name]!r}" for name in ("window", "sinks", "prefix") if a[name])
        if a["kernel"] == "sdpa":
            gqa = ", enable_gqa=True" if kv != h else ""
            call = f"F.scaled_dot_product_attention({qh}, {kh}, {vh}, is_causal={a['causal']!r}{drop}{gqa})"
        else:
            call = f"AF.attention_{a['kernel']}({qh}, {kh}, {vh}, causal={a['causal']!r}{mask}{drop})"
        chosen = [comment(f"kernel: {a['kernel']} — {a['kernel_reason']}"), f"{out} = {call}"]
        if decodes:
            lines += ["if self.kv_cache.active:  # decoding: attend over the cached keys and values too",
                      f"    {out} = self.kv_cache.attend({qh}, {kh}, {vh}, causal=True{mask})",
                      "else:", *("    " + line for line in chosen)]
        else:
            lines += chosen
        lines.append(f"{out} = {out}.transpose(1, 2).reshape(B, T, {h * hd!r})")
        return lines

    def keys_per_query(self, node, s: int) -> int:
        """Keys each query is counted against: all S, or with a window the keys it reaches
        (w causal, 2w-1 bidirectional) plus the max(sinks, prefix) first ones, at most S."""
        a = node.attrs
        if a["window"] is None:
            return s
        reach = a["window"] if a["causal"] else 2 * a["window"] - 1
        return min(s, reach + max(a["sinks"], a["prefix"]))

    def flops(self, node, ins, out, sizes):
        # Two batched products per head (q kᵀ and p v). Without a window every key is
        # counted, even when causal, as FlopCounterMode does for SDPA; with one, the
        # band a query reaches is counted in full, so the cost grows linearly in T.
        q, k, _v = ins
        b_t = numel(q[:-1], sizes)
        s = round(dim_value(k[-2], sizes))
        return 4 * b_t * self.keys_per_query(node, s) * node.attrs["heads"] * node.attrs["head_dim"]


# ---- objectives --------------------------------------------------------------


@register
class NextTokenLoss(OpDef):
    """Mean cross-entropy of logits[:, :-1] against tokens[:, 1:]."""

    name = "next_token_loss"
    inputs = ("logits", "tokens")
    attrs = {}

    def infer(self, node, ins, graph):
        logits, tokens = ins
        if len(logits) != 3 or len(tokens) != 2 or logits[:2] != tokens:
            raise SpecError(
                f"next_token_loss expects logits [B, T, V] and tokens [B, T], got {fmt_shape(logits)} and "
                f"{fmt_shape(tokens)}",
                node.span,
            )
        return ()

    def forward(self, node, args, out, mod, ins):
        logits, tokens = args
        return [
            f"{out} = F.cross_entropy(",
            f"    {logits}[:, :-1].reshape(-1, {logits}.shape[-1]).float(), {tokens}[:, 1:].reshape(-1)",
            ")",
        ]


from archc.compiler import ops_moe  # noqa: E402,F401  (registers the mixture-of-experts ops)
