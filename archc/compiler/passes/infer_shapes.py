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
    _check_shared_weights(graph)
    return graph


def _weights(graph: Graph, nodes, prefix: str) -> dict[str, tuple]:
    """Weight name relative to `prefix` -> shape, of `nodes`, as if each owned its weights."""
    out = {}
    for node in nodes:
        op = ops.REGISTRY[node.op]
        base = node.scope if op.weights_at_scope else node.path
        base = base[len(prefix):].lstrip(".") if prefix else base
        for key, shape in op.weights(node, [graph.node(a).shape for a in graph.args(node.id)]).items():
            out[".".join(p for p in (base, key) if p)] = tuple(shape)
    return out


def _check_shared_weights(graph: Graph) -> None:
    """Every call of a shared module (`as label shared`) needs weights of the shapes its first call made."""
    calls = [(graph.node(n.shares), n, [graph.node(n.shares)], [n], "", "") for n in graph.nodes() if n.shares]
    for path, scope in graph.scopes.items():
        if scope.shares:
            first = [n for n in graph.nodes() if n.scope == scope.shares or n.scope.startswith(scope.shares + ".")]
            here = [n for n in graph.nodes() if n.scope == path or n.scope.startswith(path + ".")]
            if first and here:
                calls.append((first[0], here[0], first, here, scope.shares, path))
    for first, node, first_nodes, nodes, first_prefix, prefix in calls:
        want, have = _weights(graph, first_nodes, first_prefix), _weights(graph, nodes, prefix)
        for key in sorted(set(want) | set(have)):
            if want.get(key) != have.get(key):
                raise SpecError(
                    f"this call of the shared module `{first.name if not prefix else first_prefix.rsplit('.', 1)[-1]}` "
                    f"needs its weight {key} as {_fmt(have.get(key))}, but the first call made it "
                    f"{_fmt(want.get(key))}", _call_span(graph, node, prefix),
                    notes=[("the shared module is first made here", _call_span(graph, first, first_prefix))],
                    hint="every call of a shared module takes inputs of the widths its first call did")


def _fmt(shape) -> str:
    return "absent" if shape is None else ops.fmt_shape(shape)


def _call_span(graph: Graph, node, prefix: str):
    """Where the call of a module is written: the node's own span, or the span of the call that made its scope."""
    if not prefix:
        return node.span
    return graph.scopes[prefix].call or node.span


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
