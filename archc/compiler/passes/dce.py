"""dce: remove nodes whose values reach no output."""

from __future__ import annotations

import networkx as nx

from archc.compiler.ir import Graph


def dce(graph: Graph, options=None) -> Graph:
    """Keep the ancestors of the outputs (and the model inputs); drop the rest and empty scopes.

    A module called several times (`as label shared`) is kept whole in every call while one of them is
    live: its first call makes the module the others use, and every call must stay the same code.

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
    live = _keep_shared_modules_whole(graph, live)
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


def _keep_shared_modules_whole(graph: Graph, live: set[str]) -> set[str]:
    groups: dict[str, list[str]] = {}  # first call (node id or scope path) -> the node ids of every call
    for node in graph.nodes():
        if node.shares:
            groups.setdefault(node.shares, [node.shares]).append(node.id)
    calls = {path: [path] for path, scope in graph.scopes.items() if scope.shares == ""}
    for path, scope in graph.scopes.items():
        if scope.shares:
            calls[scope.shares].append(path)
    for owner, paths in calls.items():
        if len(paths) > 1:
            groups[owner] = [n.id for n in graph.nodes() if any(n.scope == p or n.scope.startswith(p + ".")
                                                                 for p in paths)]
    changed = True
    while changed:
        changed = False
        for members in groups.values():
            if any(m in live for m in members) and not all(m in live for m in members):
                for m in members:
                    live |= {m} | nx.ancestors(graph.g, m)
                changed = True
    return live
