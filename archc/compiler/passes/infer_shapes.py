"""infer_shapes: give every node its symbolic output shape, checking each op's rule."""

from __future__ import annotations

from archc.compiler import ops
from archc.compiler.ir import Graph
from archc.dsl.diagnostics import SpecError


def infer_shapes(graph: Graph, options=None) -> Graph:
    """Run each op's shape rule in program order; check blocks' declared input shapes.

    Invariant after: every node has a shape; relative widths (`ops.Width`) are numbers.
    """
    graph = graph.copy()
    for node in graph.nodes():
        ins = [graph.node(a).shape for a in graph.args(node.id)]
        node.shape = tuple(ops.REGISTRY[node.op].infer(node, ins, graph))
    for scope in graph.scopes.values():
        for node_id, expected, span in scope.expected:
            actual = graph.node(node_id).shape
            if not _matches(actual, expected):
                raise SpecError(
                    f"block `{scope.cls}` expects a tensor of shape {ops.fmt_shape(expected)} but got "
                    f"{ops.fmt_shape(actual)}",
                    span,
                    notes=[("the argument comes from here", graph.node(node_id).span)],
                )
    return graph


def _matches(actual: tuple, expected: tuple) -> bool:
    if len(actual) != len(expected):
        return False
    bound: dict[str, object] = {}
    for a, e in zip(actual, expected):
        if isinstance(e, str):  # a symbol binds once and must agree after
            if bound.setdefault(e, a) != a:
                return False
        elif a != e:
            return False
    return True
