"""The built-in `engram(...)`: hashed n-gram memory with a context gate (archc/runtime/engram.py).

    repeat i in 0..n_layers as layers {
        if i in [1, 3] { x += engram(x, tokens, orders=[2, 3], heads=4, slots=1009, dim=64) as memory }
        x = DecoderLayer(x)
    }

One op, one module (`AF.Engram`): each position's suffix n-grams of the token ids are hashed by several
heads into embedding tables, a gate from the hidden state scales what was read, a short causal
convolution follows; the caller adds the result to its stream (docs/lanes_engram_blt.md §2). Inside
residual lanes the op reads the open site's branch input, like any other branch, and `x += engram(...)`
is that site's write.

The tables' sizes are primes shared out over all Engram layers of the model (`table_sizes`), so each
call knows its place among them: `after_lowering` numbers the calls in program order (`layer`) and
records how many there are (`layers`). `vocab` defaults to the size of the embedding that reads the
same token input. The tables are `memory` parameters: the optimizer updates only the rows a step
read (archc/training/optim.py), and `archc summary` counts them apart from the compute parameters,
with the rows one token reads as its active memory.

Token ids are hashed as they are, unless `compress=true`: then the trainer, which knows the tokenizer,
sets the demo's compression map (`compression_table`: ids whose text differs only in case, accents or
spacing share one) before the first step, and checkpoints carry it.
"""

from __future__ import annotations

from archc.compiler.ops.base import A, OpDef, fmt_shape, need_width, numel, register
from archc.dsl.diagnostics import SpecError
from archc.runtime.engram import table_sizes

# The runtime module's defaults, left out of generated constructors.
DEFAULTS = {"heads": 8, "dim": 512, "kernel": 4, "seed": 0, "pad": 0}


@register
class Engram(OpDef):
    """`engram(x, tokens, ...)`: x [..., d] (a stream, or a site's branch input inside lanes), tokens the ids of
    the same positions -> [..., d] to add to the stream."""

    name = "engram"
    inputs = ("x", "tokens")
    attrs = {
        "orders": A(list, [2, 3]), "heads": A(int, DEFAULTS["heads"], positive=True),
        "slots": A((int, list, type(None)), None), "dim": A(int, DEFAULTS["dim"], positive=True),
        "kernel": A(int, DEFAULTS["kernel"], positive=True), "seed": A(int, DEFAULTS["seed"]),
        "pad": A(int, DEFAULTS["pad"]), "vocab": A((int, type(None)), None), "compress": A(bool, False),
    }
    pure = False

    def dtype(self, attrs, dtypes, span):
        if dtypes[1] != "long":
            raise SpecError("`engram` hashes integer ids: its `tokens` must be `Tokens`, but this tensor holds "
                            + ("true/false" if dtypes[1] == "bool" else "floats"), span)
        return "float"

    def infer(self, node, ins, graph):
        x, tokens = ins
        a = node.attrs
        need_width(node, x, "stream")
        if len(x) < 2 or tuple(tokens) != tuple(x[:-1]):
            raise SpecError(f"engram: tokens {fmt_shape(tokens)} must give one id per position of the stream "
                            f"{fmt_shape(x)}, i.e. have shape {fmt_shape(x[:-1])}", node.span)
        orders = a["orders"]
        if not orders or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in orders) \
                or len(set(orders)) != len(orders):
            raise SpecError(f"engram: `orders` must be distinct n-gram lengths >= 1, such as [2, 3]; got {orders!r}",
                            node.span)
        if a["dim"] % a["heads"]:
            raise SpecError(f"engram: dim={a['dim']} must be a multiple of heads={a['heads']} (each head's table "
                            "holds dim/heads wide rows)", node.span)
        slots = a["slots"]
        if isinstance(slots, list) and (len(slots) != len(orders) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 2 for s in slots)):
            raise SpecError(f"engram: `slots` is one table size >= 2 per order ({len(orders)} here), got {slots!r}",
                            node.span)
        if isinstance(slots, int) and slots < 2:
            raise SpecError(f"engram: `slots` must be at least 2, got {slots}", node.span)
        if a["vocab"] is None:
            a["vocab"] = _vocab_of(graph, graph.args(node.id)[1], node)
        if not 0 <= a["pad"] < a["vocab"]:
            raise SpecError(f"engram: pad={a['pad']} is not a token id (vocab={a['vocab']})", node.span)
        return x

    def _slots(self, node) -> list[int]:
        a = node.attrs
        slots = a["slots"]
        if slots is None:
            return [5 * a["vocab"]] * len(a["orders"])  # the demo's default: 5 × the (compressed) vocabulary
        return list(slots) if isinstance(slots, list) else [slots] * len(a["orders"])

    def table_rows(self, node) -> int:
        a = node.attrs
        sizes = table_sizes(range(a["layers"]), self._slots(node), a["heads"])[a["layer"]]
        return sum(sum(per_order) for per_order in sizes)

    def weights(self, node, ins):
        a = node.attrs
        d, width = ins[0][-1], len(a["orders"]) * a["dim"]
        return {"table.weight": (self.table_rows(node), a["dim"] // a["heads"]),
                "value.weight": (d, width), "value.bias": (d,), "keys.0.weight": (d, width), "keys.0.bias": (d,),
                "key_norms.0.weight": (d,), "query_norms.0.weight": (d,), "conv_norms.0.weight": (d,),
                "conv.weight": (d, 1, a["kernel"])}

    def roles(self, node):
        # The tables are memory (sparse-row updates); the conv's [d, 1, k] filter is a per-channel scale.
        return {"table.weight": "memory", "conv.weight": "norm"}

    def memory_per_token(self, node) -> int:
        """Table entries one token reads: one row of dim/heads per head and order."""
        return len(node.attrs["orders"]) * node.attrs["dim"]

    def flops(self, node, ins, out, sizes):
        """Value and key projections of the rows read, the gate's dot product and the depthwise conv."""
        a = node.attrs
        d, width = ins[0][-1], len(a["orders"]) * a["dim"]
        return numel(ins[0][:-1], sizes) * (2 * 2 * width * d + 2 * d + 2 * a["kernel"] * d)

    def cannot_decode(self, node, ins):
        if node.shares:
            return "a shared engram called several times per token: one n-gram history cannot serve every call"
        return None

    def describe_node(self, node):
        return f"engram orders={node.attrs['orders']}"

    def after_lowering(self, graph) -> None:
        """Number the Engram calls in program order: the primes of their tables are shared out over all of them."""
        calls = [n for n in graph.nodes() if n.op == self.name]
        owners = [n for n in calls if not graph.borrowed(n)]
        for node in calls:  # a shared call (`as memory shared`, or inside a shared block) is its owner's module
            owner = next(o for o in owners if node.id == o.id or node.shares == o.id
                         or graph.module_path(node.path) == o.path)
            node.attrs["layer"], node.attrs["layers"] = owners.index(owner), len(owners)

    def init(self, node, ins):
        a = node.attrs
        slots = self._slots(node)
        options = [f"orders={list(a['orders'])!r}", f"slots={slots if len(set(slots)) > 1 else slots[0]!r}"]
        options += [f"{key if key != 'kernel' else 'kernel_size'}={a[key]!r}" for key in ("heads", "dim", "kernel")
                    if a[key] != DEFAULTS[key]]
        options.append(f"layer_id={a['layer']!r}, layer_ids={list(range(a['layers']))!r}")
        options += [f"{key if key != 'pad' else 'pad_id'}={a[key]!r}" for key in ("seed", "pad")
                    if a[key] != DEFAULTS[key]]
        if a["compress"]:
            options.append("compress=True")
        return f"AF.Engram({ins[0][-1]!r}, {a['vocab']!r}, {', '.join(options)})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]}, {args[1]})"]


def _vocab_of(graph, tokens_id: str, node) -> int:
    """The size of the embedding that reads the same token ids, for an `engram` call that does not give `vocab`."""
    tables = {graph.node(u).attrs["num"] for u in graph.users(tokens_id) if graph.node(u).op == "embedding"}
    if len(tables) != 1:
        found = "no embedding reads" if not tables else f"embeddings of {sorted(tables)} rows read"
        raise SpecError(f"engram: {found} these tokens, so the vocabulary size is unknown", node.span,
                        hint="give it: `engram(x, tokens, vocab=vocab, ...)`")
    return tables.pop()
