"""Static analyses of the IR: parameters, FLOPs and activation memory, per module.

Computed from shapes alone, no forward pass. FLOPs are forward matmul FLOPs
(2·m·n·k per product, attention's two products counted in full even when
causal) — the quantity `torch.utils.flop_counter.FlopCounterMode` reports
and the "6N per token" training rule is built on (train ≈ 3× forward).
Activation memory is the bytes of every intermediate output at fp32: an
upper bound on what autograd keeps for the backward pass.
"""

from __future__ import annotations

import attrs

from archc.compiler import ops
from archc.compiler.ir import Graph, Node
from archc.compiler.ops import patching
from archc.dsl.diagnostics import SpecError


@attrs.frozen
class Row:
    name: str  # module path
    cls: str
    shape: tuple
    params: int
    flops: int
    activation_bytes: int
    depth: int


def sizes_for(graph: Graph, batch: int, seq: int, dims: dict[str, int] | None = None) -> dict[str, int]:
    sizes = {"B": batch, "T": seq, **(dims or {})}
    mean = patching.assumed_mean(graph)  # byte patching: P, the patch count, from the rule's mean length
    if mean is not None and patching.PATCHES not in sizes:
        sizes[patching.PATCHES] = patching.patch_count(seq, mean)
    for node in graph.nodes():
        for d in node.shape or ():
            for symbol in ops.dim_symbols(d):
                if symbol not in sizes:
                    raise SpecError(f"the symbolic dim `{symbol}` has no size; give one with --dim {symbol}=N")
    return sizes


def node_params(graph: Graph, node: Node) -> dict[str, tuple]:
    """Canonical state-dict name -> shape of the weights this node owns (none where it calls a module another
    call made: `as label shared`)."""
    if graph.borrowed(node):
        return {}
    op = ops.REGISTRY[node.op]
    ins = [graph.node(a).shape for a in graph.args(node.id)]
    prefix = (node.scope if op.weights_at_scope else node.path)
    return {_join(prefix, k): shape for k, shape in op.weights(node, ins).items()}


def _join(prefix: str, key: str) -> str:
    """A weight's state-dict name: its key under its module's path (an empty key: the path itself, as a
    `learned` tensor's)."""
    return f"{prefix}.{key}" if prefix and key else prefix or key


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def node_cost(graph: Graph, node: Node, sizes: dict[str, int]) -> tuple[int, int, int]:
    op = ops.REGISTRY[node.op]
    ins = [graph.node(a).shape for a in graph.args(node.id)]
    params = sum(_numel(s) for s in node_params(graph, node).values())
    flops = op.flops(node, ins, node.shape, sizes)
    act = 0 if node.op == "input" else ops.numel(node.shape, sizes) * 4
    return params, flops, act


def rows(graph: Graph, batch: int = 1, seq: int = 128, depth: int = 1,
         dims: dict[str, int] | None = None) -> list[Row]:
    """One row per module down to `depth` (0 = the model), in program order."""
    sizes = sizes_for(graph, batch, seq, dims)
    totals: dict[str, list[int]] = {}
    last: dict[str, Node] = {}
    first: dict[str, float] = {}
    for node in graph.nodes():
        cost = node_cost(graph, node, sizes)
        parts = node.scope.split(".") if node.scope else []
        keys = [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if node.scope:
            keys.append(node.path)  # leaf row for the node itself
        else:
            keys.append(node.name)
        for key in dict.fromkeys(keys):
            acc = totals.setdefault(key, [0, 0, 0])
            for i in range(3):
                acc[i] += cost[i]
            last[key] = node
            first.setdefault(key, node.order)
    out = []
    for key in sorted(totals, key=lambda k: (first[k], k.count("."), k)):
        if key in graph.scopes:
            scope_depth = 0 if key == "" else _scope_depth(graph, key)
            cls = graph.scopes[key].cls
        else:
            scope_depth = _scope_depth(graph, last[key].scope) + 1 if last[key].scope else 1
            cls = last[key].op
            if last[key].path != key:
                continue
        if scope_depth > depth:
            continue
        if key not in graph.scopes and not any(totals[key][:2]) and last[key].op not in ("embedding",):
            continue  # a weightless, flop-less op inside a module is noise in the table
        p, f, a = totals[key]
        out.append(Row(key or graph.name, cls, last[key].shape or (), p, f, a, scope_depth))
    return out


def _scope_depth(graph: Graph, path: str) -> int:
    depth, parts = 0, path.split(".")
    for i in range(1, len(parts) + 1):
        if ".".join(parts[:i]) in graph.scopes:
            depth += 1
    return depth


def total_params(graph: Graph) -> int:
    return sum(sum(_numel(s) for s in node_params(graph, n).values()) for n in graph.nodes())


@attrs.frozen
class RoutedExperts:
    """One `experts(...)` layer's routed experts (shared experts are ordinary weights)."""

    path: str  # scope of the expert bodies
    experts: int
    top_k: int
    width: int  # the token width routed in and out
    params: int  # weights of all routed expert bodies together


def _within(scope: str, prefix: str) -> bool:
    return scope == prefix or scope.startswith(prefix + ".")


def routed_experts(graph: Graph) -> list[RoutedExperts]:
    """The routed expert layers, in program order (the ops that route say where their experts are)."""
    out = []
    for router in graph.nodes():
        share = ops.REGISTRY[router.op].active_share(router)
        if share is None:
            continue
        path = share[0]
        params = sum(_numel(s) for n in graph.nodes() if _within(n.scope, path)
                     for s in node_params(graph, n).values())
        width = graph.node(graph.args(router.id)[0]).shape[-1]
        out.append(RoutedExperts(path, router.attrs["experts"], router.attrs["top_k"], width, params))
    return out


def node_memory_params(graph: Graph, node: Node) -> int:
    """This node's weights that are looked up, not multiplied (the weights its op gives the `memory` role)."""
    memory = [key for key, role in ops.REGISTRY[node.op].roles(node).items() if role == "memory"]
    return sum(_numel(s) for name, s in node_params(graph, node).items() if any(name.endswith("." + key)
                                                                                for key in memory))


def memory_params(graph: Graph) -> int:
    """Weights that are looked up, not multiplied (Engram's tables), all nodes together."""
    return sum(node_memory_params(graph, node) for node in graph.nodes())


def memory_per_token(graph: Graph) -> int:
    """Memory entries one token reads, all memory layers together (the rows its n-grams hash to)."""
    return sum(ops.REGISTRY[n.op].memory_per_token(n) for n in graph.nodes() if not graph.borrowed(n))


def active_params(graph: Graph) -> int:
    """Parameters one token uses: routed experts and branches count k/E of their weights (shared experts in
    full), memory tables only the entries the token reads."""
    return active_without_memory(graph) - memory_params(graph) + memory_per_token(graph)


def active_without_memory(graph: Graph) -> int:
    return scope_params(graph, "", active=True)


def scope_params(graph: Graph, scope: str, active: bool = False) -> int:
    """Parameters under `scope` ("" for the whole model); with `active`, those one token uses."""
    share = {}
    if active:
        for n in graph.nodes():
            share.update(ops.REGISTRY[n.op].active_shares(n))
    total = 0.0
    for node in graph.nodes():
        if scope and not _within(node.scope, scope):
            continue
        count = sum(_numel(s) for s in node_params(graph, node).values())
        factor = next((f for prefix, f in share.items() if _within(node.scope, prefix)), 1.0)
        total += count * factor
    return round(total)


def summary_lines(graph: Graph) -> list[str]:
    """What ops say about themselves in the summary (a gated layer: its branches, mode and active parameters)."""
    count = lambda scope, active=False: scope_params(graph, scope, active)  # noqa: E731
    lines, last = [], None
    for node in graph.nodes():
        said = ops.REGISTRY[node.op].summary_line(node, count)
        if said:
            label, text = said
            lines.append(f"{label if label != last else '':<20}{text}")
            last = label
    return lines


def forward_flops(graph: Graph, batch: int, seq: int, dims: dict[str, int] | None = None) -> int:
    sizes = sizes_for(graph, batch, seq, dims)
    return sum(node_cost(graph, n, sizes)[1] for n in graph.nodes())


def human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def table(graph: Graph, batch: int = 1, seq: int = 128, depth: int = 1,
          dims: dict[str, int] | None = None) -> str:
    """A plain-text, byte-stable summary table with totals."""
    data = rows(graph, batch, seq, depth, dims)
    header = ("module", "type", "output shape", "params", "fwd FLOPs", "activations")
    body = []
    for r in data[1:]:
        indent = "  " * (r.depth - 1)
        body.append((indent + r.name, r.cls, ops.fmt_shape(r.shape), f"{r.params:,}", human(r.flops),
                     human(r.activation_bytes) + "B"))
    model = data[0]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda cols: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))  # noqa: E731
    lines = [f"{graph.name} at batch={batch}, seq={seq}", fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(b).rstrip() for b in body]
    lines.append(fmt(["-" * w for w in widths]))
    train = 3 * model.flops
    lines.append(f"total params        {model.params:,} ({human(model.params)})")
    memory = memory_params(graph)
    if memory:
        lines.append(f"memory params       {memory:,} ({human(memory)}) in lookup tables; compute params "
                     f"{model.params - memory:,} ({human(model.params - memory)})")
    active = active_params(graph)
    if active != model.params:
        routed = active_without_memory(graph) != scope_params(graph, "")
        why = [*(["routed experts and branches count top_k/n"] if routed else []),
               *([f"memory counts the {memory_per_token(graph):,} table entries a token reads"] if memory else [])]
        lines.append(f"active params       {active:,} ({human(active)}) per token: {'; '.join(why)}")
    per_token = human(model.flops / max(1, batch * seq))
    lines.append(f"forward FLOPs       {human(model.flops)} per step, {per_token} per token")
    lines.append(f"train FLOPs (3x)    {human(train)} per step")
    lines.append(f"activations (fp32)  {human(model.activation_bytes)}B")
    lines.append(f"weights (fp32)      {human(model.params * 4)}B")
    lines += summary_lines(graph)
    lines += mixer_lines(graph, batch, seq, dims)
    return "\n".join(lines) + "\n"


# ---- linear-attention mixers: recurrent state and cost growth -----------------------------------


def _mixer_op(node: Node):
    op = ops.REGISTRY[node.op]
    return op if getattr(op, "mixer", None) else None


def recurrent_state(graph: Graph) -> dict[str, int]:
    """Mixer core path -> floats of recurrent state it keeps per sequence (kernel state + conv cache).

    Constant in the sequence length, unlike attention's KV cache."""
    return {node.path: _mixer_op(node).state_numel(node, [graph.node(a).shape for a in graph.args(node.id)])
            for node in graph.nodes() if _mixer_op(node)}


def kv_cache_per_token(graph: Graph) -> float:
    """Floats a decoder caches per token of context, all layers together (each op says what its cache
    keeps: attention's keys and values, MLA's full per-head keys and values, NSA's three branches).
    Recurrent mixers keep `recurrent_state` instead."""
    return sum(ops.REGISTRY[n.op].kv_per_token(n) for n in graph.nodes())


def flops_growth(graph: Graph, batch: int, seq: int, dims: dict[str, int] | None = None,
                 factors: tuple[int, ...] = (1, 2, 4)) -> list[int]:
    """Forward FLOPs at seq × each factor: mixers (chunked form) grow linearly, attention quadratically."""
    return [forward_flops(graph, batch, seq * f, dims) for f in factors]


def mixer_lines(graph: Graph, batch: int, seq: int, dims: dict[str, int] | None = None) -> list[str]:
    """Summary footer for specs with linear-attention mixers (nothing otherwise)."""
    mixers = [n for n in graph.nodes() if _mixer_op(n)]
    if not mixers:
        return []
    kinds: dict[tuple[str, str], int] = {}
    for node in mixers:
        op = _mixer_op(node)
        key = (op.mixer, op.growth)
        kinds[key] = kinds.get(key, 0) + 1
    attention = [n for n in graph.nodes() if ops.REGISTRY[n.op].kernel_groups == ("attention",)]
    text = "; ".join(f"{', '.join(f'{c} {k}' for (k, g2), c in kinds.items() if g2 == g)} ({g})"
                     for g in dict.fromkeys(g for _k, g in kinds))
    if attention:
        text += f"; {len(attention)} attention (quadratic in T)"
    lines = [f"mixers              {text}"]
    state = sum(recurrent_state(graph).values())
    text = f"{human(state)} floats per sequence ({human(4 * state)}B fp32), constant in T"
    kv = kv_cache_per_token(graph)
    if kv:
        text += f"; KV cache {human(kv)} floats per token"
    lines.append(f"recurrent state     {text}")
    growth = flops_growth(graph, batch, seq, dims)
    steps = [f"T={seq}: {human(growth[0])}"]
    steps += [f"{seq * f}: {human(g)} (x{g / prev:.2f})" for f, g, prev in zip((2, 4), growth[1:], growth)]
    lines.append("FLOPs vs seq        " + ", ".join(steps))
    return lines


# ---- bytes moved: what an unfused (eager PyTorch) run of each op reads and writes ------------------

# Ops whose output is a view of an input: nothing moves.
VIEW_OPS = frozenset({"input", "split_part", "expert_rows"})
# Rotate-half RoPE inside attention, run eagerly, reads and writes q and k about ten times
# (x·cos, −x₂, cat, ·sin, and the sum: archc.runtime.rope.apply_rope).
ROPE_PASSES = 10


def _value_bytes(node: Node, sizes: dict[str, int], itemsize: int) -> float:
    if not node.shape and node.dtype == "float":
        return itemsize  # a scalar (a loss)
    return ops.numel(node.shape, sizes) * (8 if node.dtype != "float" else itemsize)  # ids, routing: 8 bytes


def chunked_floats(graph: Graph, node: Node, sizes: dict[str, int]) -> float:
    """Floats the chunked PyTorch form of Gated DeltaNet materialises and keeps for the backward pass
    (the inputs it saves included): per token and head, 7 rows of C-wide intra-chunk matrices, about 12 K-
    and 12 V-sized tensors (convolutions, normalisations, fp32 chunk copies, the WY factors) and the K x V
    state entering each chunk, twice (tests/compiler/test_plan.py counts them with saved_tensors_hooks). 0 for
    other ops, and for mixers whose chunked form is not counted yet (KDA, linear attention, SSD)."""
    if node.op != "gated_deltanet_core":
        return 0.0
    a = node.attrs
    K, V, C = a["head_dim"], a["value_dim"], a["chunk"]
    tokens = ops.numel(graph.node(graph.args(node.id)[0]).shape[:-1], sizes)
    return tokens * a["heads"] * (7 * C + 12 * K + 12 * V + 2 * K * V / C)


def node_bytes(graph: Graph, node: Node, sizes: dict[str, int], itemsize: int, chunked: bool = False) -> float:
    """Bytes one forward run of `node` moves to and from memory: its inputs, its weights and its output,
    floats at `itemsize` bytes (token ids and routing tables 8).

    Op by op, as eager PyTorch runs them (no fusion), so a sequence of elementwise ops pays for every
    intermediate. An embedding reads only the rows it gathers. With `chunked`, Gated DeltaNet runs its
    chunked PyTorch form, which writes and reads back `chunked_floats` (fp32); otherwise (its Triton
    kernels) and for other mixers the count is a lower bound: inputs and output only. A memory table
    (Engram) counts the rows the tokens read, not the table.
    """
    if node.op in VIEW_OPS:
        return 0.0
    out = _value_bytes(node, sizes, itemsize)
    if node.op == "embedding":
        return _value_bytes(graph.node(graph.args(node.id)[0]), sizes, itemsize) + 2 * out
    ins = [graph.node(a) for a in graph.args(node.id)]
    total = out + sum(_value_bytes(i, sizes, itemsize) for i in ins)
    total += (sum(_numel(s) for s in node_params(graph, node).values()) - node_memory_params(graph, node)) * itemsize
    read = ops.REGISTRY[node.op].memory_per_token(node)  # memory tables: only the rows the tokens read
    total += ops.numel(node.shape[:-1], sizes) * read * itemsize if read else 0
    if node.op == "attention_core" and node.attrs["rope"]:
        total += ROPE_PASSES * sum(_value_bytes(i, sizes, itemsize) for i in ins[:2])
    if chunked:
        total += 2 * 4 * chunked_floats(graph, node, sizes)
    return total


def activation_bytes(graph: Graph, node: Node, sizes: dict[str, int], itemsize: int,
                     chunked: bool = False) -> float:
    """Bytes of the node's output kept for the backward pass (views and inputs keep none), with a chunked
    mixer's intermediates."""
    if node.op in VIEW_OPS:
        return 0.0
    return _value_bytes(node, sizes, itemsize) + (4 * chunked_floats(graph, node, sizes) if chunked else 0.0)


def layer_scopes(graph: Graph) -> list[str]:
    """The scopes of repeat steps (`layers.3`): the units a plan shards into pipeline stages and
    recomputes (activation checkpointing), in program order."""
    steps = [p for p in graph.scopes if p and p.rsplit(".", 1)[-1].isdigit()]
    return [p for p in steps if not any(p.startswith(q + ".") for q in steps)]  # not expert bodies inside them


def param_roles(graph: Graph) -> dict[str, str]:
    """The role of every weight in the model's state dict, read from the IR.

    `embedding` (token/position tables), `memory` (tables read by hashed lookups,
    updated row by row), `head` (a linear whose output is a model output or feeds
    the loss directly), `matrix` (other 2-D weights of linears: the hidden matrices
    Muon is meant for), `norm` (norm scales) and `bias`. Optimizers split parameter
    groups by role instead of guessing from names.
    """
    outputs = {nid for _name, nid in graph.outputs}
    loss_inputs = {a for n in graph.nodes() if ops.REGISTRY[n.op].is_loss for a in graph.args(n.id)}
    roles: dict[str, str] = {}
    for node in graph.nodes():
        declared = ops.REGISTRY[node.op].roles(node)
        for name, shape in node_params(graph, node).items():
            own = [role for key, role in declared.items()
                   if (key and (name == key or name.endswith("." + key))) or (not key and name == node.path)]
            if own:
                role = own[0]
            elif name.endswith("bias"):
                role = "bias"
            elif ops.REGISTRY[node.op].is_linear_map:
                role = "head" if node.id in outputs or node.id in loss_inputs else "matrix"
            elif len(shape) == 1:
                role = "norm"
            else:
                role = "matrix"
            roles[name] = role
    return roles
