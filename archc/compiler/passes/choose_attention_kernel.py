"""choose_attention_kernel: pick how each attention runs, and record why.

`sdpa` is torch's scaled_dot_product_attention, with `is_causal=True` when the
mask is plain causal, so torch can pick its flash or memory-efficient back end.
`math` is the explicit-mask reference (softmax of masked scores), chosen only
on request. Overrides come from `--kernel PATTERN=KERNEL` (glob on node paths).
"""

from __future__ import annotations

import fnmatch

from archc.compiler.ir import Graph
from archc.compiler.ops import ATTENTION_KERNELS
from archc.dsl.diagnostics import SpecError, did_you_mean


def choose_attention_kernel(graph: Graph, options=None) -> Graph:
    """Invariant after: every attention_core has `kernel` in ATTENTION_KERNELS and a `kernel_reason`."""
    graph = graph.copy()
    overrides = dict(getattr(options, "kernels", None) or {})
    for pattern, kernel in overrides.items():
        if kernel not in ATTENTION_KERNELS:
            raise SpecError(f"--kernel {pattern}={kernel}: unknown kernel `{kernel}`",
                            hint=did_you_mean(kernel, ATTENTION_KERNELS) or f"choose one of {', '.join(ATTENTION_KERNELS)}")
    for node in graph.nodes():
        if node.op != "attention_core":
            continue
        forced = [k for p, k in overrides.items() if p in ("attention", "*") or fnmatch.fnmatch(node.scope, p)]
        if forced:
            node.attrs["kernel"] = forced[-1]
            node.attrs["kernel_reason"] = "chosen with --kernel"
        elif node.attrs["causal"]:
            node.attrs["kernel"] = "sdpa"
            node.attrs["kernel_reason"] = "plain causal mask: SDPA with is_causal=True (flash / memory-efficient back ends)"
        else:
            node.attrs["kernel"] = "sdpa"
            node.attrs["kernel_reason"] = "no mask: SDPA without a mask (flash / memory-efficient back ends)"
    return graph
