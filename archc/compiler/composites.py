"""Composite ops: built-in blocks (attention, cross-attention, MLP, SwiGLU) expanded into primitive IR.

Each composite becomes a scope (a class in the generated code) holding plain
linears and one core op, so passes such as `fuse_projections` see through it.
"""

from __future__ import annotations

from typing import Callable

import attrs

from archc.compiler.ir import Graph
from archc.compiler.ops import ACTIVATIONS, A, AttentionCore, Width


@attrs.frozen
class Composite:
    cls: str  # class name in generated code
    default_name: str  # attribute name unless labelled with `as`
    inputs: tuple[str, ...]
    attrs: dict[str, A]
    lower: Callable[..., str]  # (graph, args, values, path, names, span) -> output node id


def _linear(graph: Graph, x: str, out, bias: bool, path: str, names, name: str, span) -> str:
    return graph.add("linear", [x], {"out": out, "bias": bias, "tie": None}, scope=path,
                     name=names.claim(name, False, span), span=span).id


def _lower_mlp(graph, args, v, path, names, span) -> str:
    (x,) = args
    out = v["out"] if v["out"] is not None else Width(of=x)
    h = _linear(graph, x, v["hidden"], v["bias"], path, names, "fc", span)
    h = graph.add(v["act"], [h], {}, scope=path, name=v["act"], span=span, var="h").id
    if v["dropout"]:
        h = graph.add("dropout", [h], {"p": v["dropout"]}, scope=path, name="dropout", span=span, var="h").id
    return _linear(graph, h, out, v["bias"], path, names, "proj", span)


def _lower_swiglu(graph, args, v, path, names, span) -> str:
    (x,) = args
    out = v["out"] if v["out"] is not None else Width(of=x)
    gate = _linear(graph, x, v["hidden"], v["bias"], path, names, "gate", span)
    up = _linear(graph, x, v["hidden"], v["bias"], path, names, "up", span)
    act = graph.add("silu", [gate], {}, scope=path, name="silu", span=span, var="gate").id
    h = graph.add("mul", [act, up], {"scalar": None, "scalar_left": False}, scope=path, name="mul", span=span,
                  var="h").id
    return _linear(graph, h, out, v["bias"], path, names, "down", span)


def _attention(graph, x, memory, v, path, names, span) -> str:
    """Queries from `x`, keys and values from `memory` (`x` itself for self-attention), core, output."""
    heads = v["heads"]
    kv_heads = v["kv_heads"] or heads
    hd = v["head_dim"]
    # Without an explicit head_dim, widths follow x: q is as wide as x, and so are k, v per head.
    of = None if memory == x else x  # None: the linear's own input
    q_out = heads * hd if hd else Width()
    kv_out = kv_heads * hd if hd else Width(
        kv_heads, heads, of=of, why=f"the input width {{width}} does not split into heads={heads}; "
                                   "choose heads that divide it, or give head_dim")
    q = _linear(graph, x, q_out, v["bias"], path, names, "q", span)
    k = _linear(graph, memory, kv_out, v["bias"], path, names, "k", span)
    val = _linear(graph, memory, kv_out, v["bias"], path, names, "v", span)
    core = graph.add(
        "attention_core", [q, k, val],
        {"heads": heads, "kv_heads": kv_heads, "head_dim": hd, "causal": v["causal"], "window": v["window"],
         "sinks": v["sinks"], "prefix": v["prefix"], "rope": v["rope"], "rope_theta": v["rope_theta"],
         "qk_norm": v["qk_norm"], "norm_eps": v["norm_eps"], "dropout": v["dropout"], "kernel": None,
         "kernel_reason": None},
        scope=path, name=names.claim("core", False, span), span=span, var="y",
    ).id
    out_bias = v["bias"] if v["out_bias"] is None else v["out_bias"]
    # The output projection maps back to the width of x.
    return _linear(graph, core, Width(of=x), out_bias, path, names, "o", span)


def _lower_attention(graph, args, v, path, names, span) -> str:
    (x,) = args
    return _attention(graph, x, x, v, path, names, span)


def _lower_cross_attention(graph, args, v, path, names, span) -> str:
    x, memory = args
    return _attention(graph, x, memory, v, path, names, span)


def _attention_attrs(causal: bool) -> dict[str, A]:
    """The spec options of `attention` / `cross_attention`: the core's mask, position and norm options, plus
    projection options; head counts and width may be left to follow the input."""
    core = AttentionCore.attrs
    shared = ("window", "sinks", "prefix", "rope", "rope_theta", "qk_norm", "norm_eps", "dropout")
    return {
        "heads": core["heads"],
        "kv_heads": A((int, type(None)), None, positive=True),
        "head_dim": A((int, type(None)), None, positive=True),
        "causal": A(bool, causal),
        **{name: core[name] for name in shared},
        "bias": A(bool, False),
        "out_bias": A((bool, type(None)), None),
    }


_ACTS = tuple(ACTIVATIONS)

COMPOSITES: dict[str, Composite] = {
    "mlp": Composite("MLP", "mlp", ("x",), {
        "hidden": A(int, positive=True),
        "out": A((int, type(None)), None, positive=True),
        "act": A(str, "gelu", choices=_ACTS),
        "bias": A(bool, True),
        "dropout": A(float, 0.0, unit=True),
    }, _lower_mlp),
    "swiglu": Composite("SwiGLU", "mlp", ("x",), {
        "hidden": A(int, positive=True),
        "out": A((int, type(None)), None, positive=True),
        "bias": A(bool, False),
    }, _lower_swiglu),
    "attention": Composite("Attention", "attn", ("x",), _attention_attrs(causal=True), _lower_attention),
    "cross_attention": Composite("CrossAttention", "cross_attn", ("x", "memory"), _attention_attrs(causal=False),
                                 _lower_cross_attention),
}

from archc.compiler import composites_mla  # noqa: E402,F401  (registers COMPOSITES["mla"], Multi-head Latent Attention)

from archc.compiler.composites_mixers import MIXERS  # noqa: E402  (linear_attn, ssd, gated_deltanet, kda)
COMPOSITES.update(MIXERS)
from archc.compiler import composites_nsa  # noqa: E402,F401  (registers COMPOSITES["nsa"], Native Sparse Attention)
