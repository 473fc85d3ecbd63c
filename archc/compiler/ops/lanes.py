"""Residual lanes: `x = lanes(x, n=4, rule="mhc")` … `x = merge_lanes(x)` (archc/runtime/lanes.py).

Between the two the stream is n lanes, [B, T, n, d]. The spec's blocks keep
their plain residual updates and the lowering reinterprets them, one residual
site at a time:

    h = rms_norm(x)      ->  u, mix = site.read(x)        (at the first op that reads the lanes)
                             h = rms_norm(u)
    x += attention(h)    ->  x = site.write(x, attention(h), mix)

Every op reading the lanes between two updates reads the site's u; block calls,
`return` and `merge_lanes` pass the lanes themselves. Each site is one `Lanes`
module; its index k in the region (counted along the stream) picks the lane its
static init reads (k mod n), as hyper-connections' layer index does.

lower.py asks `is_lanes` ("is the stream laned here?") and hands the two
rewrites to `branch_input` and `write`; everything else lives here.
"""

from __future__ import annotations

from archc.compiler.ir import Graph
from archc.compiler.ops.base import A, LowerContext, OpDef, fmt_shape, need_width, numel, register
from archc.dsl.diagnostics import SpecError

RULES = ("plain", "hc_static", "hc_dynamic", "mhc")
MERGES = ("mean", "sum")
# The region's settings, given at `lanes(...)` and carried by every site.
REGION = ("n", "rule", "iters", "init_eps", "recompute", "segment")
LANED = ("lanes", "lanes_write")  # ops whose value is the stream as lanes


def coefficient_count(n: int) -> int:
    """Logits per token and site: pre (n) + post (n) + res (n·n), as archc.kernels.lanes counts them."""
    return 2 * n + n * n


def _lanes_shape(node, shape, what: str):
    if len(shape) < 2:
        raise SpecError(f"{node.op} needs the lanes of a stream, [..., n, d], but the {what} has shape "
                        f"{fmt_shape(shape)}", node.span, hint="open the lanes with `x = lanes(x, n=4)`")
    return shape


@register
class Lanes(OpDef):
    """`lanes(x, n, rule, ...)`: the stream widened to n equal lanes; opens a region."""

    name = "lanes"
    attrs = {"n": A(int, 4, positive=True), "rule": A(str, "mhc", choices=RULES), "iters": A(int, 20, positive=True),
             "init_eps": A(float, 0.01, positive=True), "recompute": A(bool, False),
             "segment": A(int, 4, positive=True)}

    def infer(self, node, ins, graph):
        a = node.attrs
        if a["rule"] == "plain" and a["n"] != 1:
            raise SpecError(f"lanes: rule \"plain\" is the ordinary residual and takes n=1, got n={a['n']}", node.span)
        if a["rule"] == "mhc" and a["n"] < 2:
            raise SpecError("lanes: rule \"mhc\" needs n >= 2", node.span, hint='for one lane use rule="plain"')
        if a["rule"] == "mhc" and not a["init_eps"] < 1 / a["n"]:
            raise SpecError(f"lanes: init_eps must be below 1/n = {1 / a['n']:g}, got {a['init_eps']!r}", node.span)
        if graph.node(graph.args(node.id)[0]).op in LANED:
            raise SpecError("lanes: the stream is already lanes here; lanes do not nest", node.span,
                            hint="close the region first with `x = merge_lanes(x)`")
        x = ins[0]
        need_width(node, x, "input")
        return (*x[:-1], a["n"], x[-1])

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = AF.expand_lanes({args[0]}, {node.attrs['n']!r})"]


@register
class MergeLanes(OpDef):
    """`merge_lanes(x, how)`: the lanes back to one stream, their mean (or sum); closes the region."""

    name = "merge_lanes"
    attrs = {"how": A(str, "mean", choices=MERGES)}

    def infer(self, node, ins, graph):
        if graph.node(graph.args(node.id)[0]).op not in LANED:
            raise SpecError("merge_lanes needs the lanes that `lanes(...)` opened (or a residual update inside "
                            "them wrote), but its input is not that stream", node.span,
                            hint="open the region with `x = lanes(x, n=4)` and pass its stream here")
        h = _lanes_shape(node, ins[0], "input")
        return (*h[:-2], h[-1])

    def forward(self, node, args, out, mod, ins):
        how = node.attrs["how"]
        return [f"{out} = AF.merge_lanes({args[0]}" + (f", {how!r})" if how != "mean" else ")")]


@register
class LanesRead(OpDef):
    """A site's read, as two values: index 0 the branch input u [..., d], index 1 the mix it writes with."""

    name = "lanes_read"
    attrs = {**{name: Lanes.attrs[name] for name in REGION}, "site": A(int), "index": A(int)}
    pure = False
    user = False
    several = True  # codegen binds both values in one line

    def parts(self, values, call):
        return 2

    def infer(self, node, ins, graph):
        h = _lanes_shape(node, ins[0], "stream")
        n = h[-2]
        return (*h[:-2], h[-1]) if node.attrs["index"] == 0 else (*h[:-2], n + n * n)  # mix: post and res

    def weights(self, node, ins):
        if node.attrs["index"]:
            return {}
        n, d = node.attrs["n"], ins[0][-1]
        rule = node.attrs["rule"]
        if rule == "plain":
            return {}
        w = {"pre": (n,), "post": (n,), "res": (n, n)} if rule in ("hc_static", "hc_dynamic") else {}
        if rule == "hc_dynamic":
            w |= {"norm_weight": (d,), "dynamic": (d, n + 2), "scale_alpha": (), "scale_beta": ()}
        if rule == "mhc":
            w |= {"norm_weight": (n * d,), "phi": (n * d, coefficient_count(n)), "alpha": (3,),
                  "bias": (coefficient_count(n),)}
        return w

    def roles(self, node):
        # The mixing weights are small gates, not hidden matrices for Muon: optimised as the norms' scales are.
        return {key: "norm" for key in ("phi", "dynamic", "res", "scale_alpha", "scale_beta")}

    def flops(self, node, ins, out, sizes):
        """The mixing at this site (archc.runtime.lanes.Lanes.mixing_flops_per_token), counted once."""
        if node.attrs["index"]:
            return 0
        h = ins[0]
        n, d, rule = node.attrs["n"], h[-1], node.attrs["rule"]
        tokens = numel(h[:-2], sizes)
        if rule == "plain":
            return 0
        per = 2 * n * d + 2 * n * n * d + 2 * n * d
        if rule == "hc_dynamic":
            per += 2 * n * d + 2 * n * d * (n + 2)
        if rule == "mhc":
            per += 2 * n * d + 2 * n * d * coefficient_count(n) + 4 * n * n * node.attrs["iters"]
        return tokens * per

    def init(self, node, ins):
        if node.attrs["index"]:
            return None
        a = node.attrs
        n = a["n"]
        options = [f"site={a['site'] % n!r}"]
        for key, default in (("iters", 20), ("init_eps", 0.01), ("recompute", False), ("segment", 4)):
            if a[key] != default and (a["rule"] == "mhc" or key in ("recompute", "segment")):
                options.append(f"{key}={a[key]!r}")
        return f"AF.Lanes({n!r}, {a['rule']!r}, {ins[0][-1]!r}, {', '.join(options)})"

    def whole(self, node, args, ins) -> str:
        return f"self.{node.name}.read({args[0]})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {self.whole(node, args, ins)}[{node.attrs['index']!r}]"]


@register
class LanesWrite(OpDef):
    """A site's write: the branch output y into the lanes (its module is the site's read's)."""

    name = "lanes_write"
    inputs = ("h", "y", "mix")
    attrs = {**{name: Lanes.attrs[name] for name in REGION}, "sites": A(int)}
    pure = False
    user = False

    def infer(self, node, ins, graph):
        h, y, _mix = ins
        if tuple(y) != (*h[:-2], h[-1]):
            raise SpecError(f"a residual update inside lanes adds {fmt_shape(y)} to lanes {fmt_shape(h)}; the "
                            f"update must have the stream's shape {fmt_shape((*h[:-2], h[-1]))}", node.span)
        return h

    def forward(self, node, args, out, mod, ins):
        h, y, mix = args
        return [f"{out} = {mod}.write({h}, {y}, {mix})"]


# ----------------------------------------------------------------------------- the lowering's hooks


def is_lanes(graph: Graph, node_id: str) -> bool:
    """Whether this value is the stream as lanes (inside a `lanes` … `merge_lanes` region)."""
    return graph.node(node_id).op in LANED


def keeps_lanes(op: str) -> bool:
    """Whether op `op` takes the lanes themselves rather than a site's branch input."""
    return op in ("lanes", "merge_lanes")


def _region(graph: Graph, h: str) -> dict:
    node = graph.node(h)
    return {key: node.attrs[key] for key in REGION}


def _sites(graph: Graph, h: str) -> int:
    """How many residual sites the stream has passed since `lanes(...)`."""
    node = graph.node(h)
    return node.attrs["sites"] if node.op == "lanes_write" else 0


def _pending(ctx: LowerContext, h: str) -> tuple[str, str] | None:
    """The (u, mix) of this scope's read of `h` that no write has closed yet."""
    g = ctx.graph
    reads = [g.node(u) for u in g.users(h) if g.node(u).op == "lanes_read" and g.node(u).scope == ctx.path]
    if not reads or any(g.node(u).op == "lanes_write" and g.node(u).scope == ctx.path for u in g.users(h)):
        return None
    by_index = {n.attrs["index"]: n.id for n in reads}
    return by_index[0], by_index[1]


def branch_input(ctx: LowerContext, h: str) -> str:
    """What an op reading the lanes `h` reads: the branch input u of the residual site open here."""
    pending = _pending(ctx, h)
    if pending is None:
        region, site = _region(ctx.graph, h), _sites(ctx.graph, h)
        name = ctx.claim("lanes")
        pending = tuple(ctx.add("lanes_read", [h], {**region, "site": site, "index": i}, name=name, var=var)
                        for i, var in ((0, "u"), (1, "mix")))
    return pending[0]


def write(ctx: LowerContext, h: str, y: str, var: str) -> str:
    """`x += y` on the lanes `h`: the open site's write (a site is opened if nothing read the lanes)."""
    branch_input(ctx, h)
    _u, mix = _pending(ctx, h)
    name = ctx.graph.node(mix).name
    return ctx.add("lanes_write", [h, y, mix], {**_region(ctx.graph, h), "sites": _sites(ctx.graph, h) + 1},
                   name=name, var=var)


def block_dims(graph: Graph, node_id: str, dims: tuple) -> tuple:
    """The shape a block parameter declared as `dims` expects when the lanes are passed: the lane axis
    before the width."""
    if not is_lanes(graph, node_id) or not dims:
        return dims
    return (*dims[:-1], "n_lanes", dims[-1])
