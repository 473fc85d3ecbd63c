"""Losses: `next_token_loss(logits, tokens)`, `cross_entropy(logits, labels, ignore_index=-100)` (masked LM,
classification of a pooled or [CLS] position) and `mse(pred, target)`. Each gives a scalar the model returns
as `loss`; what feeds one directly is the model's head (analysis.param_roles).

A next-token loss over a model whose self-attention is bidirectional is reported as a warning: each
position would see the token it is asked to predict."""

from __future__ import annotations

from archc.compiler import dims
from archc.compiler.ops.base import A, OpDef, fmt_shape, register
from archc.dsl.diagnostics import SpecError, SpecWarning


@register
class NextTokenLoss(OpDef):
    """Mean cross-entropy of logits[:, :-1] against tokens[:, 1:]."""

    name = "next_token_loss"
    inputs = ("logits", "tokens")
    attrs = {}
    is_loss = True

    def infer(self, node, ins, graph):
        logits, tokens = ins
        if len(logits) != 3 or len(tokens) != 2 or logits[:2] != tokens:
            raise SpecError(
                f"next_token_loss expects logits [B, T, V] and tokens [B, T], got {fmt_shape(logits)} and "
                f"{fmt_shape(tokens)}",
                node.span,
            )
        return ()

    def warnings(self, node, graph):
        for other in graph.nodes():
            if other.op == "attention_core" and not other.attrs["causal"] and graph.node(
                    graph.args(other.id)[0]).shape[1] == graph.node(graph.args(other.id)[1]).shape[1]:
                return [SpecWarning(
                    f"next_token_loss over bidirectional self-attention ({other.scope}): each position sees the "
                    "token it is asked to predict, so the loss reads the labels", node.span,
                    notes=[("the attention is here", other.span)],
                    hint="make the attention causal (causal=true), or train against given labels: "
                         "cross_entropy(logits, labels)")]
        return []

    def forward(self, node, args, out, mod, ins):
        logits, tokens = args
        return [
            f"{out} = F.cross_entropy(",
            f"    {logits}[:, :-1].reshape(-1, {logits}.shape[-1]).float(), {tokens}[:, 1:].reshape(-1)",
            ")",
        ]


@register
class CrossEntropy(OpDef):
    """Mean cross-entropy of logits [..., C] against integer labels [...], over the labels that are not
    `ignore_index` (masked LM: -100 where a token is not masked)."""

    name = "cross_entropy"
    inputs = ("logits", "labels")
    attrs = {"ignore_index": A(int, -100)}
    is_loss = True

    def dtype(self, attrs, dtypes, span):
        if dtypes[0] != "float" or dtypes[1] != "long":
            raise SpecError("cross_entropy takes float logits and integer labels (`Tokens`), got "
                            f"{dtypes[0]} logits and {dtypes[1]} labels", span)
        return "float"

    def infer(self, node, ins, graph):
        logits, labels = ins
        if len(logits) < 2 or len(labels) != len(logits) - 1 or not all(
                dims.same(a, b) for a, b in zip(logits, labels)):
            raise SpecError(f"cross_entropy expects logits [..., C] and labels [...] of the same leading dims, got "
                            f"{fmt_shape(logits)} and {fmt_shape(labels)}", node.span)
        return ()

    def forward(self, node, args, out, mod, ins):
        logits, labels = args
        return [f"{out} = F.cross_entropy({logits}.reshape(-1, {logits}.shape[-1]).float(), {labels}.reshape(-1), "
                f"ignore_index={node.attrs['ignore_index']!r})"]


@register
class MSE(OpDef):
    name = "mse"
    inputs = ("pred", "target")
    attrs = {}
    is_loss = True

    def dtype(self, attrs, dtypes, span):
        if "float" not in dtypes[:1] or dtypes[1] == "bool":
            raise SpecError("mse compares float predictions with a numeric target", span)
        return "float"

    def infer(self, node, ins, graph):
        pred, target = ins
        if len(pred) != len(target) or not all(dims.same(a, b) for a, b in zip(pred, target)):
            raise SpecError(f"mse compares tensors of one shape, got {fmt_shape(pred)} and {fmt_shape(target)}",
                            node.span)
        return ()

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = F.mse_loss({args[0]}.float(), {args[1]}.float())"]
