"""Lowering of `experts(...)`: router, dispatch, one body per expert, combine (see ops_moe.py).

    x += experts(h, n=64, top_k=6, hidden=256, shared=2, router="deepseek_v3") as moe

Each expert is a step of a list `experts` inside the MoE scope, like a
`repeat`: its body is the block named by `body=` (called with `hidden=` when
the block has that parameter) or SwiGLU by default. `fuse_experts` later
turns the bodies into grouped GEMMs.
"""

from __future__ import annotations

from typing import Any

from archc.compiler import ops_moe
from archc.compiler.ir import Scope
from archc.compiler.ops import REQUIRED, A
from archc.compiler.scalars import evaluate
from archc.dsl import ast
from archc.dsl.diagnostics import SpecError, did_you_mean

ATTRS: dict[str, A] = {
    "n": A(int, positive=True),
    "top_k": A(int, positive=True),
    "hidden": A(int, positive=True),
    "shared": A(int, 0),
    "shared_hidden": A((int, type(None)), None),
    "router": A(str, "softmax", choices=ops_moe.ROUTER_KINDS),
    "balance": A((str, type(None)), None, choices=(*ops_moe.BALANCE_RULES, None)),
    "aux_weight": A((float, type(None)), None),
    "z_loss": A(float, 0.0),
    "capacity": A(float, 0.0),
    "noisy": A(bool, False),
    "groups": A(int, 1, positive=True),
    "top_groups": A(int, 1, positive=True),
    "route_scale": A(float, 1.0, positive=True),
    "bias_rate": A(float, 1e-3),
}
ARG_NAMES = ("x", *ATTRS, "body")
DEFAULT_BALANCE = {"softmax": "aux_loss", "switch": "aux_loss", "deepseek_v3": "aux_free"}
DEFAULT_AUX_WEIGHT = {"aux_loss": 0.01, "seq_aux": 1e-4, "aux_free": 0.0, "none": 0.0}


def _values(lowerer, call: ast.Call, bound: dict[str, ast.Expr], frame) -> dict[str, Any]:
    from archc.compiler.lower import TensorRef

    scalars = {k: v for k, v in frame.env.items() if not isinstance(v, TensorRef)}
    values: dict[str, Any] = {}
    for name, spec in ATTRS.items():
        if name in bound:
            value = evaluate(bound[name], scalars)
            if float in (spec.type if isinstance(spec.type, tuple) else (spec.type,)) and isinstance(value, int) \
                    and not isinstance(value, bool):
                value = float(value)
            problem = spec.check(name, value)
            if problem:
                raise SpecError(f"`experts`: {problem}", bound[name].span)
            values[name] = value
        elif spec.default is REQUIRED:
            raise SpecError(f"`experts` needs its `{name}` argument", call.span)
        else:
            values[name] = spec.default
    where = lambda key: bound[key].span if key in bound else call.span  # noqa: E731
    if values["top_k"] > values["n"]:
        raise SpecError(f"top_k={values['top_k']} is larger than the number of experts n={values['n']}",
                        where("top_k"))
    if "capacity" in bound and values["capacity"] <= 0:
        raise SpecError(f"the capacity factor must be positive, got {values['capacity']} "
                        "(leave it out to drop no tokens)", where("capacity"))
    if values["n"] % values["groups"] or values["top_groups"] > values["groups"]:
        raise SpecError(f"groups={values['groups']} must divide n={values['n']} and top_groups "
                        f"({values['top_groups']}) must not exceed it", where("groups"))
    if values["top_k"] > values["top_groups"] * (values["n"] // values["groups"]):
        raise SpecError(f"top_k={values['top_k']} experts do not fit in top_groups={values['top_groups']} "
                        f"groups of {values['n'] // values['groups']}", where("top_groups"))
    if values["balance"] is None:
        values["balance"] = DEFAULT_BALANCE[values["router"]]
    if values["balance"] == "aux_free" and values["router"] != "deepseek_v3":
        raise SpecError("aux-free balancing (a selection bias) needs router=\"deepseek_v3\"", where("balance"))
    if values["aux_weight"] is None:
        values["aux_weight"] = DEFAULT_AUX_WEIGHT[values["balance"]]
    return values


def lower_experts(lowerer, call: ast.Call, frame):
    """Lower one `experts(...)` call in `frame`; returns the TensorRef of its output."""
    from archc.compiler.lower import TensorRef, _Frame, _Names

    graph = lowerer.graph
    bound = lowerer._bind(call, list(ARG_NAMES), "`experts`")
    if "x" not in bound:
        raise SpecError("`experts` needs its input tensor", call.span)
    x = lowerer._tensor_arg(bound["x"], frame, "the input of `experts`").node
    values = _values(lowerer, call, bound, frame)
    body = _body(lowerer, bound.get("body"))

    attr = frame.names.claim(call.label or "moe", call.label is not None, call.span)
    path = f"{frame.scope}.{attr}" if frame.scope else attr
    graph.scopes[path] = Scope(path, "MoE", "composite", call.span, inputs=[x], arg_names=["x"])
    names = lowerer.names[path] = _Names()
    router = graph.add("router", [x], {
        "experts": values["n"], "top_k": values["top_k"], "kind": values["router"], "balance": values["balance"],
        "aux_weight": values["aux_weight"], "z_loss": values["z_loss"], "capacity": values["capacity"],
        "noisy": values["noisy"], "groups": values["groups"], "top_groups": values["top_groups"],
        "route_scale": values["route_scale"], "bias_rate": values["bias_rate"],
    }, scope=path, name=names.claim("router", False, call.span), span=call.span, dtype="routing", var="routing")
    rows = graph.add("dispatch", [x, router.id], {}, scope=path, name="dispatch", span=call.span, var="x_R")

    experts_attr = names.claim("experts", False, call.span)
    outs = []
    for e in range(values["n"]):
        step = f"{path}.{experts_attr}.{e}"
        graph.scopes[step] = Scope(step, "ExpertsStep", "step", call.span)
        lowerer.names[step] = _Names()
        first = graph._next
        piece = graph.add("expert_rows", [rows.id, router.id], {"expert": e, "experts": values["n"]},
                          scope=path, name="rows", span=call.span, var="rows")
        env = {**{k: v for k, v in frame.env.items() if not isinstance(v, TensorRef)}, "__rows": TensorRef(piece.id)}
        step_frame = _Frame(step, frame.module, lowerer.names[step], {}, env)
        out = lowerer._call(_body_call(body, call, values["hidden"]), step_frame)
        lowerer._collapse_step(step, first)
        outs.append(out.node)
    joined = graph.add("concat_experts", [*outs, router.id], {}, scope=path, name="concat", span=call.span,
                       var="y_R")
    y = graph.add("combine", [joined.id, router.id, x], {}, scope=path, name="combine", span=call.span, var="y")
    if values["shared"]:
        hidden = values["shared_hidden"] or values["shared"] * values["hidden"]
        shared_call = ast.Call("swiglu", (ast.Name("__x", call.span),), (ast.Kwarg("hidden", ast.Num(hidden, call.span),
                               call.span),), "shared", call.span, call.span)
        shared_frame = _Frame(path, frame.module, names, {}, {"__x": TensorRef(x)})
        shared = lowerer._call(shared_call, shared_frame)
        y = graph.add("add", [y.id, shared.node], {}, scope=path, name="add", span=call.span, var="y")
    graph.scopes[path].outputs = [y.id]
    return TensorRef(y.id)


def _body(lowerer, expr: ast.Expr | None) -> ast.BlockDef | None:
    if expr is None:
        return None
    if not isinstance(expr, ast.Name) or expr.id not in lowerer.spec.blocks:
        name = expr.id if isinstance(expr, ast.Name) else "?"
        raise SpecError("`body=` names a block that maps expert rows [N, D] to [N, D]", expr.span,
                        hint=did_you_mean(name, lowerer.spec.blocks))
    return lowerer.spec.blocks[expr.id][0]


def _body_call(body: ast.BlockDef | None, call: ast.Call, hidden: int) -> ast.Call:
    span = call.span
    rows = ast.Name("__rows", span)
    hidden_kw = (ast.Kwarg("hidden", ast.Num(hidden, span), span),)
    if body is None:
        return ast.Call("swiglu", (rows,), hidden_kw, None, span, span)
    takes_hidden = any(p.name == "hidden" for p in body.params)
    return ast.Call(body.name, (rows,), hidden_kw if takes_hidden else (), None, span, span)


def add_aux_losses(graph) -> None:
    """With routers in the model, its `loss` output also carries their auxiliary losses."""
    if not any(n.op == "router" for n in graph.nodes()):
        return
    for i, (name, node_id) in enumerate(graph.outputs):
        if name == "loss":
            total = graph.add("add_aux_losses", [node_id], {}, scope="", name="aux", span=graph.node(node_id).span,
                              var="loss")
            graph.outputs[i] = (name, total.id)
