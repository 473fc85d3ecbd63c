"""The IR's invariants, checked after lowering and after every pass."""

from __future__ import annotations

import networkx as nx

from archc.compiler import ops
from archc.compiler.ir import Graph, IRError
from archc.compiler.scalars import Unfolded


def verify(graph: Graph, *, folded: bool = False, shaped: bool = False) -> None:
    """Check the IR's invariants; raise IRError naming the node and the fix."""
    if not nx.is_directed_acyclic_graph(graph.g):
        cycle = nx.find_cycle(graph.g)
        raise IRError(f"the IR has a cycle through {cycle}; passes must keep it acyclic")
    for node in graph.nodes():
        if node.op not in ops.REGISTRY:
            raise IRError(f"node %{node.id} has unknown op {node.op!r}")
        for arg in graph.args(node.id):
            if graph.node(arg).order >= node.order:
                raise IRError(
                    f"node %{node.id} ({node.op}) uses %{arg}, which comes later in program order; "
                    "a pass that inserts nodes must give them an order before their users"
                )
        indices = sorted(i for _s, _d, i in graph.g.in_edges(node.id, data="index"))
        if indices != list(range(len(indices))):
            raise IRError(f"node %{node.id} ({node.op}) has argument indices {indices}; expected 0..n-1")
        if node.scope and node.scope not in graph.scopes:
            raise IRError(f"node %{node.id} is in unknown scope {node.scope!r}")
        if folded and any(isinstance(v, Unfolded) for v in node.attrs.values()):
            raise IRError(f"node %{node.id} ({node.op}) still has unfolded attributes after fold_params")
        if shaped and node.shape is None:
            raise IRError(f"node %{node.id} ({node.op}) has no shape after infer_shapes")
    _check_modules_are_runs(graph)
    for name, node_id in graph.outputs:
        if node_id not in graph.g:
            raise IRError(f"output {name!r} refers to removed node %{node_id}")


def _check_modules_are_runs(graph: Graph) -> None:
    """Every module's nodes (its own and its children's) are one run in program order: code generation
    calls a module once, where its first node stands."""
    closed: set[str] = set()
    open_: list[str] = []  # the enclosing scopes of the previous node, outermost first
    for node in graph.nodes():
        parts = node.scope.split(".") if node.scope else []
        chain = [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in graph.scopes]
        for path in chain:
            if path in closed:
                raise IRError(f"node %{node.id} ({node.op}) in {node.scope!r} comes after nodes outside module "
                              f"{path!r} that follow its earlier nodes; a pass that inserts nodes must keep each "
                              "module's nodes together in program order")
        closed.update(p for p in open_ if p not in chain)
        open_ = chain
