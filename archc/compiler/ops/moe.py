"""Mixtures of experts: the `experts(...)` built-in and its IR ops (router, dispatch, per-expert rows,
grouped linears, combine).

    x += experts(h, n=64, top_k=6, hidden=256, shared=2, router="deepseek_v3") as moe

An `experts(...)` call lowers to

    routing = router(x)                      # [B*T, k], which experts, what weights
    x_R     = dispatch(x, routing)           # [B*T*k, D] rows sorted by expert
    rows_e  = expert_rows(x_R, routing)      # per expert e: its rows   } unfused: one body
    y_e     = <body>(rows_e)                 #                          } per expert
    y_R     = concat_experts(y_0.., routing) # [B*T*k, D]
    y       = combine(y_R, routing, x)       # [B, T, D], gate-weighted sum per token

and `fuse_experts` rewrites the per-expert bodies into one body whose linears
are `grouped_linear`s over stacked weights [E, in, out]. Row counts are
symbolic: `B*T*k` rows in all, `B*T*k/E` per expert (their expected number under
balanced routing, which is what FLOP counts use).

Each expert is a step of a list `experts` inside the MoE scope, like a
`repeat`: its body is the block named by `body=` (called with `hidden=` when
the block has that parameter) or SwiGLU by default. With routers in the
model, its `loss` output also carries their auxiliary losses.
"""

from __future__ import annotations

from archc.compiler.ops.base import A, BlockName, OpDef, Width, composite, fmt_shape, numel, register
from archc.dsl.diagnostics import SpecError
from archc.runtime.moe import BALANCE_RULES, ROUTER_KINDS  # one list, owned by the runtime


def rows_dim(tokens: str, k: int, experts: int | None = None) -> str:
    """The symbolic row count of k assignments per token (per expert when `experts` is given)."""
    dim = f"{tokens}*{k}" if k != 1 else tokens
    return f"{dim}/{experts}" if experts else dim


def tokens_dim(shape) -> str:
    return "*".join(str(d) for d in shape[:-1])


@register
class Router(OpDef):
    name = "router"
    attrs = {
        "experts": A(int, positive=True), "top_k": A(int, positive=True), "kind": A(str), "balance": A(str),
        "aux_weight": A(float), "z_loss": A(float), "capacity": A(float), "noisy": A(bool),
        "groups": A(int, positive=True), "top_groups": A(int, positive=True), "route_scale": A(float),
        "bias_rate": A(float), "norm_topk_prob": A((bool, type(None)), None),
    }
    pure = False
    user = False

    def infer(self, node, ins, graph):
        (x,) = ins
        if len(x) != 3:
            raise SpecError(f"experts expect a [B, T, D] stream, got {fmt_shape(x)}", node.span)
        return (tokens_dim(x), node.attrs["top_k"])

    def weights(self, node, ins):
        e, d = node.attrs["experts"], ins[0][-1]
        w = {"gate.weight": (e, d)}
        if node.attrs["noisy"]:
            w["noise.weight"] = (e, d)
        return w

    def flops(self, node, ins, out, sizes):
        return 2 * numel(ins[0], sizes) * node.attrs["experts"] * (2 if node.attrs["noisy"] else 1)

    def init(self, node, ins):
        a = node.attrs
        options = [f"kind={a['kind']!r}", f"balance={a['balance']!r}", f"aux_weight={a['aux_weight']!r}"]
        for key, default, arg in (("z_loss", 0.0, "z_loss_weight"), ("capacity", 0.0, "capacity_factor"),
                                  ("noisy", False, "noisy"), ("groups", 1, "groups"), ("top_groups", 1, "top_groups"),
                                  ("route_scale", 1.0, "route_scale"), ("bias_rate", 1e-3, "bias_rate"),
                                  ("norm_topk_prob", None, "norm_topk_prob")):
            if a[key] != default:
                options.append(f"{arg}={a[key]!r}")
        return f"AF.Router({ins[0][-1]!r}, {a['experts']!r}, top_k={a['top_k']!r}, {', '.join(options)})"

    def forward(self, node, args, out, mod, ins):
        (x,) = args
        return [f"{out} = {mod}({x}.reshape(-1, {x}.shape[-1]), seq_len={x}.shape[1])"]

    def active_share(self, node):
        return node.scope + ".experts", node.attrs["top_k"] / node.attrs["experts"]

    def after_lowering(self, graph) -> None:
        """With routers in the model, its `loss` output also carries their auxiliary losses."""
        if not any(n.op == self.name for n in graph.nodes()):
            return
        for i, (name, node_id) in enumerate(graph.outputs):
            if name == "loss" and graph.node(node_id).op != "add_aux_losses":  # once for every kind of router
                total = graph.add("add_aux_losses", [node_id], {}, scope="", name="aux",
                                  span=graph.node(node_id).span, var="loss")
                graph.outputs[i] = (name, total.id)


@register
class Dispatch(OpDef):
    name = "dispatch"
    inputs = ("x", "routing")
    user = False

    def infer(self, node, ins, graph):
        x, routing = ins
        return (rows_dim(tokens_dim(x), routing[-1]), x[-1])

    def forward(self, node, args, out, mod, ins):
        x, routing = args
        return [f"{out} = AF.dispatch_rows({x}.reshape(-1, {x}.shape[-1]), {routing})"]


@register
class ExpertRows(OpDef):
    """The rows of one expert (only in the unfused form; codegen folds these into one `split`)."""

    name = "expert_rows"
    inputs = ("rows", "routing")
    attrs = {"expert": A(int), "experts": A(int)}
    user = False

    def infer(self, node, ins, graph):
        rows, routing = ins
        return (f"{rows[0]}/{node.attrs['experts']}", rows[-1])

    def forward(self, node, args, out, mod, ins):
        rows, routing = args
        return [f"{out} = {rows}.split({routing}.split_sizes())[{node.attrs['expert']!r}]"]


@register
class ConcatExperts(OpDef):
    """Expert outputs back in sorted-row order; inputs: y_0 .. y_{E-1}, then the routing."""

    name = "concat_experts"
    inputs = ()
    user = False

    def infer(self, node, ins, graph):
        *outs, routing = ins
        widths = {o[-1] for o in outs}
        if len(widths) != 1:
            bodies = node.attrs.get("bodies", "expert bodies")  # a gated layer's: its branches
            raise SpecError(f"{bodies} return different widths {sorted(widths, key=str)}", node.span)
        total = str(outs[0][0]).rsplit("/", 1)[0]
        return (total, outs[0][-1])

    def forward(self, node, args, out, mod, ins):
        *outs, _routing = args
        return [f"{out} = torch.cat([{', '.join(outs)}])"]


@register
class GroupedLinear(OpDef):
    """Each expert's linear at once: rows of expert e times weight[e] ([E, in, out])."""

    name = "grouped_linear"
    inputs = ("x", "routing")
    attrs = {"out": A((int, Width)), "experts": A(int)}
    pure = False
    user = False

    def infer(self, node, ins, graph):
        return (*ins[0][:-1], node.attrs["out"])

    def weights(self, node, ins):
        return {"weight": (node.attrs["experts"], ins[0][-1], node.attrs["out"])}

    def flops(self, node, ins, out, sizes):
        return 2 * numel(ins[0], sizes) * node.attrs["out"]

    def init(self, node, ins):
        return f"AF.GroupedLinear({node.attrs['experts']!r}, {ins[0][-1]!r}, {node.attrs['out']!r})"

    def forward(self, node, args, out, mod, ins):
        x, routing = args
        return [f"{out} = {mod}({x}, {routing}.counts)"]


@register
class Combine(OpDef):
    """Gate-weighted sum of each token's rows, back in the shape of the experts' input."""

    name = "combine"
    inputs = ("rows", "routing", "like")
    user = False

    def infer(self, node, ins, graph):
        rows, _routing, like = ins
        if rows[-1] != like[-1]:
            raise SpecError(f"the experts return width {rows[-1]} but their input has width {like[-1]}; "
                            "an expert body must map [N, D] to [N, D]", node.span)
        return like

    def forward(self, node, args, out, mod, ins):
        rows, routing, like = args
        return [f"{out} = AF.combine_rows({rows}, {routing}).view_as({like})"]


@register
class AddAuxLosses(OpDef):
    """The training loss plus every router's auxiliary loss from this forward pass."""

    name = "add_aux_losses"
    inputs = ("loss",)
    pure = False
    user = False

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]} + AF.moe_aux_loss(self)"]


# ---- the built-in -------------------------------------------------------------

DEFAULT_BALANCE = {"softmax": "aux_loss", "switch": "aux_loss", "deepseek_v3": "aux_free"}
DEFAULT_AUX_WEIGHT = {"aux_loss": 0.01, "seq_aux": 1e-4, "aux_free": 0.0, "none": 0.0}


def _check(ctx, v) -> None:
    """Cross-argument checks, located at the argument at fault; fills in the balance rule and its weight."""
    if v["top_k"] > v["n"]:
        raise SpecError(f"top_k={v['top_k']} is larger than the number of experts n={v['n']}", ctx.where("top_k"))
    if ctx.given("capacity") and v["capacity"] <= 0:
        raise SpecError(f"the capacity factor must be positive, got {v['capacity']} "
                        "(leave it out to drop no tokens)", ctx.where("capacity"))
    if v["n"] % v["groups"] or v["top_groups"] > v["groups"]:
        raise SpecError(f"groups={v['groups']} must divide n={v['n']} and top_groups "
                        f"({v['top_groups']}) must not exceed it", ctx.where("groups"))
    if v["top_k"] > v["top_groups"] * (v["n"] // v["groups"]):
        raise SpecError(f"top_k={v['top_k']} experts do not fit in top_groups={v['top_groups']} "
                        f"groups of {v['n'] // v['groups']}", ctx.where("top_groups"))
    if v["balance"] is None:
        v["balance"] = DEFAULT_BALANCE[v["router"]]
    if v["balance"] == "aux_free" and v["router"] != "deepseek_v3":
        raise SpecError("aux-free balancing (a selection bias) needs router=\"deepseek_v3\"", ctx.where("balance"))
    if v["aux_weight"] is None:
        v["aux_weight"] = DEFAULT_AUX_WEIGHT[v["balance"]]
    if v["shared_gate"] and not v["shared"]:
        raise SpecError("shared_gate=true gates the shared experts, but there are none", ctx.where("shared_gate"),
                        hint="add shared=1")


@composite("experts", cls="MoE", default_name="moe", attrs={
    "n": A(int, positive=True),
    "top_k": A(int, positive=True),
    "hidden": A(int, positive=True),
    "shared": A(int, 0),
    "shared_hidden": A((int, type(None)), None),
    "router": A(str, "softmax", choices=ROUTER_KINDS),
    "balance": A((str, type(None)), None, choices=(*BALANCE_RULES, None)),
    "aux_weight": A((float, type(None)), None),
    "z_loss": A(float, 0.0),
    "capacity": A(float, 0.0),
    "noisy": A(bool, False),
    "groups": A(int, 1, positive=True),
    "top_groups": A(int, 1, positive=True),
    "route_scale": A(float, 1.0, positive=True),
    "bias_rate": A(float, 1e-3),
    "body": A(BlockName, None),
    "norm_topk_prob": A((bool, type(None)), None),
    "shared_gate": A(bool, False),
})
def lower_experts(ctx, args, v) -> str:
    (x,) = args
    _check(ctx, v)
    body, hidden = "swiglu", {"hidden": v["hidden"]}
    if v["body"] is not None:
        block = ctx.block(v["body"], "body", "`body=` names a block that maps expert rows [N, D] to [N, D]")
        body = block.name
        hidden = hidden if any(p.name == "hidden" for p in block.params) else {}
    router = ctx.add("router", [x], {
        "experts": v["n"], "top_k": v["top_k"], "kind": v["router"], "balance": v["balance"],
        "aux_weight": v["aux_weight"], "z_loss": v["z_loss"], "capacity": v["capacity"],
        "noisy": v["noisy"], "groups": v["groups"], "top_groups": v["top_groups"],
        "route_scale": v["route_scale"], "bias_rate": v["bias_rate"], "norm_topk_prob": v["norm_topk_prob"],
    }, name="router", module=True, dtype="routing", var="routing")
    rows = ctx.add("dispatch", [x, router], name="dispatch", var="x_R")
    experts = ctx.claim("experts")
    outs = []
    for e in range(v["n"]):
        with ctx.step(experts, e) as step:
            piece = ctx.add("expert_rows", [rows, router], {"expert": e, "experts": v["n"]}, name="rows", var="rows")
            outs.append(step.call(body, [piece], hidden))
    joined = ctx.add("concat_experts", [*outs, router], name="concat", var="y_R")
    y = ctx.add("combine", [joined, router, x], name="combine", var="y")
    if v["shared"]:
        shared = ctx.call("swiglu", [x], {"hidden": v["shared_hidden"] or v["shared"] * v["hidden"]}, label="shared")
        if v["shared_gate"]:  # Qwen2-MoE: the shared expert scaled by sigmoid(x · w_g), one gate per token
            gate = ctx.act("sigmoid", ctx.linear(x, 1, "shared_gate"), var="shared_gate")
            shared = ctx.add("mul", [gate, shared], name="mul", var="shared")
        y = ctx.add("add", [y, shared], name="add", var="y")
    return y
