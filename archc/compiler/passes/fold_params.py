"""fold_params: evaluate every attribute still written as a spec expression, and check it."""

from __future__ import annotations

from archc.compiler import ops
from archc.compiler.ir import Graph
from archc.compiler.scalars import Unfolded, evaluate
from archc.dsl.diagnostics import SpecError


def fold_params(graph: Graph, options=None) -> Graph:
    """Replace each `Unfolded` attribute by its value, checked against the op's attribute spec.

    Invariant after: every attribute is a plain value of the declared type.
    """
    graph = graph.copy()
    for node in graph.nodes():
        spec = ops.REGISTRY[node.op].attrs
        for name, value in list(node.attrs.items()):
            if not isinstance(value, Unfolded):
                continue
            folded = evaluate(value.expr, value.env)
            problem = spec[name].check(name, folded)
            if problem:
                raise SpecError(f"`{node.op}`: {problem}", value.expr.span)
            node.attrs[name] = spec[name].coerce(folded)
    return graph
