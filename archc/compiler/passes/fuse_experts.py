"""fuse_experts: per-expert bodies of one shape become one body of grouped GEMMs.

Unfused, an MoE layer runs E copies of its expert body on each expert's rows
(`expert_rows` -> body -> `concat_experts`). When every body has the same ops
with the same attributes, each of their linears becomes one `grouped_linear`
over stacked weights [E, in, out] that runs all experts' rows in one call, and
the weightless ops in between run once over all rows. The new nodes live in
a scope `<moe>.experts` (class GroupedExperts) and keep the provenance of the
E linears each replaces. Bodies that differ, or carry weights other than
bias-free linears (norms, biases), stay unfused; the reason is recorded in
`graph.meta["fuse_experts"]`.
"""

from __future__ import annotations

from archc.compiler import ops
from archc.compiler.ir import Graph, Node, Scope


def fuse_experts(graph: Graph, options=None) -> Graph:
    """Invariant after: every fusable `concat_experts` is gone, replaced by grouped linears."""
    graph = graph.copy()
    notes = graph.meta.setdefault("fuse_experts", {})
    for concat in [n for n in graph.nodes() if n.op == "concat_experts"]:
        reason = _fuse(graph, concat)
        notes[concat.scope] = reason or "fused"
    return graph


def _members(graph: Graph, concat: Node) -> list[tuple[str, str, list[Node]]] | None:
    """(step scope, its expert_rows node, its nodes in order) per expert, or None if the shape is unexpected."""
    *outs, _routing = graph.args(concat.id)
    members = []
    for out in outs:
        step = graph.node(out).scope
        prefix = f"{concat.scope}."
        if not step.startswith(prefix):
            return None
        step = prefix + step[len(prefix):].split(".")[0] + "." + step[len(prefix):].split(".")[1]
        nodes = [n for n in graph.nodes() if n.scope == step or n.scope.startswith(step + ".")]
        pieces = {a for n in nodes for a in graph.args(n.id) if graph.node(a).op == "expert_rows"}
        if len(pieces) != 1:
            return None
        members.append((step, pieces.pop(), nodes))
    return members


def _signature(graph: Graph, nodes: list[Node], rows: str) -> list[tuple]:
    index = {n.id: i for i, n in enumerate(nodes)}
    sig = []
    for n in nodes:
        args = tuple("rows" if a == rows else index.get(a, "outside") for a in graph.args(n.id))
        sig.append((n.op, n.name, repr(sorted(n.attrs.items())), args))
    return sig


def _fuse(graph: Graph, concat: Node) -> str | None:
    if graph.scopes[concat.scope].builtin != "experts":
        return "the branches of a gated layer stay modules of their own (`branches.b`)"
    members = _members(graph, concat)
    if not members:
        return "the expert bodies are not separate scopes over expert_rows"
    first_step, first_rows, first_nodes = members[0]
    signature = _signature(graph, first_nodes, first_rows)
    for step, rows, nodes in members[1:]:
        if _signature(graph, nodes, rows) != signature:
            return f"expert bodies differ ({first_step} vs {step})"
    for n in first_nodes:
        if n.op == "linear" and (n.attrs["bias"] or n.attrs.get("tie")):
            return f"{n.path} has a bias; grouped linears carry none"
        if n.op != "linear" and ops.REGISTRY[n.op].weights(n, [graph.node(a).shape for a in graph.args(n.id)]):
            return f"{n.path} ({n.op}) has per-expert weights other than a linear's"
    if any("outside" in sig[3] for sig in signature):
        return "an expert body reads a value from outside its rows"

    x_rows, routing = graph.args(first_rows)
    experts = len(members)
    scope = f"{concat.scope}.experts"
    graph.scopes[scope] = Scope(scope, "GroupedExperts", "composite", concat.span, inputs=[x_rows, routing],
                                arg_names=["x_R", "routing"])
    mapping = {first_rows: x_rows}
    for i, n in enumerate(first_nodes):
        args = [mapping[a] for a in graph.args(n.id)]
        if n.op == "linear":
            new = graph.add("grouped_linear", [args[0], routing], {"out": n.attrs["out"], "experts": experts},
                            scope=scope, name=n.name, span=n.span, order=n.order, var=n.var or n.name)
            new.provenance = tuple(f"{nodes[i].path} ({nodes[i].span.short})" if nodes[i].span else nodes[i].path
                                   for _s, _r, nodes in members)
        else:
            new = graph.add(n.op, args, dict(n.attrs), scope=scope, name=n.name, span=n.span, order=n.order,
                            var=n.var)
        new.shape = tuple(ops.REGISTRY[new.op].infer(new, [graph.node(a).shape for a in graph.args(new.id)], graph))
        mapping[n.id] = new.id
    result = mapping[graph.args(concat.id)[0]]
    graph.node(result).var = "y_R"
    graph.scopes[scope].outputs = [result]
    graph.replace_uses(concat.id, result)
    for step, rows, nodes in members:
        for n in nodes:
            graph.remove(n.id)
        graph.remove(rows)
        for path in [p for p in graph.scopes if p == step or p.startswith(step + ".")]:
            del graph.scopes[path]
    graph.remove(concat.id)
    return None
