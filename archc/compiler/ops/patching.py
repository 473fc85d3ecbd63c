"""Byte patching (the Byte Latent Transformer): hashed byte n-grams, entropy, patches, pooling into patches, the
encoder's and decoder's cross-attention, and unpatching. Generated code calls archc/runtime/patching.py; the
formulas are docs/lanes_engram_blt.md §3.

- `hash_ngrams(tokens, sizes=[3, ..., 8], functions=1, buckets=500002, dim=)`: [B, T] byte ids -> [B, T, dim],
  Σ over hash functions and n-gram sizes of a row of one hashed table.
- `entropy(logits)`: [..., V] -> [...], of the softmax, in nats.
- `patch(tokens, entropies, mode="entropy", threshold=, threshold_add=, monotonic=, patch_size=,
  max_patch_length=)`: patch lengths [B, P] (ints, right-padded with zeros). Modes: "entropy" (a global
  threshold, or with `monotonic` the rise over the entropy before, or with `threshold_add` both), "top_k",
  "space", "static" (`patch_size` bytes). P, the number of patches, is
  data-dependent: shapes carry it as the symbol `P`; a batch's rows have as many patches as the longest
  one's, the shorter rows end in empty patches, which the masks below make see nothing. The decisions run
  to position T (the byte after the window), so the lengths cover T + 1 positions, and the first patch is
  one byte (the decoder's shift needs it).
- `patch_pool(x, lengths, reduce="max")`: [B, T, D] -> [B, P, D], each patch's max (mean, sum) over its bytes.
- `patch_attention(x, memory, lengths, heads, k=1, reads="bytes")`: cross-attention between patches and
  bytes; `reads="bytes"` (the encoder): x holds k queries per patch [B, P, k·D], each patch's queries see
  only its own bytes `memory` [B, T, D'], the output is shaped as x. `reads="patches"` (the decoder): the
  bytes x [B, T, D] read the patch vectors `memory` [B, P, k·D'] (k keys per patch), byte t only the patch
  that ends at or before it (the one-patch shift: never the patch holding the byte it predicts). RMSNorm on
  the query and key/value inputs, no positions, as the reference.
- `unpatch(x, lengths, like=tokens)`: [B, P, D] -> [B, T, D], each byte the vector of the patch the decoder
  shift gives it (the plain alternative to the decoder's cross-attention).
"""

from __future__ import annotations

import math

from archc.compiler import dims
from archc.compiler.ir import Graph
from archc.compiler.ops.base import A, OpDef, Width, composite, dim_value, fmt_shape, need_width, numel, register
from archc.dsl.diagnostics import SpecError
from archc.runtime.patching import DEFAULT_THRESHOLD, HASH_PRIMES

# The rules as a spec names them: "top_k" is the reference's entropy rule without a threshold (the
# T // patch_size − 2 highest entropies start patches; not causal, so not for generation).
MODES = ("entropy", "top_k", "space", "static")
ENTROPY_MODES = ("entropy", "top_k")

PATCHES = "P"  # the symbol of the patch count in shapes
REDUCES = {"max": "amax", "mean": "mean", "sum": "sum"}
READS = ("bytes", "patches")
# Generation re-runs a patched model on the whole sequence (archc.training.byte_generation decides the patches
# as it goes); its layers do not continue from a cache.
UNDECODABLE = "byte patching: the patches, and the layers over them, are computed over the whole sequence"
ASSUMED_MEAN = 4.5  # the mean patch length sizes assume where neither the rule nor --dim P fixes it (the paper's)


def _ids(node, shape, what: str):
    if len(shape) != 2:
        raise SpecError(f"{node.op} takes byte ids [B, T], but the {what} has shape {fmt_shape(shape)}", node.span,
                        hint="declare the bytes as `bytes: Tokens[B, T]`")
    return shape


def _lengths(node, graph: Graph, index: int, shape):
    """The patch lengths argument: [B, P] ints from `patch(...)`."""
    source = graph.node(graph.args(node.id)[index])
    if source.dtype != "long" or len(shape) != 2 or not dims.same(shape[1], PATCHES):
        raise SpecError(f"{node.op} needs the patch lengths that `patch(...)` gives ([B, {PATCHES}] ints), got a "
                        f"{source.dtype} tensor of shape {fmt_shape(shape)}", node.span,
                        hint="lengths = patch(bytes, entropies, threshold=...)")
    return shape


def _stream(node, shape, what: str):
    if len(shape) != 3:
        raise SpecError(f"{node.op} takes a stream [B, T, D] for the {what}, got {fmt_shape(shape)}", node.span)
    return shape


@register
class HashNgrams(OpDef):
    """`hash_ngrams(tokens, sizes, functions, buckets, dim)`: the hashed n-gram embeddings of the local encoder."""

    name = "hash_ngrams"
    inputs = ("tokens",)
    attrs = {"sizes": A(list, [3, 4, 5, 6, 7, 8]), "functions": A(int, 1, positive=True),
             "buckets": A(int, 500002, positive=True), "dim": A(int, positive=True)}
    pure = False

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] != "long":
            raise SpecError("`hash_ngrams` hashes integer byte ids (`Tokens`), not floats", span)
        return "float"

    def infer(self, node, ins, graph):
        a = node.attrs
        sizes = a["sizes"]
        if not sizes or not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 64 for n in sizes):
            raise SpecError(f"hash_ngrams: `sizes` must be a list of n-gram sizes from 1 to 64, such as "
                            f"[3, 4, 5, 6, 7, 8], got {sizes!r}", node.span)
        if len(set(sizes)) != len(sizes):
            raise SpecError(f"hash_ngrams: `sizes` lists a size twice: {sizes!r}", node.span)
        if a["functions"] > len(HASH_PRIMES):
            raise SpecError(f"hash_ngrams: there are {len(HASH_PRIMES)} hash functions (primes), got "
                            f"functions={a['functions']}", node.span)
        return (*_ids(node, ins[0], "input"), a["dim"])

    def rows(self, node) -> int:
        a = node.attrs
        return a["functions"] * len(a["sizes"]) * a["buckets"]

    def weights(self, node, ins):
        return {"table.weight": (self.rows(node), node.attrs["dim"])}

    def roles(self, node):
        return {"table.weight": "embedding"}

    def init(self, node, ins):
        a = node.attrs
        return (f"AF.HashNgramEmbedding({a['dim']!r}, sizes={tuple(a['sizes'])!r}, functions={a['functions']!r}, "
                f"buckets={a['buckets']!r})")

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({args[0]})"]


@register
class Entropy(OpDef):
    """`entropy(logits)`: −Σ p log p of the softmax over the last axis, in nats."""

    name = "entropy"
    inputs = ("logits",)

    def infer(self, node, ins, graph):
        need_width(node, ins[0], "logits")
        return tuple(ins[0][:-1])

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = AF.entropy({args[0]})"]


@register
class Patch(OpDef):
    """`patch(tokens, entropies, ...)`: patch lengths [B, P] by one of the reference's rules."""

    name = "patch"
    inputs = ("tokens", "entropies")
    optional_inputs = frozenset({"entropies"})
    attrs = {"mode": A(str, "entropy", choices=MODES), "threshold": A(float, DEFAULT_THRESHOLD),
             "threshold_add": A((float, type(None)), None), "monotonic": A(bool, False),
             "patch_size": A(int, 4, positive=True), "max_patch_length": A((int, type(None)), None, positive=True)}
    pure = False  # a module (AF.Patcher) that generation can hand the patches it decided

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] != "long":
            raise SpecError("`patch` reads the byte ids (`Tokens`) as its first argument", span)
        if len(dtypes) > 1 and dtypes[1] != "float":
            raise SpecError("`patch`: the entropies are floats, one per byte (`entropy(logits)`)", span)
        return "long"

    def infer(self, node, ins, graph):
        a = node.attrs
        tokens = _ids(node, ins[0], "tokens")
        has_entropies = len(ins) > 1
        if a["mode"] in ENTROPY_MODES and not has_entropies:
            raise SpecError(f'patch: mode "{a["mode"]}" needs the entropies of the byte model', node.span,
                            hint="patch(bytes, entropy(EntropyModel(bytes)), ...), or mode=\"static\" / \"space\"")
        if a["mode"] not in ENTROPY_MODES and has_entropies:
            raise SpecError(f'patch: mode "{a["mode"]}" does not read entropies', node.span,
                            hint='drop the entropies, or use mode="entropy"')
        if has_entropies and (len(ins[1]) != 2 or not all(dims.same(x, y) for x, y in zip(ins[1], tokens))):
            raise SpecError(f"patch: the entropies must be one per byte, {fmt_shape(tokens)}, got "
                            f"{fmt_shape(ins[1])}", node.span)
        if a["monotonic"] and a["threshold_add"] is not None:
            raise SpecError("patch: `monotonic` and `threshold_add` are two rules; choose one", node.span)
        if a["mode"] == "top_k" and (a["monotonic"] or a["threshold_add"] is not None):
            raise SpecError('patch: mode "top_k" takes the T // patch_size − 2 highest entropies, with no threshold; '
                            '`monotonic` and `threshold_add` go with mode "entropy"', node.span)
        return (tokens[0], PATCHES)

    def mean_length(self, node) -> float:
        """The mean patch length sizes assume: the static size, else the paper's 4.5."""
        return float(node.attrs["patch_size"]) if node.attrs["mode"] == "static" else ASSUMED_MEAN

    def init(self, node, ins):
        a = node.attrs
        mode = "entropy" if a["mode"] == "top_k" else a["mode"]
        options = [f"mode={mode!r}"]
        if a["mode"] == "entropy":
            options.append(f"threshold={a['threshold']!r}")
            if a["threshold_add"] is not None:
                options.append(f"threshold_add={a['threshold_add']!r}")
            if a["monotonic"]:
                options.append("monotonic=True")
        if a["mode"] == "top_k":
            options.append("threshold=None")
        if a["mode"] in ("static", "top_k"):
            options.append(f"patch_size={a['patch_size']!r}")
        if a["mode"] == "static":
            options.append("first_alone=True")
        if a["max_patch_length"] is not None:
            options.append(f"max_patch_length={a['max_patch_length']!r}")
        return f"AF.Patcher({', '.join(options)})"

    def cannot_decode(self, node, ins):
        return UNDECODABLE

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}({', '.join(args)})"]


@register
class PatchPool(OpDef):
    """`patch_pool(x, lengths, reduce="max")`: [B, T, D] -> [B, P, D] (empty patches are 0)."""

    name = "patch_pool"
    inputs = ("x", "lengths")
    attrs = {"reduce": A(str, "max", choices=tuple(REDUCES))}

    def infer(self, node, ins, graph):
        x = _stream(node, ins[0], "bytes")
        lengths = _lengths(node, graph, 1, ins[1])
        return (x[0], lengths[1], x[2])

    def cannot_decode(self, node, ins):
        return UNDECODABLE

    def forward(self, node, args, out, mod, ins):
        x, lengths = args
        return [f"{out} = AF.patch_reduce({x}, AF.patch_ids_from_lengths({lengths}, {x}.size(1)), "
                f"{lengths}.size(1), {REDUCES[node.attrs['reduce']]!r})"]


@register
class Unpatch(OpDef):
    """`unpatch(x, lengths, like=tokens)`: [B, P, D] -> [B, T, D] with the decoder's one-patch shift."""

    name = "unpatch"
    inputs = ("x", "lengths", "like")

    def infer(self, node, ins, graph):
        x = _stream(node, ins[0], "patches")
        _lengths(node, graph, 1, ins[1])
        like = ins[2]
        if len(like) < 2:
            raise SpecError(f"unpatch: `like` gives the bytes' length, [B, T, ...], got {fmt_shape(like)}", node.span)
        return (x[0], like[1], x[2])

    def cannot_decode(self, node, ins):
        return UNDECODABLE

    def forward(self, node, args, out, mod, ins):
        x, lengths, like = args
        return [f"{out} = AF.unpatch({x}, AF.decoder_patch_ids({lengths}, {like}.size(1)))"]


@register
class PatchSplit(OpDef):
    """[B, P, k·D] -> [B, P·k, D]: a patch's k vectors as k rows (the reference's reshape)."""

    name = "patch_split"
    attrs = {"k": A(int, positive=True)}
    user = False

    def infer(self, node, ins, graph):
        x = _stream(node, ins[0], "patches")
        k, width = node.attrs["k"], need_width(node, x, "patches")
        if width % k:
            raise SpecError(f"patch_attention: the patch vectors are {width} wide, which does not split into k={k} "
                            "vectors", node.span, hint=f"make them k·D wide: linear(x, {k} * d_local)")
        return (x[0], dims.mul(x[1], k), width // k)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.reshape({args[0]}.size(0), -1, {ins[0][2] // node.attrs['k']!r})"]


@register
class PatchMerge(OpDef):
    """[B, P·k, D] -> [B, P, k·D]: the inverse of patch_split."""

    name = "patch_merge"
    attrs = {"k": A(int, positive=True)}
    user = False

    def infer(self, node, ins, graph):
        x = ins[0]
        k = node.attrs["k"]
        return (x[0], dims.div(x[1], k), x[2] * k)

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {args[0]}.reshape({args[0]}.size(0), -1, {ins[0][2] * node.attrs['k']!r})"]


@register
class PatchAttentionCore(OpDef):
    """softmax(q kᵀ/√d + patch mask) v over heads; q [B, Q, H·d], k and v [B, K, H·d]; rows that see nothing
    (empty patches) give 0. reads="bytes": Q = P·k patch queries, K = T bytes; reads="patches": Q = T bytes,
    K = P·k patch vectors."""

    name = "patch_attention_core"
    inputs = ("q", "k", "v", "lengths")
    attrs = {"heads": A(int, positive=True), "head_dim": A((int, type(None)), None), "k": A(int, positive=True),
             "reads": A(str, choices=READS), "window": A((int, type(None)), None, positive=True)}
    user = False
    line_comment = False

    def infer(self, node, ins, graph):
        a = node.attrs
        q, k, v, lengths = ins
        _lengths(node, graph, 3, lengths)
        width = need_width(node, q, "query")
        if width % a["heads"]:
            raise SpecError(f"patch_attention: the width {width} does not split into heads={a['heads']}", node.span,
                            hint="choose heads that divide it, or give head_dim")
        a["head_dim"] = a["head_dim"] or width // a["heads"]
        if k[-1] != width or v[-1] != width:
            raise SpecError(f"patch_attention: queries are {width} wide but keys {k[-1]} and values {v[-1]}",
                            node.span)
        return q

    def cannot_decode(self, node, ins):
        return UNDECODABLE

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        q, k, v, lengths = args
        h, hd = a["heads"], a["head_dim"]
        window = f", window={a['window']!r}" if a["window"] is not None else ""
        if a["reads"] == "bytes":
            mask = [f"patch_ids = AF.patch_ids_from_lengths({lengths}, {k}.size(1))",
                    f"mask = AF.encoder_cross_mask(patch_ids, {lengths}.size(1), {a['k']!r}{window})"
                    "  # [B, P·k, T]: a patch sees its own bytes"]
        else:
            mask = [f"patch_ids = AF.decoder_patch_ids({lengths}, Q)  # the one-patch shift",
                    f"mask = AF.decoder_cross_mask(patch_ids, {lengths}.size(1), {a['k']!r}{window})"
                    "  # [B, T, P·k]: a byte sees the patch before its own"]
        return [f"B, Q, _ = {q}.shape",
                f"{q}_BHQd = {q}.view(B, Q, {h!r}, {hd!r}).transpose(1, 2)",
                f"{k}_BHKd = {k}.view(B, -1, {h!r}, {hd!r}).transpose(1, 2)",
                f"{v}_BHKd = {v}.view(B, -1, {h!r}, {hd!r}).transpose(1, 2)",
                *mask,
                f"{out} = AF.masked_attention({q}_BHQd, {k}_BHKd, {v}_BHKd, mask)",
                f"{out} = {out}.transpose(1, 2).reshape(B, Q, {h * hd!r})"]

    def flops(self, node, ins, out, sizes):
        # q kᵀ and p v over every (query, key) pair the dense mask spans
        q, k = ins[:2]
        return 4 * numel(q[:-1], sizes) * round(dim_value(k[1], sizes)) * node.attrs["heads"] * node.attrs["head_dim"]


@composite("patch_attention", cls="PatchCrossAttention", default_name="cross_attn",
           inputs=("x", "memory", "lengths"),
           attrs={"heads": A(int, positive=True), "k": A(int, 1, positive=True),
                  "reads": A(str, "bytes", choices=READS), "head_dim": A((int, type(None)), None, positive=True),
                  "window": A((int, type(None)), None, positive=True), "norm_eps": A(float, 1e-5, positive=True),
                  "bias": A(bool, False)})
def lower_patch_attention(ctx, args, v) -> str:
    x, memory, lengths = args
    k = v["k"]
    queries = ctx.add("patch_split", [x], {"k": k}, name="split", var="queries") if v["reads"] == "bytes" else x
    kv = ctx.add("patch_split", [memory], {"k": k}, name="split", var="kv") if v["reads"] == "patches" else memory
    width = v["heads"] * v["head_dim"] if v["head_dim"] else Width(of=queries)
    q = ctx.linear(ctx.rms_norm(queries, v["norm_eps"], "q_norm"), width, "q", bias=v["bias"])
    kv_in = ctx.rms_norm(kv, v["norm_eps"], "k_norm")
    key = ctx.linear(kv_in, width, "k", bias=v["bias"])
    val = ctx.linear(kv_in, width, "v", bias=v["bias"])
    core = ctx.add("patch_attention_core", [q, key, val, lengths],
                   {"heads": v["heads"], "head_dim": v["head_dim"], "k": k, "reads": v["reads"], "window": v["window"]},
                   name="core", var="y")
    y = ctx.linear(core, Width(of=queries), "o", bias=v["bias"])
    return ctx.add("patch_merge", [y], {"k": k}, name="merge", var="y") if v["reads"] == "bytes" else y


# ----------------------------------------------------------------------------- sizes

REGISTRY_PATCH = Patch()


def patch_count(seq: int, mean: float) -> int:
    """Patches of a window of `seq` bytes at a mean patch length: the first byte alone, then the other seq
    positions (the last one the byte after the window) in patches of `mean`."""
    return 1 + math.ceil(seq / mean)


def assumed_mean(graph: Graph) -> float | None:
    """The mean patch length the spec's `patch` implies (None: the spec does not patch)."""
    patches = [n for n in graph.nodes() if n.op == "patch"]
    return REGISTRY_PATCH.mean_length(patches[0]) if patches else None
