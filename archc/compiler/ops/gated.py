"""Gated paths: `gated(x, branches=[A, B, C], mode="mix" | "select", ...)` (archc/runtime/gated.py).

    x += gated(rms_norm(x), branches=[FullAttention, LinearAttention], mode="select", top_k=1) as mixer

A per-token learned gate, read from `x` [B, T, D], over branch blocks of any kind. Each branch is
a block of the spec with one tensor parameter (its other parameters take their defaults); the list
`branches` is its modules, in order, and gate column b belongs to `branches.b`.

`mode="mix"` lowers to

    g = branch_gates(gate(x))            # [B, T, heads, n]: softmax over the branches, or a sigmoid each
    y_b = branches[b](x)                 # every branch on every token
    y = mix_branches(y_0, .., y_n-1, g)  # Σ_b g_b · y_b, head by head when heads > 1

and `mode="select"` to the experts' machinery (ops/moe.py), with the branches as experts:

    routing = branch_router(x)           # AF.Router: top_k of n per token, balance loss, load statistics
    x_R = dispatch(x, routing)           # rows sorted by branch (only when a branch runs on rows)
    y_b = branches[b](rows_b)            # a branch declared on rows, Tensor[N, D]: its routed rows only
    y_b = routed_rows(branches[b](x))    # a branch declared on sequences: the whole sequence in, the
                                         #   outputs of its routed tokens kept
    y = combine(concat(y_0, ..), routing)

A sequence mixer (attention, a linear mixer) needs every token as keys, values or recurrent
state, so a sequence branch runs on the whole sequence and only its routed tokens' outputs count;
a row branch (an MLP, a memory read) computes its routed tokens only. Active parameters per token
count a row branch at top_k/n and a sequence branch in full (it works on every token).
"""

from __future__ import annotations

from archc.compiler.ops.base import (
    A,
    BlockNames,
    LowerContext,
    OpDef,
    composite,
    fmt_shape,
    need_width,
    register,
)
from archc.compiler.ops.moe import DEFAULT_AUX_WEIGHT, DEFAULT_BALANCE, Combine, Router, rows_dim, tokens_dim
from archc.dsl import ast
from archc.dsl.diagnostics import SpecError
from archc.runtime.gated import GATES  # one list, owned by the runtime
from archc.runtime.moe import BALANCE_RULES

MODES = ("mix", "select")
ROUTER_OF_GATE = {"softmax": "softmax", "sigmoid": "deepseek_v3"}  # select: the experts' router of that gate


@register
class BranchGates(OpDef):
    """Gate logits [..., heads·n] -> weights [..., heads, n]."""

    name = "branch_gates"
    attrs = {"branches": A(int), "kind": A(str, choices=GATES)}
    user = False

    def infer(self, node, ins, graph):
        (g,) = ins
        return (*g[:-1], need_width(node, g, "gate") // node.attrs["branches"], node.attrs["branches"])

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        return [f"{out} = AF.branch_gates({args[0]}, {a['branches']!r}, {a['kind']!r})"]


@register
class MixBranches(OpDef):
    """Σ_b g_b · y_b; inputs: y_0 .. y_{n-1}, then the gates [..., heads, n]."""

    name = "mix_branches"
    inputs = ()
    attrs = {"names": A(list), "gate": A(str), "heads": A(int)}
    user = False

    def infer(self, node, ins, graph):
        *outs, _gates = ins
        names, heads = node.attrs["names"], node.attrs["heads"]
        for name, shape in zip(names[1:], outs[1:]):
            if shape != outs[0]:
                raise SpecError(f"gated: the branches return different shapes ({names[0]}: {fmt_shape(outs[0])}, "
                                f"{name}: {fmt_shape(shape)}); mixing needs one shape", node.span)
        width = need_width(node, outs[0], "branch output")
        if width % heads:
            raise SpecError(f"gated: heads={heads} must divide the branches' output width {width}", node.span)
        return outs[0]

    def forward(self, node, args, out, mod, ins):
        *outs, gates = args
        return [f"{out} = AF.mix_branches([{', '.join(outs)}], {gates})"]

    def summary_line(self, node, count):
        a = node.attrs
        per = f" per head ({a['heads']} heads)" if a["heads"] > 1 else ""
        return "gated", (f"{node.scope}: mix of {len(a['names'])} branches [{', '.join(a['names'])}], "
                         f"{a['gate']} gate{per}; {count(node.scope):,} params, all active")


@register
class BranchRouter(Router):
    """The experts' router over a gated layer's branches (`rows`: the branch paths that run on routed rows)."""

    name = "branch_router"
    attrs = {**Router.attrs, "rows": A(list)}

    def active_share(self, node):
        return None  # no experts: nothing for expert parallelism to shard

    def active_shares(self, node):
        share = node.attrs["top_k"] / node.attrs["experts"]
        return {path: share for path in node.attrs["rows"]}


@register
class RoutedRows(OpDef):
    """A sequence branch's outputs [B, T, D'] at the tokens routed to it, in sorted row order."""

    name = "routed_rows"
    inputs = ("y", "routing")
    attrs = {"branch": A(int), "branches": A(int)}
    user = False

    def infer(self, node, ins, graph):
        y, routing = ins
        return (f"{rows_dim(tokens_dim(y), routing[-1])}/{node.attrs['branches']}", y[-1])

    def forward(self, node, args, out, mod, ins):
        y, routing = args
        return [f"{out} = AF.routed_rows({y}, {routing}, {node.attrs['branch']!r})"]


@register
class CombineBranches(Combine):
    """The routed branches' rows, gate-weighted, back in the shape of the layer's input."""

    name = "combine_branches"
    attrs = {"names": A(list), "gate": A(str), "top_k": A(int)}

    def infer(self, node, ins, graph):
        rows, _routing, like = ins
        if rows[-1] != like[-1]:
            raise SpecError(f"gated: mode=\"select\" sums the branches' outputs into the stream, but they are "
                            f"{rows[-1]} wide and the input is {like[-1]}; each branch must return its input's width",
                            node.span)
        return like

    def summary_line(self, node, count):
        a = node.attrs
        return "gated", (f"{node.scope}: select top-{a['top_k']} of {len(a['names'])} branches "
                         f"[{', '.join(a['names'])}] per token, {a['gate']} gate; {count(node.scope, active=True):,} "
                         f"of {count(node.scope):,} params active per token")


@register
class TokenRows(OpDef):
    """[B, T, D] -> [B·T, D], for a branch declared on rows in mode="mix"."""

    name = "token_rows"
    user = False

    def infer(self, node, ins, graph):
        (x,) = ins
        return (tokens_dim(x), x[-1])

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.reshape(-1, {args[0]}.shape[-1])"]


@register
class RowsBack(OpDef):
    """A row branch's output [B·T, D'] back to the token axes of `like` [B, T, D]."""

    name = "rows_back"
    inputs = ("rows", "like")
    user = False

    def infer(self, node, ins, graph):
        rows, like = ins
        return (*like[:-1], rows[-1])

    def forward(self, node, args, out, mod, ins):
        rows, like = args
        return [f"{out} = {rows}.view(*{like}.shape[:-1], -1)"]


# ---- the built-in -------------------------------------------------------------


def _branch_blocks(ctx: LowerContext, names: list[str]) -> list[tuple[ast.BlockDef, bool]]:
    """(block, runs on rows) per branch: a block of one tensor parameter; rows when it is declared [N, D]."""
    if len(names) < 2:
        raise SpecError(f"gated: a gate chooses among at least 2 branches, got {len(names)}", ctx.where("branches"))
    out = []
    for name in names:
        block = ctx.block(name, "branches", "`branches=` lists blocks, each mapping the layer's input to an output")
        tensors = [p for p in block.params if isinstance(p.type, ast.TensorType)]
        needed = [p.name for p in block.params if not isinstance(p.type, ast.TensorType) and p.default is None]
        if len(tensors) != 1 or needed:
            raise SpecError(f"gated: branch `{name}` must take one tensor (the layer's input) and nothing else "
                            f"without a default; it takes {', '.join(p.name for p in block.params) or 'nothing'}",
                            ctx.where("branches"))
        if any(isinstance(stmt, ast.Return) and len(stmt.values) != 1 for stmt in block.body):
            raise SpecError(f"gated: branch `{name}` must return one tensor", ctx.where("branches"))
        out.append((block, len(tensors[0].type.dims) == 2))
    return out


def _check(ctx: LowerContext, v, n: int) -> None:
    """Arguments that belong to the other mode, and top_k against the branches; fills in select's defaults."""
    other = ("top_k", "balance", "aux_weight") if v["mode"] == "mix" else ("heads", "bias")
    for arg in other:
        if ctx.given(arg):
            raise SpecError(f"gated: `{arg}=` applies to mode=\"{'select' if v['mode'] == 'mix' else 'mix'}\", "
                            f"not mode=\"{v['mode']}\"", ctx.where(arg))
    if v["mode"] == "mix":
        return
    if v["top_k"] is None:
        v["top_k"] = 1
    if v["top_k"] > n:
        raise SpecError(f"gated: top_k={v['top_k']} is larger than the number of branches ({n})", ctx.where("top_k"))
    kind = ROUTER_OF_GATE[v["gate"]]
    if v["balance"] is None:
        v["balance"] = DEFAULT_BALANCE[kind]
    if v["balance"] == "aux_free" and kind != "deepseek_v3":
        raise SpecError("gated: aux-free balancing (a selection bias) needs gate=\"sigmoid\"", ctx.where("balance"))
    if v["aux_weight"] is None:
        v["aux_weight"] = DEFAULT_AUX_WEIGHT[v["balance"]]


@composite("gated", cls="Gated", default_name="gated", attrs={
    "branches": A(BlockNames),
    "mode": A(str, "mix", choices=MODES),
    "gate": A(str, "softmax", choices=GATES),
    "top_k": A((int, type(None)), None, positive=True),
    "heads": A(int, 1, positive=True),
    "balance": A((str, type(None)), None, choices=(*BALANCE_RULES, None)),
    "aux_weight": A((float, type(None)), None),
    "bias": A(bool, False),
})
def lower_gated(ctx, args, v) -> str:
    (x,) = args
    blocks = _branch_blocks(ctx, v["branches"])
    n = len(blocks)
    _check(ctx, v, n)
    names = [block.name for block, _rows in blocks]
    if v["mode"] == "mix":
        return _mix(ctx, x, blocks, v, names)
    return _select(ctx, x, blocks, v, names)


def _mix(ctx, x, blocks, v, names) -> str:
    n = len(blocks)
    logits = ctx.linear(x, n * v["heads"], "gate", bias=v["bias"], var="g")
    gates = ctx.add("branch_gates", [logits], {"branches": n, "kind": v["gate"]}, var="g")
    flat = ctx.add("token_rows", [x], var="rows") if any(rows for _b, rows in blocks) else None
    attr = ctx.claim("branches")
    outs = []
    for b, (block, rows) in enumerate(blocks):
        with ctx.step(attr, b) as step:
            y = step.call(block.name, [flat if rows else x])
        outs.append(ctx.add("rows_back", [y, x], var="y") if rows else y)
    return ctx.add("mix_branches", [*outs, gates], {"names": names, "gate": v["gate"], "heads": v["heads"]}, var="y")


def _select(ctx, x, blocks, v, names) -> str:
    n = len(blocks)
    attr = ctx.claim("branches")
    router = ctx.add("branch_router", [x], {
        "experts": n, "top_k": v["top_k"], "kind": ROUTER_OF_GATE[v["gate"]], "balance": v["balance"],
        "aux_weight": v["aux_weight"], "z_loss": 0.0, "capacity": 0.0, "noisy": False, "groups": 1, "top_groups": 1,
        "route_scale": 1.0, "bias_rate": 1e-3, "norm_topk_prob": None,
        "rows": [f"{ctx.path}.{attr}.{b}" for b, (_block, rows) in enumerate(blocks) if rows],
    }, name="router", module=True, dtype="routing", var="routing")
    dispatched = ctx.add("dispatch", [x, router], name="dispatch", var="x_R") if any(r for _b, r in blocks) else None
    outs = []
    for b, (block, rows) in enumerate(blocks):
        with ctx.step(attr, b) as step:
            if rows:  # its routed rows only
                piece = ctx.add("expert_rows", [dispatched, router], {"expert": b, "experts": n}, name="rows",
                                var="rows")
                y = step.call(block.name, [piece])
            else:  # the whole sequence, of which its routed tokens' outputs are kept
                y = step.call(block.name, [x])
        outs.append(y if rows else ctx.add("routed_rows", [y, router], {"branch": b, "branches": n}, var="y_rows"))
    joined = ctx.add("concat_experts", [*outs, router], {"bodies": "the branches (each must return its input's width)"},
                     name="concat", var="y_R")
    return ctx.add("combine_branches", [joined, router, x], {"names": names, "gate": v["gate"], "top_k": v["top_k"]},
                   name="combine", var="y")
