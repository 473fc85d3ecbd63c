"""The graph IR: a networkx MultiDiGraph of typed op nodes with symbolic shapes.

Each node has one output value. Edges run from producer to consumer and carry
`index`, the argument position. Nodes keep the source span they came from and,
after fusion, the provenance of every node they replace. Module structure
(blocks, composite ops, repeat steps) lives in `Graph.scopes`, keyed by the
dotted path that becomes the state-dict prefix; a node's `scope` names the
innermost one. Program order (`Node.order`) is a valid topological order and
keeps everything deterministic.
"""

from __future__ import annotations

import re
from typing import Any

import attrs
import networkx as nx

from archc.dsl.ast import Span

Dim = int | str  # a size, or a symbol such as "B" or "T"
Shape = tuple[Dim, ...]


@attrs.define(eq=False)
class Node:
    id: str
    op: str
    attrs: dict[str, Any]
    scope: str  # dotted path of the enclosing module ("" for the model)
    name: str  # attribute name for ops with weights; variable hint otherwise
    span: Span | None
    order: float
    shape: Shape | None = None
    dtype: str = "float"  # float | long
    provenance: tuple[str, ...] = ()  # "scope.name (file:line)" of nodes fused into this one
    var: str = ""  # the spec variable this value was assigned to, a hint for generated names
    shares: str = ""  # `as label shared`: the node whose module (and weights) this call uses again

    @property
    def path(self) -> str:
        """The state-dict prefix of this node's weights."""
        return f"{self.scope}.{self.name}" if self.scope else self.name


@attrs.define(eq=False)
class Scope:
    """A module in the generated code: the model, a block, a composite op, or a repeat step."""

    path: str
    cls: str  # class name before deduplication (DecoderLayer, Attention, ...)
    kind: str  # model | block | composite | step
    span: Span | None
    inputs: list[str] = attrs.Factory(list)  # node ids passed in, in argument order
    arg_names: list[str] = attrs.Factory(list)  # parameter names for those inputs
    outputs: list[str] = attrs.Factory(list)  # node ids returned
    output_names: list[str] = attrs.Factory(list)
    expected: list[tuple[str, Shape, Span]] = attrs.Factory(list)  # declared input shapes to check
    builtin: str = ""  # for a composite: the built-in it lowers (`attention`, `experts`, ...)
    # `as label shared`: the path of the scope whose module this call uses again (this scope's path is then
    # `<that path>#<k>`, and its nodes own no weights)
    shares: str = ""
    call: Span | None = None  # where the call that made this module is written


class Graph:
    """The IR of one compiled spec. A multigraph: `x + x` reads one value twice."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.g = nx.MultiDiGraph()
        self.scopes: dict[str, Scope] = {}
        self.outputs: list[tuple[str, str]] = []  # (output name, node id)
        self.params: dict[str, Any] = {}  # spec parameters after overrides
        self.meta: dict[str, Any] = {}  # source name, sha, families ...
        self._next = 0

    # construction
    def add(self, op: str, args: list[str], attrs_: dict[str, Any], *, scope: str, name: str,
            span: Span | None, dtype: str = "float", order: float | None = None, var: str = "") -> Node:
        node_id = f"n{self._next}"
        self._next += 1
        node = Node(node_id, op, dict(attrs_), scope, name, span,
                    float(self._next) if order is None else order, dtype=dtype, var=var)
        self.g.add_node(node_id, node=node)
        for i, arg in enumerate(args):
            self.g.add_edge(arg, node_id, index=i)
        return node

    def remove(self, node_id: str) -> None:
        self.g.remove_node(node_id)

    def replace_uses(self, old: str, new: str) -> None:
        """Point every consumer of `old` (and graph outputs) at `new`."""
        for _src, user, index in list(self.g.out_edges(old, data="index")):
            self.g.add_edge(new, user, index=index)
        self.g.remove_edges_from(list(self.g.out_edges(old, keys=True)))
        self.outputs = [(n, new if v == old else v) for n, v in self.outputs]
        # Only the node's own scope and its ancestors can list it as an output.
        path = self.node(old).scope
        while True:
            scope = self.scopes.get(path)
            if scope is not None and old in scope.outputs:
                scope.outputs = [new if v == old else v for v in scope.outputs]
            if not path:
                break
            path = path.rsplit(".", 1)[0] if "." in path else ""

    # queries
    def node(self, node_id: str) -> Node:
        return self.g.nodes[node_id]["node"]

    def __contains__(self, node_id: str) -> bool:
        return node_id in self.g

    def args(self, node_id: str) -> list[str]:
        preds = sorted(self.g.in_edges(node_id, data="index"), key=lambda e: e[2])
        return [src for src, _dst, _i in preds]

    def users(self, node_id: str) -> list[str]:
        return sorted(self.g.successors(node_id), key=lambda n: self.node(n).order)

    @staticmethod
    def module_path(path: str) -> str:
        """The path of the module a scope runs: a later call of a shared module (`layer#2.attn`) runs the first
        call's (`layer.attn`)."""
        return re.sub(r"#\d+(?=\.|$)", "", path)

    def borrowed(self, node: Node) -> bool:
        """Whether `node` runs a module another call made (`as label shared`): its weights are not its own."""
        if node.shares:
            return True
        path = node.scope
        while path:
            scope = self.scopes.get(path)
            if scope is not None and scope.shares:
                return True
            path = path.rsplit(".", 1)[0] if "." in path else ""
        return False

    def nodes(self) -> list[Node]:
        """All nodes in program order (a topological order)."""
        return sorted((d["node"] for _, d in self.g.nodes(data=True)), key=lambda n: n.order)

    def copy(self) -> Graph:
        new = Graph(self.name)
        new.g = nx.MultiDiGraph()
        for node in self.nodes():
            new.g.add_node(node.id, node=attrs.evolve(node, attrs=dict(node.attrs)))
        new.g.add_edges_from(self.g.edges(data=True))
        new.scopes = {
            p: attrs.evolve(s, inputs=list(s.inputs), arg_names=list(s.arg_names), outputs=list(s.outputs),
                            output_names=list(s.output_names), expected=list(s.expected))
            for p, s in self.scopes.items()
        }
        new.outputs = list(self.outputs)
        new.params = dict(self.params)
        new.meta = dict(self.meta)
        new._next = self._next
        return new

    def to_text(self) -> str:
        """One node per line: `%n3 = linear(%n2) {out=64} : [B, T, 64]  @scope.name  # file:line:col`."""
        lines = [f"graph {self.name}"]
        for node in self.nodes():
            args = ", ".join(f"%{a}" for a in self.args(node.id))
            attr_text = ", ".join(f"{k}={_fmt(v)}" for k, v in node.attrs.items())
            shape = "?" if node.shape is None else "[" + ", ".join(str(d) for d in node.shape) + "]"
            if node.dtype != "float":
                shape = f"{node.dtype}{shape}"
            line = f"  %{node.id} = {node.op}({args})"
            if attr_text:
                line += f" {{{attr_text}}}"
            line += f" : {shape}  @{node.path}"
            if node.span is not None:
                line += f"  # {node.span.short}:{node.span.column}"
            if node.provenance:
                line += f"  fused[{', '.join(node.provenance)}]"
            if node.shares:
                line += f"  shares %{node.shares}"
            lines.append(line)
        outs = ", ".join(f"{name}=%{nid}" for name, nid in self.outputs)
        lines.append(f"  return {outs}")
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class IRError(Exception):
    """The IR broke an invariant: a bug in a pass, not in the user's spec."""
