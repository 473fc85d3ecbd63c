"""Graph views without Graphviz: DOT and Mermaid text, and a plain-text tree."""

from __future__ import annotations

import networkx as nx

from archc.compiler.ir import Graph
from archc.compiler.ops import fmt_shape


def _label(graph: Graph, node_id: str) -> str:
    node = graph.node(node_id)
    shape = fmt_shape(node.shape) if node.shape is not None else "?"
    return f"{node.path}: {node.op} {shape}"


def to_dot(graph: Graph) -> str:
    lines = [f"digraph {_quote(graph.name)} {{", "  rankdir=TB;", "  node [shape=box, fontname=monospace];"]
    by_scope: dict[str, list[str]] = {}
    for node in graph.nodes():
        by_scope.setdefault(node.scope, []).append(node.id)
    for i, (scope, members) in enumerate(by_scope.items()):
        indent = "  "
        if scope:
            lines.append(f"  subgraph cluster_{i} {{")
            lines.append(f"    label={_quote(scope + ' (' + graph.scopes[scope].cls + ')')};")
            indent = "    "
        for nid in members:
            lines.append(f"{indent}{nid} [label={_quote(_label(graph, nid))}];")
        if scope:
            lines.append("  }")
    for src, dst in sorted(graph.g.edges(), key=lambda e: (graph.node(e[1]).order, graph.node(e[0]).order)):
        lines.append(f"  {src} -> {dst};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart TD"]
    for node in graph.nodes():
        text = _label(graph, node.id).replace('"', "'")
        lines.append(f'  {node.id}["{text}"]')
    for src, dst in sorted(graph.g.edges(), key=lambda e: (graph.node(e[1]).order, graph.node(e[0]).order)):
        lines.append(f"  {src} --> {dst}")
    return "\n".join(lines) + "\n"


def to_text(graph: Graph) -> str:
    """A text tree of the dataflow (networkx's network text), in program order."""
    label = {node.id: f"%{node.id} {_label(graph, node.id)}" for node in graph.nodes()}
    tree = nx.DiGraph()
    tree.add_nodes_from(label[node.id] for node in graph.nodes())
    edges = sorted({(src, dst) for src, dst in graph.g.edges()},
                   key=lambda e: (graph.node(e[0]).order, graph.node(e[1]).order))
    tree.add_edges_from((label[src], label[dst]) for src, dst in edges)
    return "\n".join(nx.generate_network_text(tree, ascii_only=True)) + "\n"


FORMATS = {"dot": to_dot, "mermaid": to_mermaid, "text": to_text}
