"""fuse_projections: linears that read the same input become one wider matmul.

Q/K/V of attention and gate/up of SwiGLU each turn into one `fused_linear`
followed by `split_part` nodes; the fused node keeps the provenance of the
linears it replaces, and their names for loading unfused weights.

Only linears of one scope (one module) fuse. The K and V projections of the
same `memory` in two cross-attention layers read one input too, but each
layer owns its weights: one matmul across layers would move them out of
their modules (the state dict, the per-layer classes and their loop would
no longer follow the spec) to save one read of `memory` per layer. A linear
with `init=` or `bias_init=` keeps its own module, and so its rules.

The fused node takes its place in program order just before the first
linear it replaces, so every module's nodes stay one run (the verifier's
invariant, which code generation relies on): placed anywhere after its
input instead, a layer's fused K/V of a `memory` made before the first
layer would land inside an earlier layer.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from archc.compiler.ir import Graph


def fuse_projections(graph: Graph, options=None) -> Graph:
    """Invariant after: no two untied linears in one scope read the same input with the same bias flag."""
    graph = graph.copy()
    groups: dict[tuple, list[str]] = defaultdict(list)
    shared = {n.shares for n in graph.nodes() if n.shares}
    for node in graph.nodes():
        # a linear called again with `as label shared` is one module: it stays one; one with its own
        # initialisation rules keeps them
        if node.op == "linear" and not node.attrs.get("tie") and not node.shares and node.id not in shared \
                and node.attrs.get("init") is None and node.attrs.get("bias_init") is None:
            (src,) = graph.args(node.id)
            groups[(node.scope, src, node.attrs["bias"])].append(node.id)
    taken = {(n.scope, n.name) for n in graph.nodes()}
    orders = [n.order for n in graph.nodes()]  # before fusing: each fused node goes just before its first part
    for (scope, src, bias), members in groups.items():
        if len(members) < 2:
            continue
        parts = [graph.node(m) for m in members]
        name = _fused_name([p.name for p in parts])
        base, i = name, 0
        while (scope, name) in taken:
            i += 1
            name = f"{base}_{i}"
        taken.add((scope, name))
        order = _just_before(orders, parts[0].order)
        fused = graph.add(
            "fused_linear", [src],
            {"parts": [[p.name, p.attrs["out"]] for p in parts], "bias": bias},
            scope=scope, name=name, span=parts[0].span, order=order, var=name,
        )
        fused.provenance = tuple(
            f"{p.path} ({p.span.short})" if p.span else p.path for p in parts
        )
        fused.shape = (*graph.node(src).shape[:-1], sum(p.attrs["out"] for p in parts)) \
            if graph.node(src).shape is not None else None
        start = 0
        for index, part in enumerate(parts):
            piece = graph.add(
                "split_part", [fused.id], {"index": index, "start": start, "size": part.attrs["out"]},
                scope=scope, name=part.name, span=part.span, order=part.order, var=part.var or part.name,
            )
            piece.shape = part.shape
            start += part.attrs["out"]
            graph.replace_uses(part.id, piece.id)
            graph.remove(part.id)
    return graph


def _just_before(orders: list[float], order: float) -> float:
    """An order between `order` and the one before it in `orders` (sorted)."""
    i = bisect.bisect_left(orders, order)
    return ((orders[i - 1] if i else order - 1) + order) / 2


def _fused_name(names: list[str]) -> str:
    return "".join(names) if all(len(n) == 1 for n in names) else "_".join(names)
