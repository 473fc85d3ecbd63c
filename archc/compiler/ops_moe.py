"""IR ops of mixtures of experts: router, dispatch, per-expert rows, grouped linears, combine.

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
"""

from __future__ import annotations

from archc.compiler.ops import A, OpDef, Width, fmt_shape, numel, register
from archc.dsl.diagnostics import SpecError

from archc.runtime.moe import BALANCE_RULES, ROUTER_KINDS  # noqa: F401  (one list, owned by the runtime)


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
        "bias_rate": A(float),
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
                                  ("route_scale", 1.0, "route_scale"), ("bias_rate", 1e-3, "bias_rate")):
            if a[key] != default:
                options.append(f"{arg}={a[key]!r}")
        return f"AF.Router({ins[0][-1]!r}, {a['experts']!r}, top_k={a['top_k']!r}, {', '.join(options)})"

    def forward(self, node, args, out, mod, ins):
        (x,) = args
        return [f"{out} = {mod}({x}.reshape(-1, {x}.shape[-1]), seq_len={x}.shape[1])"]


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
            raise SpecError(f"expert bodies return different widths {sorted(widths, key=str)}", node.span)
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
