"""The built-in `nsa(...)`: Native Sparse Attention (DeepSeek, arXiv 2502.11089; docs/algorithms.md §2).

    x += nsa(rms_norm(x), heads=16, kv_heads=1, head_dim=64, cmp_block=32, stride=16, select_block=64,
             top_n=16, window=512) as mixer

Lowered like the other mixers to plain linears of the input (fused by `fuse_projections` into one
matmul), a sigmoid, one core op and an output linear:

    q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g = linears(x)    each branch its own keys and values
    g = sigmoid(g)                                                 3 gates per query head (cmp, slc, win)
    y = nsa_core(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, g)   -> AF.NSACore (archc/runtime/nsa.py)
    out = o(y)

Constraints, checked at compile time at the call's span: `stride` divides `cmp_block` (compression
blocks of `cmp_block` tokens (`block` is a reserved word) start every `stride` tokens and
overlap by cmp_block - stride) and `select_block` (selection
blocks start on the compression grid, the alignment the paper's eq. 9 assumes; the mapping itself
is the explicit overlap of `archc.kernels.nsa`); `top_n` >= 3 (it counts the first block and the two
local blocks that are always kept); with `max_len`, `top_n` must not exceed the selection blocks of
a max_len sequence and the core refuses longer inputs at run time. Without `max_len` any length runs:
a sequence of at most top_n · select_block tokens selects every block (full causal attention).

Kernel (`--kernel nsa=reference|gather|triton`): `auto` by default — Triton selection on CUDA,
the gather path elsewhere — unless the Triton kernel cannot tile the shape (a GQA group of more
than 64 query heads, head_dim above 256, select_block above 128), when the pass records `gather`
and why. FLOPs count the three branches' matmuls and the compressor's: selection and window are
linear in T for fixed top_n·select_block and window; compression attention grows as T²/stride.
"""

from __future__ import annotations

from archc.compiler.ops.base import A, Width, composite, need_width, numel, register
from archc.compiler.ops.mixers import MixerOp, check_width, heads_of, out_projection
from archc.dsl.diagnostics import SpecError
from archc.kernels.nsa import LOCAL_BLOCKS, compressed_blocks

COMPRESS = ("mlp", "mean")
BRANCHES = ("cmp", "slc", "win")


@register
class NSACore(MixerOp):
    """The three gated branches after the projections; q [B, T, HQ·K], keys/values [B, T, H·K], g [B, T, 3·HQ]."""

    name = "nsa_core"
    mixer = "nsa"
    kernel_family = "nsa"
    runtime = "NSACore"
    growth = "selection and window linear in T, compression T²/stride"
    inputs = ("q", "k_cmp", "v_cmp", "k_slc", "v_slc", "k_win", "v_win", "g")
    attrs = {
        "heads": A(int, positive=True), "kv_heads": A(int, positive=True),
        "head_dim": A((int, type(None)), None),
        "cmp_block": A(int, 32, positive=True), "stride": A(int, 16, positive=True),
        "select_block": A(int, 64, positive=True), "top_n": A(int, 16, positive=True),
        "window": A(int, 512, positive=True), "compress": A(str, "mlp", choices=COMPRESS),
        "rope": A(bool, True), "rope_theta": A(float, 10000.0, positive=True),
        "max_len": A((int, type(None)), None),
        "kernel": A((str, type(None)), None), "kernel_reason": A((str, type(None)), None),
    }

    def infer(self, node, ins, graph):
        q, *kvs, g = ins
        self.check_heads(node, q, kvs, ("compression key", "compression value", "selection key", "selection value",
                                        "window key", "window value"))
        check_width(node, g, 3 * node.attrs["heads"], "gate projection")
        return q

    def check_heads(self, node, q, kvs, what) -> None:
        """The queries split into heads of head_dim (filled in), each key/value input kv_heads of them."""
        self.check_stream(node, q)
        a = node.attrs
        hd = heads_of(node, need_width(node, q, "query"), "query")
        if a["head_dim"] not in (None, hd):
            raise SpecError(f"heads={a['heads']} × head_dim={a['head_dim']} but the queries are {q[-1]} wide",
                            node.span)
        a["head_dim"] = hd
        for name, shape in zip(what, kvs):
            check_width(node, shape, a["kv_heads"] * hd, name)
        if a["rope"] and hd % 2:
            raise SpecError(f"nsa: RoPE needs an even head_dim, got {hd}", node.span,
                            hint="use an even head_dim, or rope=false")

    def dims(self, node):
        a = node.attrs
        return {"heads": a["heads"], "kv_heads": a["kv_heads"], "head_dim": a["head_dim"], "value_dim": a["head_dim"],
                "select_block": a["select_block"]}

    def weights(self, node, ins):
        a = node.attrs
        if a["compress"] != "mlp":
            return {}
        K, L = a["head_dim"], a["cmp_block"]
        w = {}
        for kv in ("k", "v"):
            w.update({f"{kv}_compress.pos": (L, K), f"{kv}_compress.fc1.weight": (K, L * K),
                      f"{kv}_compress.fc1.bias": (K,), f"{kv}_compress.fc2.weight": (K, K),
                      f"{kv}_compress.fc2.bias": (K,)})
        return w

    def roles(self, node):
        # intra-block position tables: embeddings (AdamW), not hidden matrices for Muon
        return {f"{kv}_compress.pos": "embedding" for kv in ("k", "v")}

    def flops(self, node, ins, out, sizes):
        # Matmuls counted in full per query (as attention's): compression over every complete block,
        # selection over min(top_n·select_block, T) keys, window over min(window, T) keys; plus the
        # compressor MLP per block. The importance mapping and top-n are not matmuls.
        a = node.attrs
        q = ins[0]
        T = round(numel(q[1:2], sizes))
        rows = numel(q[:-1], sizes)  # B·T queries
        HQ, H, K = a["heads"], a["kv_heads"], a["head_dim"]
        n_cmp = compressed_blocks(T, a["cmp_block"], a["stride"])
        keys = n_cmp + min(a["top_n"] * a["select_block"], T) + min(a["window"], T)
        total = 4 * rows * HQ * K * keys
        if a["compress"] == "mlp" and T:
            total += 2 * (rows // T) * n_cmp * H * 2 * (a["cmp_block"] * K * K + K * K)
        return total

    def state_numel(self, node, ins):
        return 0  # no recurrent state: NSA keeps keys and values (see kv_per_token)

    def kv_per_token(self, node) -> float:
        """Floats cached per token to decode: selection and window keys/values, compressed ones per stride."""
        a = node.attrs
        return 2 * a["kv_heads"] * a["head_dim"] * (2 + 1 / a["stride"])

    def init(self, node, ins):
        return f"AF.{self.runtime}({', '.join(self.ctor_args(node))})"

    def ctor_args(self, node) -> list[str]:
        a = node.attrs
        args = [f"heads={a['heads']!r}", f"kv_heads={a['kv_heads']!r}", f"head_dim={a['head_dim']!r}"]
        if a["cmp_block"] != 32:
            args.append(f"block={a['cmp_block']!r}")
        for key in ("stride", "select_block", "top_n", "window", "compress", "rope", "rope_theta",
                    "max_len"):
            if a[key] != self.attrs[key].default:
                args.append(f"{key}={a[key]!r}")
        args.append(f"kernel={a['kernel']!r}")
        return args

    def describe(self, node):
        a = node.attrs
        phi = "MLP (with intra-block positions)" if a["compress"] == "mlp" else "mean"
        rope = "RoPE on q and each branch's keys; " if a["rope"] else ""
        return [f"{rope}k_cmp, v_cmp = {phi} of each block of {a['cmp_block']} tokens, every {a['stride']}",
                f"o = g_cmp Attn(q, k_cmp) + g_slc Attn(q, top-{a['top_n']} blocks of {a['select_block']}) "
                f"+ g_win Attn(q, last {a['window']} tokens)"]


# The inputs of one branch alone after q (`nsa_branch`): its own keys and values; the selection branch also the
# compression keys that score its blocks.
BRANCH_INPUTS = {"cmp": ("k_cmp", "v_cmp"), "slc": ("k_cmp", "k_slc", "v_slc"), "win": ("k_win", "v_win")}


@register
class NSABranchCore(NSACore):
    """One branch alone, ungated, after the projections: q [B, T, HQ·K], the branch's inputs [B, T, H·K]."""

    name = "nsa_branch_core"
    runtime = "NSABranchCore"
    inputs = ()
    attrs = {"branch": A(str, choices=BRANCHES), **NSACore.attrs}

    def infer(self, node, ins, graph):
        q, *kvs = ins
        self.check_heads(node, q, kvs, BRANCH_INPUTS[node.attrs["branch"]])
        return q

    def weights(self, node, ins):
        keep = {"cmp": ("k_compress", "v_compress"), "slc": ("k_compress",), "win": ()}[node.attrs["branch"]]
        return {k: shape for k, shape in super().weights(node, ins).items() if k.split(".")[0] in keep}

    def roles(self, node):
        mine = self.weights(node, [])
        return {k: role for k, role in super().roles(node).items() if k in mine}

    def flops(self, node, ins, out, sizes):
        # As NSACore's, for this branch's keys; the selection branch scores its blocks with the compressed keys
        # (q·k only) and compresses those keys itself.
        a = node.attrs
        q = ins[0]
        T = round(numel(q[1:2], sizes))
        rows = numel(q[:-1], sizes)
        HQ, H, K = a["heads"], a["kv_heads"], a["head_dim"]
        n_cmp = compressed_blocks(T, a["cmp_block"], a["stride"])
        compressors = {"cmp": 2, "slc": 1, "win": 0}[a["branch"]]
        keys = {"cmp": n_cmp, "slc": min(a["top_n"] * a["select_block"], T) + n_cmp / 2,
                "win": min(a["window"], T)}[a["branch"]]
        total = round(4 * rows * HQ * K * keys)
        if a["compress"] == "mlp" and T:
            total += 2 * (rows // T) * n_cmp * H * compressors * (a["cmp_block"] * K * K + K * K)
        return total

    def kv_per_token(self, node) -> float:
        a = node.attrs
        per_head = {"cmp": 2 / a["stride"], "slc": 2 + 1 / a["stride"], "win": 2}[a["branch"]]
        return a["kv_heads"] * a["head_dim"] * per_head

    def ctor_args(self, node) -> list[str]:
        return [repr(node.attrs["branch"]), *super().ctor_args(node)]

    def describe(self, node):
        a = node.attrs
        what = {"cmp": f"Attn(q, k_cmp) over each complete block of {a['cmp_block']} tokens, every {a['stride']}",
                "slc": f"Attn(q, the top-{a['top_n']} blocks of {a['select_block']} tokens scored by Attn(q, k_cmp))",
                "win": f"Attn(q, the last {a['window']} tokens)"}[a["branch"]]
        return [f"o = {what}, ungated"]


# ----------------------------------------------------------------------------- lowering


def _check_options(v, span) -> None:
    block, stride, sel, top_n = v["cmp_block"], v["stride"], v["select_block"], v["top_n"]
    if block % stride:
        raise SpecError(f"nsa: `stride` ({stride}) must divide `cmp_block` ({block}): compression blocks of "
                        "`cmp_block` tokens start every `stride` tokens", span, hint=f"e.g. cmp_block={2 * stride}")
    if sel % stride:
        raise SpecError(f"nsa: `stride` ({stride}) must divide `select_block` ({sel}): selection blocks must start "
                        "on the compression grid to score them from the compressed attention", span,
                        hint=f"e.g. select_block={4 * stride}")
    if top_n < 1 + LOCAL_BLOCKS:
        raise SpecError(f"nsa: `top_n` ({top_n}) must be at least {1 + LOCAL_BLOCKS}: it counts the first block and "
                        f"the {LOCAL_BLOCKS} local blocks that are always selected", span)
    if v["max_len"] is not None:
        n_blocks = -(-v["max_len"] // sel)
        if top_n > n_blocks:
            raise SpecError(f"nsa: `top_n` ({top_n}) exceeds the {n_blocks} selection blocks of "
                            f"select_block={sel} in max_len={v['max_len']} tokens", span,
                            hint=f"use top_n <= {n_blocks}, a smaller select_block, or a larger max_len")
    if v["kv_heads"] is not None and v["heads"] % v["kv_heads"]:
        raise SpecError(f"nsa: heads={v['heads']} must be a multiple of kv_heads={v['kv_heads']} "
                        "(each key/value head serves a group of query heads)", span)


NSA_ATTRS = {
    "heads": A(int, positive=True),
    "kv_heads": A((int, type(None)), None, positive=True),
    "head_dim": A((int, type(None)), None, positive=True),
    "cmp_block": A(int, 32, positive=True),
    "stride": A(int, 16, positive=True),
    "select_block": A(int, 64, positive=True),
    "top_n": A(int, 16, positive=True),
    "window": A(int, 512, positive=True),
    "compress": A(str, "mlp", choices=COMPRESS),
    "rope": A(bool, True),
    "rope_theta": A(float, 10000.0, positive=True),
    "max_len": A((int, type(None)), None, positive=True),
    "bias": A(bool, False),
}


def _projections(ctx, x, v):
    """The checked options' queries, a maker of key/value projections, and the core's attributes."""
    _check_options(v, ctx.span)
    heads, hd = v["heads"], v["head_dim"]
    kv_heads = v["kv_heads"] or heads
    q_out = heads * hd if hd else Width()
    kv_out = kv_heads * hd if hd else Width(
        kv_heads, heads, why=f"the input width {{width}} does not split into heads={heads}; "
                             "choose heads that divide it, or give head_dim")
    q = ctx.linear(x, q_out, "q", bias=v["bias"])
    attrs = {"heads": heads, "kv_heads": kv_heads, "head_dim": hd,
             **{k: v[k] for k in ("cmp_block", "stride", "select_block", "top_n", "window", "compress", "rope",
                                  "rope_theta", "max_len")}}
    return q, lambda name: ctx.linear(x, kv_out, name, bias=v["bias"]), attrs


@composite("nsa", cls="NativeSparseAttention", default_name="mixer",
           attrs={**NSA_ATTRS, "out_bias": A((bool, type(None)), None)})
def lower_nsa(ctx, args, v) -> str:
    (x,) = args
    q, project, core_attrs = _projections(ctx, x, v)
    kvs = [project(f"{kv}_{branch}") for branch in BRANCHES for kv in ("k", "v")]
    g = ctx.linear(x, 3 * v["heads"], "g", bias=v["bias"])
    g = ctx.act("sigmoid", g, var="g")
    core = ctx.core("nsa_core", [q, *kvs, g], core_attrs)
    return out_projection(ctx, core, x, v)


@composite("nsa_branch", cls="NSABranch", default_name="branch", attrs={
    "branch": A(str, choices=BRANCHES), **NSA_ATTRS})
def lower_nsa_branch(ctx, args, v) -> str:
    """One branch of `nsa` alone: its projections and core, ungated and before the output projection."""
    (x,) = args
    q, project, core_attrs = _projections(ctx, x, v)
    kvs = [project(name) for name in BRANCH_INPUTS[v["branch"]]]
    return ctx.core("nsa_branch_core", [q, *kvs], {"branch": v["branch"], **core_attrs})
