"""dce: remove nodes whose values reach no output."""

from __future__ import annotations

import networkx as nx

from archc.compiler.ir import Graph


def dce(graph: Graph, options=None) -> Graph:
    """Keep the ancestors of the outputs (and the model inputs); drop the rest and empty scopes.

    Invariant after: every node contributes to some output.
    """
    graph = graph.copy()
    live = set(graph.scopes[""].inputs)
    for _name, node_id in graph.outputs:
        live.add(node_id)
        live |= nx.ancestors(graph.g, node_id)
    for node in graph.nodes():
        tie = node.attrs.get("tie")
        if node.id in live and tie:
            live.add(tie)
    for node in graph.nodes():
        if node.id not in live:
            graph.remove(node.id)
    used = set()
    for node in graph.nodes():  # every prefix of a used scope is used
        parts = node.scope.split(".")
        used.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    for path in list(graph.scopes):
        if path and path not in used:
            del graph.scopes[path]
    return graph
