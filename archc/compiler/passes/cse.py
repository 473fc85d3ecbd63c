"""cse: merge pure nodes that compute the same thing from the same inputs."""

from __future__ import annotations

from archc.compiler import ops
from archc.compiler.ir import Graph


def cse(graph: Graph, options=None) -> Graph:
    """Two pure nodes (no weights, no randomness) with equal op, inputs, attributes and
    scope are one value; later duplicates are replaced by the first.

    Invariant after: no two pure nodes in a scope share (op, inputs, attributes).
    """
    graph = graph.copy()
    seen: dict[tuple, str] = {}
    for node in graph.nodes():
        if not ops.REGISTRY[node.op].pure:
            continue
        key = (node.op, node.scope, tuple(graph.args(node.id)), repr(sorted(node.attrs.items())))
        first = seen.setdefault(key, node.id)
        if first != node.id:
            graph.replace_uses(node.id, first)
            graph.remove(node.id)
    return graph
