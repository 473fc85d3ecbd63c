"""Generate a readable, self-contained PyTorch module from the optimised IR.

One `nn.Module` class per distinct block structure, named after the block;
module attributes named after the spec; provenance comments pointing at spec
lines. Classes are deduplicated by their generated code without those
comments, so eight identical layers share one class, and so do two calls of a
built-in from different lines: the class docstring then lists every line the
class stands for (and the per-line comments, which would differ, are left out).
Forward arguments follow the block's declaration order. Nothing from a spec
reaches the output except identifiers the grammar has validated and literals
written with `repr`.
"""

from __future__ import annotations

import ast
import keyword
import re
from collections import defaultdict

import attrs

from archc import __version__
from archc.compiler import ops
from archc.compiler.ir import Graph, Node, Scope
from archc.compiler.pytext import docstring_line, inert
from archc.dsl.diagnostics import SpecError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MODULE_NAMES = {"torch", "nn", "F", "AF", "annotations"}
# Marks a provenance comment (the spec line a module or value came from) inside a class body while
# classes are deduplicated; `_render` keeps or drops them and removes the mark.
_PROVENANCE = "\x00"
_MARKED = re.compile(_PROVENANCE + "[^\n]*")


def safe_ident(name: str) -> str:
    """Refuse anything that is not a plain identifier (defence in depth: the grammar already does)."""
    if not _IDENT.match(name) or keyword.iskeyword(name):
        raise ValueError(f"refusing to emit {name!r} as an identifier")
    return name


@attrs.frozen
class GeneratedCode:
    source: str
    class_name: str  # the model's class


class _Namespace:
    """Readable local names: a spec variable keeps its name while its old value is dead."""

    def __init__(self, reserved=()) -> None:
        self.holder: dict[str, str | None] = {name: None for name in reserved}
        self.last_use: dict[str, int] = {}

    def name(self, hint: str, value: str, now: int, last_use: int) -> str:
        # Dunder names mean something to Python (`__class__` inside a method).
        if hint.startswith("__"):
            hint = hint.strip("_") or "v"
        base = safe_ident(hint + "_" if keyword.iskeyword(hint) else hint)
        candidate, i = base, 0
        while candidate in self.holder and not self._free(candidate, now):
            i += 1
            candidate = f"{base}_{i}"
        self.holder[candidate] = value
        self.last_use[candidate] = last_use
        return candidate

    def _free(self, name: str, now: int) -> bool:
        holder = self.holder[name]
        return holder is not None and self.last_use[name] <= now


def _parent(graph: Graph, path: str) -> str:
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        candidate = ".".join(parts[:i])
        if candidate in graph.scopes:
            return candidate
    return ""


class _Codegen:
    def __init__(self, graph: Graph) -> None:
        self.g = graph
        self.children: dict[str, list[str]] = defaultdict(list)
        for path in graph.scopes:
            if path:
                self.children[_parent(graph, path)].append(path)
        self.subtree: dict[str, list[Node]] = defaultdict(list)
        for node in graph.nodes():
            path = node.scope
            while True:
                self.subtree[path].append(node)
                if not path:
                    break
                path = _parent(graph, path)
        self.class_of: dict[str, str] = {}  # scope path -> class name
        self.key_class: dict[tuple, str] = {}  # (kind, block, code without provenance) -> class name
        self.instances: dict[str, list[tuple[Scope, str]]] = {}  # class name -> (scope, marked body) per use
        self.used_names: set[str] = set(_MODULE_NAMES)
        self.order: list[str] = []  # class names in definition order
        self.shared_by: dict[str, list[str]] = defaultdict(list)  # scope path -> the later calls of its module
        for path, scope in graph.scopes.items():
            if scope.shares:
                self.shared_by[scope.shares].append(path)
        self._io: dict[str, tuple[list[str], list[str]]] = {}

    # ---- scope structure -----------------------------------------------------

    def io(self, path: str) -> tuple[list[str], list[str]]:
        """The values a scope reads from outside (its arguments: declared ones in declaration order, then
        the rest in order of first use) and the values it gives back."""
        if path in self._io:
            return self._io[path]
        nodes = self.subtree[path]
        inside = {n.id for n in nodes}
        if not path:
            return list(self.g.scopes[""].inputs), [nid for _n, nid in self.g.outputs]
        inputs: list[str] = []
        outputs: list[str] = []
        for node in nodes:
            for arg in self.g.args(node.id):
                if arg not in inside and arg not in inputs:
                    inputs.append(arg)
        declared = {v: i for i, v in reversed(list(enumerate(self.g.scopes[path].inputs)))}
        inputs.sort(key=lambda v: declared.get(v, len(declared)))  # stable: undeclared keep first-use order
        graph_outs = {nid for _n, nid in self.g.outputs}
        scope = self.g.scopes[path]
        if scope.kind == "block":  # what the block returns, in the order it says (used or not)
            outputs = list(dict.fromkeys(v for v in scope.outputs if v in self.g))
        for node in nodes:
            used_outside = node.id in graph_outs or any(u not in inside for u in self.g.users(node.id))
            if used_outside and node.id not in outputs:
                outputs.append(node.id)
        self._io[path] = inputs, outputs
        return inputs, outputs

    def attr_of(self, parent: str, child: str) -> tuple[str, int | None]:
        child = self.g.scopes[child].shares or child  # a shared module's later calls name its first
        rel = child[len(parent) + 1:] if parent else child
        if "." in rel:
            name, index = rel.rsplit(".", 1)
            return name, int(index)
        return rel, None

    # ---- classes -------------------------------------------------------------

    def build(self, path: str) -> str:
        for child in self.children[path]:
            self.build(child)
        scope = self.g.scopes[path]
        body = self.class_body(path, scope)
        key = (scope.kind, scope.cls, _MARKED.sub("", body))
        if scope.shares:  # a later call of a shared module: no class of its own, the same code as the first
            if self.key_class.get(key) != self.class_of[scope.shares]:
                first = self.g.scopes[scope.shares]
                raise SpecError(f"this call of the shared module `{scope.shares.rsplit('.', 1)[-1]}` would run other "
                                "code than its first call (its inputs differ in a way the module's code depends on, "
                                "such as keys as long as the queries in one call and not in the other)", scope.call,
                                notes=[("the shared module is first made here", first.call)],
                                hint="share modules between calls whose inputs have the same shapes")
            self.class_of[path] = self.class_of[scope.shares]
            return self.class_of[path]
        if key in self.key_class:
            name = self.key_class[key]
        else:
            base = safe_ident(scope.cls)
            name, i = base, 1
            while name in self.used_names:
                i += 1
                name = f"{base}{i}"
            self.used_names.add(name)
            self.key_class[key] = name
            self.instances[name] = []
            self.order.append(name)
        self.instances[name].append((scope, body))
        self.class_of[path] = name
        return name

    def render(self, name: str) -> str:
        """The class text: its docstring names every spec line it stands for; the provenance comments stay
        when every use has the same ones."""
        uses = self.instances[name]
        scope, body = uses[0]
        lines = list(dict.fromkeys(inert(s.span.short) for s, _b in uses if s.span))
        where = f" from {', '.join(lines)}" if lines else ""
        kind = {"model": "model", "block": "block", "composite": "built-in", "step": "repeat step"}[scope.kind]
        same = all(b == body for _s, b in uses)
        body = body.replace(_PROVENANCE, "") if same else _MARKED.sub("", body)
        return f'(nn.Module):\n    """The {kind} `{scope.cls}`{where}."""\n' + body

    def class_body(self, path: str, scope: Scope) -> str:
        """The class after its docstring, provenance comments marked."""
        g = self.g
        direct = [n for n in self.subtree[path] if n.scope == path]
        lines: list[str] = []
        why = next(filter(None, (ops.REGISTRY[n.op].cannot_decode(n, [g.node(a).shape for a in g.args(n.id)])
                                 for n in direct)), None)
        if not why and self.shared_by.get(scope.shares or path) and any(
                ops.REGISTRY[n.op].kernel_family and not ops.REGISTRY[n.op].cannot_decode(
                    n, [g.node(a).shape for a in g.args(n.id)]) for n in self.subtree[path]):
            why = "a shared module called several times per token: one decoding cache cannot serve every call"
        if why:  # what archc.runtime.decoding reads to refuse this module by name
            lines += ["", f"    cannot_decode = {why!r}"]
        lines += ["", "    def __init__(self) -> None:", "        super().__init__()"]
        # modules in program order: this scope's own weighted nodes, child modules, lists
        entries: list[tuple[float, list[str]]] = []
        for node in direct:
            if node.shares:
                continue  # its module is the shared one's
            op = ops.REGISTRY[node.op]
            ins = [g.node(a).shape for a in g.args(node.id)]
            ctor = op.init(node, ins)
            mine = [f"        self.{safe_ident(node.name)} = {ctor}{_provenance(node)}"] if ctor else []
            mine += [f"        self.{safe_ident(attr)} = {extra}" for attr, extra in op.extra_modules(node, ins)]
            if mine:
                entries.append((node.order, mine))
        lists: dict[str, list[str]] = defaultdict(list)
        for child in self.children[path]:
            if g.scopes[child].shares:
                continue  # calls the module of an earlier call
            attr, index = self.attr_of(path, child)
            first = min(n.order for n in self.subtree[child])
            if index is None:
                entries.append((first, [f"        self.{safe_ident(attr)} = {self.class_of[child]}()"]))
            else:
                if attr not in lists:
                    entries.append((first, [attr]))  # placeholder, filled below
                lists[attr].append(child)
        for _order, entry in sorted(entries, key=lambda e: e[0]):
            if entry[0] in lists:
                classes = [self.class_of[m] for m in lists[entry[0]]]
                if len(set(classes)) == 1:
                    ctor = f"nn.ModuleList([{classes[0]}() for _ in range({len(classes)})])"
                else:
                    ctor = "nn.ModuleList([" + ", ".join(f"{c}()" for c in classes) + "])"
                lines.append(f"        self.{safe_ident(entry[0])} = {ctor}")
            else:
                lines += entry
        if scope.kind == "model":
            lines.append("        self.apply(AF.init_weights)")
        lines.append("")
        lines += self.forward(path, scope, direct)
        return "\n".join(lines)

    def forward(self, path: str, scope: Scope, direct: list[Node]) -> list[str]:
        g = self.g
        inputs, outputs = self.io(path)
        # items in program order: own nodes, and child modules at their first node
        params = set(scope.inputs) if scope.kind == "model" else set()  # the model's inputs are its arguments
        items: list[tuple[float, str, object]] = [(n.order, "node", n) for n in direct if n.id not in params]
        for child in self.children[path]:
            items.append((min(n.order for n in self.subtree[child]), "child", child))
        items.sort(key=lambda t: t[0])
        items = self._expert_loops(path, items)
        items = self._loops(path, items)
        # value -> index of the last item that reads it
        produced_by: dict[str, int] = {}
        for i, (_o, kind, obj) in enumerate(items):
            for value in self._item_outputs(kind, obj):
                produced_by[value] = i
        last_use: dict[str, int] = defaultdict(lambda: -1)
        for i, (_o, kind, obj) in enumerate(items):
            for value in self._item_inputs(kind, obj):
                last_use[value] = i
        end = len(items)
        for value in outputs:
            last_use[value] = end
        ns = _Namespace(reserved=("self", "B", "T", *_MODULE_NAMES))
        names: dict[str, str] = {}
        hints = dict(zip(scope.inputs, scope.arg_names))
        for value in inputs:
            node = g.node(value)
            names[value] = ns.name(hints.get(value) or node.var or node.name or "x", value, -1, last_use[value])
        args = ", ".join(f"{names[v]}: {'AF.Routing' if g.node(v).dtype == 'routing' else 'torch.Tensor'}"
                         for v in inputs)
        ret = "dict[str, torch.Tensor]" if scope.kind == "model" else \
            "torch.Tensor" if len(outputs) == 1 else "tuple[torch.Tensor, ...]"
        lines = [f"    def forward(self, {args}) -> {ret}:" if args else f"    def forward(self) -> {ret}:"]
        self.parts = self._part_groups(direct)
        body: list[str] = []
        for i, (_o, kind, obj) in enumerate(items):
            body += self._emit_item(i, kind, obj, path, names, ns, last_use)
        if scope.kind == "model":
            pairs = ", ".join(f"{name!r}: {names[nid]}" for name, nid in g.outputs)
            body.append(f"return {{{pairs}}}")
        else:
            body.append("return " + ", ".join(names[v] for v in outputs))
        lines += [("        " + line) if line else "" for line in body]
        return lines

    def _loops(self, path, items):
        """Collapse runs of list members, or of calls of one shared module, that thread one value through
        into a `for` loop."""
        out, i = [], 0
        while i < len(items):
            order, kind, obj = items[i]
            if kind == "child":
                attr, index = self.attr_of(path, obj)
                owner = self.g.scopes[obj].shares or obj
                if index is not None or self.shared_by.get(owner):
                    run = [obj]
                    j = i + 1
                    while j < len(items) and items[j][1] == "child" and self._same_run(path, obj, items[j][2]):
                        run.append(items[j][2])
                        j += 1
                    if self._chain(run):
                        out.append((order, "loop", (attr, run)))
                        i = j
                        continue
            out.append(items[i])
            i += 1
        return out

    def _same_run(self, path: str, first: str, other: str) -> bool:
        """`other` continues a run begun by `first`: a member of the same list, or a call of the same shared
        module."""
        scopes = self.g.scopes
        if self.attr_of(path, first)[1] is not None:
            return self.attr_of(path, other)[1] is not None and self.attr_of(path, other)[0] == self.attr_of(
                path, first)[0]
        return (scopes[other].shares or other) == (scopes[first].shares or first)

    def _expert_loops(self, path, items):
        """Per-expert rows -> body -> concat becomes one comprehension over the expert list."""
        g = self.g
        for _o, kind, obj in list(items):
            if kind != "node" or obj.op != "concat_experts":
                continue
            *outs, routing = g.args(obj.id)
            members, pieces = [], []
            for out in outs:
                member = next((c for c in self.children[path] if out in self.io(c)[1]), None)
                ins = self.io(member)[0] if member else []
                if member is None or len(ins) != 1 or g.node(ins[0]).op != "expert_rows":
                    break
                members.append(member)
                pieces.append(ins[0])
            else:
                (rows, _routing) = g.args(pieces[0])
                absorbed = set(members) | set(pieces) | {obj.id}
                items = [it for it in items if (it[2].id if it[1] == "node" else it[2]) not in absorbed]
                items.append((obj.order, "experts", (obj, members, rows, routing)))
                items.sort(key=lambda t: t[0])
        return items

    def _chain(self, run: list[str]) -> dict[int, int] | None:
        """For modules called one after another, which of each one's inputs carry the previous one's outputs
        (input position -> output position), when the run threads its values through: every output feeds the
        next module and nothing else, and every other input is the same value at every step (the `c` of
        `h = block(h, c)`). None when the run is no such chain."""
        if len(run) < 2:
            return None
        ios = [self.io(member) for member in run]
        (first_ins, first_outs), (second_ins, _) = ios[0], ios[1]
        if any(len(ins) != len(first_ins) or len(outs) != len(first_outs) for ins, outs in ios) or not first_outs:
            return None
        thread = {p: first_outs.index(v) for p, v in enumerate(second_ins) if v in first_outs}
        if sorted(thread.values()) != list(range(len(first_outs))):
            return None
        graph_outs = {nid for _n, nid in self.g.outputs}
        for j in range(1, len(run)):
            ins, prev_outs = ios[j][0], ios[j - 1][1]
            for p, v in enumerate(ins):
                if v != (prev_outs[thread[p]] if p in thread else first_ins[p]):
                    return None
            inside = {n.id for n in self.subtree[run[j]]}
            if any(not set(self.g.users(v)) <= inside or v in graph_outs for v in prev_outs):
                return None
        return thread

    def _slice(self, path: str, attr: str, run: list[str]) -> str:
        """"" when a loop runs over the whole list `attr`, else the slice of it that it runs over (the steps
        after a first one that differs: `self.blocks[1:]`)."""
        first, last = self.attr_of(path, run[0])[1], self.attr_of(path, run[-1])[1]
        count = sum(1 for child in self.children[path] if self.attr_of(path, child)[0] == attr)
        if first == 0 and last == count - 1:
            return ""
        return f"[{first or ''}:{'' if last == count - 1 else last + 1}]"

    def _item_outputs(self, kind, obj) -> list[str]:
        if kind == "node":
            return [obj.id]
        if kind == "experts":
            return [obj[0].id]
        if kind == "child":
            return self.io(obj)[1]
        return self.io(obj[1][-1])[1]

    def _item_inputs(self, kind, obj) -> list[str]:
        if kind == "node":
            return self.g.args(obj.id)
        if kind == "experts":
            return [obj[2], obj[3]]
        if kind == "child":
            return self.io(obj)[0]
        return self.io(obj[1][0])[0]

    def _emit_item(self, i, kind, obj, path, names, ns, last_use) -> list[str]:
        g = self.g
        if kind == "loop":
            attr, run = obj
            thread = self._chain(run)
            ins, outs = self.io(run[0])[0], self.io(run[-1])[1]
            carried: dict[int, str] = {}  # output position -> the variable the loop carries it in
            head = []
            for p, q in sorted(thread.items(), key=lambda t: t[1]):
                src, dst = ins[p], outs[q]
                var = names[src]
                if last_use[src] > i or ins.count(src) > 1:  # the input is still needed: thread a new name
                    var = ns.name(g.node(dst).var or "x", dst, i, last_use[dst])
                    head.append(f"{var} = {names[src]}")
                else:
                    ns.holder[var] = dst
                    ns.last_use[var] = last_use[dst]
                carried[q] = var
            args = ", ".join(carried[thread[p]] if p in thread else names[v] for p, v in enumerate(ins))
            targets = ", ".join(carried[q] for q in range(len(outs)))
            for q, dst in enumerate(outs):
                names[dst] = carried[q]
            if self.attr_of(path, run[0])[1] is None:  # one shared module, called again and again
                return [*head, f"for _ in range({len(run)}):", f"    {targets} = self.{attr}({args})"]
            elem = "layer" if attr == "layers" else "block"
            steps = f"self.{attr}{self._slice(path, attr, run)}"
            return [*head, f"for {elem} in {steps}:", f"    {targets} = {elem}({args})"]
        if kind == "experts":
            node, members, rows, routing = obj
            attr, _index = self.attr_of(path, members[0])
            out = ns.name(node.var or "y", node.id, i, last_use[node.id])
            names[node.id] = out
            pieces = f"{names[rows]}.split({names[routing]}.split_sizes())"
            elem = "branch" if attr == "branches" else "expert"  # a gated layer's, or a MoE's
            return [f"{out} = torch.cat([", f"    {elem}(rows) for {elem}, rows in zip(self.{attr}, {pieces})", "])"]
        if kind == "child":
            ins, outs = self.io(obj)
            attr, index = self.attr_of(path, obj)
            ref = f"self.{attr}" if index is None else f"self.{attr}[{index}]"
            targets = [ns.name(g.node(o).var or attr, o, i, last_use[o]) for o in outs]
            for o, t in zip(outs, targets):
                names[o] = t
            return [f"{', '.join(targets)} = {ref}({', '.join(names[a] for a in ins)})"]
        node: Node = obj
        if node.op == "split_part" and node.id in names:
            return []  # bound by its fused_linear
        if node.id in names:
            return []  # one of several values, bound where the first of them is
        op = ops.REGISTRY[node.op]
        group = self.parts.get(node.id)
        if group and len(group) > 1:
            return self._emit_parts(i, group, names, ns, last_use)
        arg_names = [names[a] for a in g.args(node.id)]
        if node.op == "fused_linear":
            return self._emit_fused(i, node, arg_names, names, ns, last_use)
        out = ns.name(node.var or node.name or node.op, node.id, i, last_use[node.id])
        names[node.id] = out
        ins = [g.node(a).shape for a in g.args(node.id)]
        if node.op == "linear" and node.attrs.get("tie"):
            node = attrs.evolve(node, attrs={**node.attrs, "tie_ref": f"self.{g.node(node.attrs['tie']).name}.weight"})
        lines = op.forward(node, arg_names, out, f"self.{node.name}", ins)
        if op.line_comment:
            lines[-1] += _provenance(node, always=False)
        return lines

    def _part_groups(self, direct: list[Node]) -> dict[str, list[Node]]:
        """Node id -> the values one call of `split` / `chunk` gave (one node each), for binding them in one
        line: `shift, scale, gate = m.chunk(3, dim=-1)`."""
        groups: dict[tuple, list[Node]] = defaultdict(list)
        for node in direct:
            if getattr(ops.REGISTRY[node.op], "several", False):
                rest = sorted((k, repr(v)) for k, v in node.attrs.items() if k != "index")
                groups[(node.op, tuple(self.g.args(node.id)), tuple(rest))].append(node)
        return {n.id: members for members in groups.values() for n in members}

    def _emit_parts(self, i, group: list[Node], names, ns, last_use) -> list[str]:
        g = self.g
        first = group[0]
        op = ops.REGISTRY[first.op]
        by_index = {n.attrs["index"]: n for n in group}
        targets = []
        for index in range(op.parts(first.attrs, None)):
            node = by_index.get(index)
            if node is None:
                targets.append("_")  # a value nobody reads
                continue
            names[node.id] = ns.name(node.var or node.name, node.id, i, last_use[node.id])
            targets.append(names[node.id])
        args = [names[a] for a in g.args(first.id)]
        ins = [g.node(a).shape for a in g.args(first.id)]
        return [f"{', '.join(targets)} = {op.whole(first, args, ins)}" + _provenance(first, always=False)]

    def _emit_fused(self, i, node, arg_names, names, ns, last_use) -> list[str]:
        g = self.g
        parts = [u for u in g.users(node.id) if g.node(u).op == "split_part"]
        sizes = tuple(size for _name, size in node.attrs["parts"])
        targets = []
        for part in sorted(parts, key=lambda u: g.node(u).attrs["index"]):
            pnode = g.node(part)
            targets.append(ns.name(pnode.var or pnode.name, part, i, last_use[part]))
            names[part] = targets[-1]
        if len(parts) != len(sizes):  # some pieces were unused: keep the whole output
            out = ns.name(node.name, node.id, i, last_use[node.id])
            names[node.id] = out
            return [f"{out} = self.{node.name}({arg_names[0]})"]
        return [f"{', '.join(targets)} = self.{node.name}({arg_names[0]}).split({sizes!r}, dim=-1)"
                f"{_provenance(node)}"]


def _provenance(node: Node, always: bool = True) -> str:
    """`  # file:line` (or `  # fused: ...`), marked as provenance for deduplication."""
    if node.provenance:
        parts = [p.rsplit(" (", 1)[0].rsplit(".", 1)[-1] for p in node.provenance]
        what = f"{len(parts)} experts' {parts[0]}" if len(set(parts)) == 1 else ", ".join(parts)
        return _PROVENANCE + "  # fused: " + inert(what + (f" ({node.span.short})" if node.span else ""))
    if node.span is not None and always:
        return _PROVENANCE + "  # " + inert(node.span.short)
    return ""


def generate(graph: Graph, summary_lines: list[str] | None = None) -> GeneratedCode:
    """The module source for `graph`; same graph, same text, byte for byte."""
    cg = _Codegen(graph)
    model_cls = cg.build("")
    source_name = graph.meta.get("source", "<spec>").replace("\\", "/").rsplit("/", 1)[-1]
    header = [
        f'"""{model_cls} — generated by archc {__version__} from {docstring_line(source_name)} '
        f'(sha256 {docstring_line(graph.meta.get("sha256", "-"))}). Do not edit.',
        "",
    ]
    header += [docstring_line(line) for line in summary_lines or []]
    header += ['"""', "", "from __future__ import annotations", "", "import torch",
               "import torch.nn.functional as F", "from torch import nn", "",
               "from archc.runtime import functional as AF", ""]
    chunks = ["\n".join(header)]
    for name in cg.order:
        chunks.append(f"\nclass {name}" + cg.render(name) + "\n")
    source = "\n".join(chunks)
    lines = source.split("\n")  # not splitlines(): escaped text holds no line break of any kind
    if lines[-1] == "":
        lines.pop()
    source = "\n".join(line.rstrip() for line in lines) + "\n"
    _check_parses(source)
    return GeneratedCode(source, model_cls)


def _check_parses(source: str) -> None:
    """Defence in depth: what we wrote is one module of our classes and imports, and nothing else.

    Escaping above keeps spec text inert; this catches a future emission site that forgets to.
    """
    tree = ast.parse(source)
    for stmt in tree.body[1:]:  # the first statement is the header docstring
        if not isinstance(stmt, (ast.ImportFrom, ast.Import, ast.ClassDef)):
            raise AssertionError(f"generated module has a top-level {type(stmt).__name__} at line {stmt.lineno}")
    if not (isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)):
        raise AssertionError("generated module does not start with its docstring")
