"""Learned tensors: `learned(shape, init=...)`, a trained tensor of a fixed shape owned by the block it is
written in (LayerScale's gamma, ReZero's alpha, a [CLS] token, learned queries, a static mixing matrix).
Its label is its name in the state dict. `init=` rules for linear and embedding weights live with those
ops (basic.py); the rules themselves are values of the language (scalars.InitRule)."""

from __future__ import annotations

from archc.compiler.dims import Size, sizes_in
from archc.compiler.ops.base import A, OpDef, init_code, register
from archc.compiler.scalars import InitRule
from archc.dsl.diagnostics import SpecError


@register
class Learned(OpDef):
    name = "learned"
    inputs = ()
    attrs = {"shape": A(list), "init": A(InitRule)}
    pure = False

    def infer(self, node, ins, graph):
        shape = node.attrs["shape"]
        if sizes_in(shape) or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise SpecError(f"`learned` needs a fixed shape of positive ints (and parameters), got "
                            f"{[d if not isinstance(d, Size) else 'a size' for d in shape]!r}", node.span,
                            hint="a symbolic dim (B, T) has no size when the weights are made; expand the tensor "
                                 "to it instead: expand(cls, [B, 1, d_model])")
        return tuple(shape)

    def weights(self, node, ins):
        return {"": tuple(node.attrs["shape"])}  # the label itself is the state-dict name

    def roles(self, node):
        # scales and scalars (LayerScale, ReZero) like norm weights; tables (tokens, queries) like embeddings
        return {"": "norm" if len(node.attrs["shape"]) <= 1 else "embedding"}

    def init(self, node, ins):
        return f"AF.learned({tuple(node.attrs['shape'])!r}, {init_code(node.attrs['init'])})"

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}"]
