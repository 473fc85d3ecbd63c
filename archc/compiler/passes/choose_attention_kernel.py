"""choose_attention_kernel: pick how each attention and each linear-attention mixer runs, and record why.

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

Mixers (`linear_attn`, `ssd`, `gated_deltanet`, `kda`): `reference` (the
per-token recurrence), `chunked` (the chunkwise PyTorch form), `triton`,
`fla` (flash-linear-attention; needs it installed, and CUDA at run time) or
`auto`. The device is only known at run time, so the default is `auto`:
the runtime picks Triton on CUDA and the chunked form elsewhere. Where the
Triton kernels cannot run (head or state dims above 256) the pass records
`chunked` instead.

Overrides come from `--kernel PATTERN=KERNEL`: PATTERN is a glob on module
paths (`layers.*.mixer`), `*`, or a family (`attention`, `mixers`, or a
mixer's name such as `kda`). A kernel applies only to the nodes it fits
(`math` to attention, `chunked` to mixers, `local` to windowed attention);
a pattern that matches nodes but fits none of them is an error that says
why, as is naming a family it does not fit.
"""

from __future__ import annotations

import fnmatch
import importlib.util

from archc.compiler import ops
from archc.compiler.ir import Graph
from archc.compiler.ops import ATTENTION_KERNELS, AttentionCore
from archc.dsl.diagnostics import SpecError, did_you_mean


def _mixer_op(node):
    op = ops.REGISTRY[node.op]
    return op if getattr(op, "mixer", None) else None


def _families(node) -> tuple[str, ...]:
    if node.op == "attention_core":
        return ("attention",)
    op = _mixer_op(node)
    return ("mixers", op.mixer) if op else ()


def _fits(node, kernel: str) -> bool:
    """`kernel` is one of the node's family (whether or not it can run this node)."""
    if node.op == "attention_core":
        return kernel in ATTENTION_KERNELS
    op = _mixer_op(node)
    return op is not None and kernel in op.kernels


def _unfit(node, kernel: str, graph: Graph) -> str | None:
    """Why `kernel` cannot run `node`, or None."""
    if not _fits(node, kernel):
        return f"`{kernel}` is not a kernel of {_families(node)[-1]}"
    return ops.REGISTRY["attention_core"].unfit(node, kernel, graph) if node.op == "attention_core" else None


def choose_attention_kernel(graph: Graph, options=None) -> Graph:
    """Invariant after: every attention_core and mixer core has a `kernel` it accepts and a `kernel_reason`."""
    graph = graph.copy()
    overrides = dict(getattr(options, "kernels", None) or {})
    targets = [n for n in graph.nodes() if _families(n)]
    mixer_kernels = list(dict.fromkeys(k for op in ops.REGISTRY.values() if getattr(op, "mixer", None)
                                       for k in op.kernels))
    known = (*ATTENTION_KERNELS, *(k for k in mixer_kernels if k not in ATTENTION_KERNELS))
    for pattern, kernel in overrides.items():
        if kernel not in known:
            raise SpecError(f"--kernel {pattern}={kernel}: unknown kernel `{kernel}`",
                            hint=did_you_mean(kernel, known) or f"choose one of {', '.join(known)}")
        if kernel == "fla" and importlib.util.find_spec("fla") is None:
            raise SpecError(f"--kernel {pattern}={kernel}: flash-linear-attention (`fla`) is not installed here",
                            hint="pip install flash-linear-attention, or choose triton / chunked")
        matched = [n for n in targets if _matches(pattern, n)]
        if matched and any(_fits(n, kernel) for n in matched) and not any(
                _unfit(n, kernel, graph) is None for n in matched):
            node = next(n for n in matched if _fits(n, kernel))
            raise SpecError(f"--kernel {pattern}={kernel}: `{kernel}` cannot run {node.scope} "
                            f"({AttentionCore.mask_words(node)}): {_unfit(node, kernel, graph)}", node.span,
                            hint=f"{node.scope} can run with: "
                                 + ", ".join(k for k in ATTENTION_KERNELS if _unfit(node, k, graph) is None))
        if matched and not any(_fits(n, kernel) for n in matched):
            kinds = sorted({f for n in matched for f in _families(n)[-1:]})
            raise SpecError(f"--kernel {pattern}={kernel}: `{kernel}` is not a kernel of {', '.join(kinds)}",
                            hint="attention kernels: " + ", ".join(ATTENTION_KERNELS)
                                 + "; mixer kernels: " + ", ".join(mixer_kernels))
    for node in targets:
        forced = [k for p, k in overrides.items() if _matches(p, node) and _unfit(node, k, graph) is None]
        if forced:
            node.attrs["kernel"] = forced[-1]
            node.attrs["kernel_reason"] = "chosen with --kernel"
        elif node.op != "attention_core":
            node.attrs["kernel"], node.attrs["kernel_reason"] = _mixer_op(node).choose_kernel(node)
        else:
            node.attrs["kernel"], node.attrs["kernel_reason"] = _attention_kernel(node, graph)
    return graph


def _attention_kernel(node, graph: Graph) -> tuple[str, str]:
    """The default kernel of an attention node, and why."""
    core = ops.REGISTRY["attention_core"]
    if core.unfit(node, "sdpa", graph) is None:
        if node.attrs["causal"]:
            return "sdpa", "plain causal mask: SDPA with is_causal=True (flash / memory-efficient back ends)"
        return "sdpa", "no mask: SDPA without a mask (flash / memory-efficient back ends)"
    masked = core.mask_words(node)
    if not core.masked(node):
        masked += " over keys of another length"
    cpu = ("the blocked local kernel (linear in T)" if node.attrs["window"] is not None
           else "SDPA with a boolean mask")
    return "auto", (f"{masked}: at run time flex_attention (block-sparse) on CUDA, {cpu} elsewhere"
                    + (" and while dropout is on" if node.attrs["dropout"] else ""))


def _matches(pattern: str, node) -> bool:
    return pattern == "*" or pattern in _families(node) or fnmatch.fnmatch(node.scope, pattern)
