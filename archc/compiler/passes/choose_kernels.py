"""choose_kernels: pick the kernel of every op that has one (attention, the mixers, NSA), and record why.

Each such op names its kernel family in `archc.kernels.registry` (`OpDef.kernel_family`); the
family lists the faces and the rule `auto` follows at run time, and the op says which default it
takes and which faces cannot run a node (`OpDef.choose_kernel`, `OpDef.unfit`).

Attention (archc.kernels.attention has the kernels and the exact mask):
`sdpa` is torch's scaled_dot_product_attention with `is_causal` — chosen
for a plain causal mask or none, so torch can pick its flash or
memory-efficient back end. A `window`, `sinks` or `prefix` (or a causal
mask over keys of another length) gets `auto`, decided at run time:
flex_attention with a block-sparse BlockMask on CUDA, and on other devices
the blocked `local` kernel when there is a window (linear in T; eager
flex_attention there computes every score and has no backward) or SDPA
with a boolean mask (`sdpa_mask`) when there is none. `math`, the
explicit-mask reference, is chosen only on request.

Mixers (`linear_attn`, `ssd`, `gated_deltanet`, `kda`, `nsa`): `reference` (the
per-token recurrence), `chunked` (the chunkwise PyTorch form; `gather` for NSA), `triton`,
`fla` (flash-linear-attention; needs it installed, and CUDA at run time) or
`auto`. The device is only known at run time, so the default is `auto`:
the runtime picks Triton on CUDA and the PyTorch form elsewhere. Where the
Triton kernels cannot run (the family's limits in the registry) the pass records
the fallback instead.

Overrides come from `--kernel PATTERN=KERNEL`: PATTERN is a glob on module
paths (`layers.*.mixer`), `*`, or a group (`attention`, `mixers`, or a
mixer's name such as `kda`). A kernel applies only to the nodes it fits
(`math` to attention, `chunked` to mixers, `local` to windowed attention);
a pattern that matches nodes but fits none of them is an error that says
why, as is naming a group it does not fit.
"""

from __future__ import annotations

import fnmatch
import importlib.util

from archc.compiler import ops
from archc.compiler.ir import Graph, Node
from archc.dsl.diagnostics import SpecError, did_you_mean
from archc.kernels.registry import FAMILIES


def _op(node: Node) -> ops.OpDef | None:
    """The node's op when it has a kernel to choose."""
    op = ops.REGISTRY[node.op]
    return op if op.kernel_family else None


def _fits(node: Node, kernel: str) -> bool:
    """`kernel` is one of the node's family (whether or not it can run this node)."""
    op = _op(node)
    return op is not None and kernel in FAMILIES[op.kernel_family].choices


def _unfit(node: Node, kernel: str, graph: Graph) -> str | None:
    """Why `kernel` cannot run `node`, or None."""
    op = _op(node)
    if not _fits(node, kernel):
        return f"`{kernel}` is not a kernel of {op.kernel_groups[-1]}"
    return op.unfit(node, kernel, graph)


def choose_kernels(graph: Graph, options=None) -> Graph:
    """Invariant after: every op with a kernel family has a `kernel` it accepts and a `kernel_reason`."""
    graph = graph.copy()
    overrides = dict(getattr(options, "kernels", None) or {})
    targets = [n for n in graph.nodes() if _op(n)]
    families = [FAMILIES[f] for f in dict.fromkeys(op.kernel_family for op in ops.REGISTRY.values()
                                                  if op.kernel_family)]
    known = tuple(dict.fromkeys(k for fam in families for k in fam.choices))
    for pattern, kernel in overrides.items():
        if kernel not in known:
            raise SpecError(f"--kernel {pattern}={kernel}: unknown kernel `{kernel}`",
                            hint=did_you_mean(kernel, known) or f"choose one of {', '.join(known)}")
        if kernel == "fla" and importlib.util.find_spec("fla") is None:
            raise SpecError(f"--kernel {pattern}={kernel}: flash-linear-attention (`fla`) is not installed here",
                            hint="pip install flash-linear-attention, or choose triton / chunked")
        matched = [n for n in targets if _matches(pattern, n)]
        fitting = [n for n in matched if _fits(n, kernel)]
        if fitting and not any(_unfit(n, kernel, graph) is None for n in matched):
            node = fitting[0]
            op = _op(node)
            runs = FAMILIES[op.kernel_family].choices
            raise SpecError(f"--kernel {pattern}={kernel}: `{kernel}` cannot run {node.scope} "
                            f"({op.describe_node(node)}): {_unfit(node, kernel, graph)}", node.span,
                            hint=f"{node.scope} can run with: "
                                 + ", ".join(k for k in runs if _unfit(node, k, graph) is None))
        if matched and not fitting:
            groups = sorted({_op(n).kernel_groups[-1] for n in matched})
            raise SpecError(f"--kernel {pattern}={kernel}: `{kernel}` is not a kernel of {', '.join(groups)}",
                            hint="; ".join(f"{fam.name} kernels: {', '.join(fam.choices)}" for fam in families))
    for node in targets:
        forced = [k for p, k in overrides.items() if _matches(p, node) and _unfit(node, k, graph) is None]
        if forced:
            node.attrs["kernel"] = forced[-1]
            node.attrs["kernel_reason"] = "chosen with --kernel"
        else:
            node.attrs["kernel"], node.attrs["kernel_reason"] = _op(node).choose_kernel(node, graph)
    return graph


def _matches(pattern: str, node: Node) -> bool:
    # a shared module's later calls (`layer#2.attention`) run the first call's module: one choice for all
    return pattern == "*" or pattern in _op(node).kernel_groups or fnmatch.fnmatch(Graph.module_path(node.scope),
                                                                                    pattern)
