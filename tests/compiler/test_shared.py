"""Shared weights: `as label shared` makes every call so labelled in one body one module.

Regression for issue "A language, not a menu": `x = Layer(x) as shared_layer` inside `repeat` was accepted
and ignored, building a layer per step. Now the label alone is an error (tests/dsl/test_resolve.py) and
`as layer shared` builds one layer that every step calls.
"""

from __future__ import annotations

import pytest
import torch

import archc
from archc.runtime.mixers import can_decode

LAYER = """
param d: int = 64
param n: int = 4
block Layer(x: Tensor[B, T, d]) {
    x += attention(layer_norm(x), heads=4, causal=false)
    x += mlp(layer_norm(x), hidden=4 * d)
    return x
}
"""

ALBERT = LAYER + """
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 256, d) as embed
    repeat i in 0..n {
        x = Layer(x) as layer shared
    }
    return x
}
"""

SEPARATE = LAYER + """
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 256, d) as embed
    repeat i in 0..n as layers {
        x = Layer(x)
    }
    return x
}
"""


def test_a_layer_shared_across_repeat_steps_has_the_parameters_of_one():
    one_layer = archc.compile(SEPARATE, name="t.arch", n=1).num_params()
    shared = archc.compile(ALBERT, name="t.arch")
    assert shared.num_params() == one_layer == 66_112
    assert archc.compile(SEPARATE, name="t.arch").num_params() == 256 * 64 + 4 * (one_layer - 256 * 64)
    model = shared.build()
    assert sum(p.numel() for p in model.parameters()) == shared.num_params()
    assert sorted({k.split(".")[0] for k in model.state_dict()}) == ["embed", "layer"]
    assert "self.layer = Layer()" in shared.source
    assert "for _ in range(4):\n            x = self.layer(x)" in shared.source


def test_a_shared_layer_computes_the_layer_applied_at_every_step():
    torch.manual_seed(0)
    model = archc.compile(ALBERT, name="t.arch").build()
    tokens = torch.randint(0, 256, (2, 7))
    want = model.embed(tokens)
    for _ in range(4):
        want = model.layer(want)
    torch.testing.assert_close(model(tokens)["x"], want)
    # and gradients from every step reach the one layer
    model(tokens)["x"].sum().backward()
    assert model.layer.mlp.fc.weight.grad.abs().sum() > 0


def test_an_embedding_shared_across_a_body_is_one_table():
    compiled = archc.compile("""
model M(src: Tokens[B, S], tgt: Tokens[B, T]) {
    x = embedding(src, 100, 32) as embed shared
    y = embedding(tgt, 100, 32) as embed shared
    logits = linear(y, 100, bias=false, tie=embed)
    return x, logits
}
""", name="t.arch")
    assert compiled.num_params() == 100 * 32
    model = compiled.build()
    assert list(model.state_dict()) == ["embed.weight"]
    src, tgt = torch.randint(0, 100, (2, 3)), torch.randint(0, 100, (2, 5))
    out = model(src, tgt)
    torch.testing.assert_close(out["x"], model.embed.weight[src])
    torch.testing.assert_close(out["logits"], model.embed.weight[tgt] @ model.embed.weight.T)


def test_shared_modules_survive_dead_code_elimination_whole():
    # the first call's value is unused: its module must still be made, for the call that is used
    compiled = archc.compile("""
model M(src: Tokens[B, S], tgt: Tokens[B, T]) {
    x = embedding(src, 100, 32) as embed shared
    y = embedding(tgt, 100, 32) as embed shared
    return y
}
""", name="t.arch")
    assert compiled.num_params() == 100 * 32
    assert compiled.build()(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))["y"].shape \
        == (1, 3, 32)


def test_a_shared_causal_layer_refuses_to_decode_by_name():
    compiled = archc.compile(ALBERT.replace("causal=false", "causal=true"), name="t.arch")
    assert "cannot_decode = 'a shared module called several times per token" in compiled.source
    assert not can_decode(compiled.build())


@pytest.mark.parametrize("body, where, phrase", [
    ("    a = linear(x, 64) as p shared\n    b = linear(x, 32) as p shared\n    return a, b",
     (2, 9), "the shared module `p` was made with out=64; every call of it repeats its arguments"),
    ("    a = linear(x, 64) as p shared\n    b = linear(linear(x, 32), 64) as p shared\n    return a, b",
     (2, 9), "needs its weight p.weight as [64, 32], but the first call made it [64, 64]"),
    ("    repeat i in 0..2 {\n        x = Layer(x) as layer shared\n        x = linear(x, 64) as proj\n    }\n"
     "    return x", (3, 13), "a `repeat` step that calls the shared module `layer` cannot make a module of its own"),
    ("    repeat i in 0..2 as blocks {\n        x = Layer(x) as layer shared\n    }\n    return x",
     (1, 5), "`as blocks` names the list of a `repeat`'s modules, but these steps reuse the shared module"),
    ("    a = relu(x) as r shared\n    b = relu(a) as r shared\n    return b", (1, 9),
     "`relu` makes no module, so `shared` has nothing to share"),
    ("    a = Layer(x) as l shared\n    b = Layer(linear(x, 32)) as l shared\n    return a, b", (2, 9),
     "this call of the shared module `l` needs its weight proj.weight as [64, 32]"),
])
def test_shared_calls_that_cannot_be_one_module_are_located_errors(body, where, phrase):
    text = ("block Layer(x: Tensor[B, T, D]) {\n    return linear(x, 64) as proj\n}\n"
            f"model M(x: Tensor[B, T, 64]) {{\n{body}\n}}\n")
    with pytest.raises(archc.SpecError) as info:
        archc.compile(text, name="bad.arch")
    err = info.value
    assert phrase in err.message, err.render()
    assert (err.span.line - 4, err.span.column) == where, err.render()  # line 1: the model's first statement


def test_a_kernel_chosen_for_a_shared_module_holds_for_every_call():
    compiled = archc.compile(ALBERT, name="t.arch", kernels={"layer.attn": "math"})
    assert [n.attrs["kernel"] for n in compiled.ir.nodes() if n.op == "attention_core"] == ["math"] * 4
    assert compiled.source.count("AF.attention_math(") == 1


def test_calls_a_shared_module_cannot_serve_with_one_code_are_a_located_error():
    with pytest.raises(archc.SpecError) as info:
        archc.compile("model M(x: Tensor[B, T, 16], m1: Tensor[B, T, 16], m2: Tensor[B, S, 16]) {\n"
                      "    a = cross_attention(x, m1, heads=4) as cross shared\n"
                      "    b = cross_attention(x, m2, heads=4) as cross shared\n    return a, b\n}\n", name="bad.arch")
    assert "would run other code than its first call" in info.value.message
    assert info.value.span.line == 3 and info.value.notes[0][1].line == 2
