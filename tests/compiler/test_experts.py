"""Mixtures of experts in the compiler: lowering, fuse_experts, numerics, diagnostics, analysis."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

import archc
from archc.interop.weights import load_canonical, to_canonical

LAYER = """
model M(x: Tensor[B, T, 16]) {
    y = experts(x, n=4, top_k=2, hidden=8, router="%s") as moe
    return y
}
"""


def pair(text: str, **overrides):
    fused = archc.compile(text, overrides, name="moe.arch")
    plain = archc.compile(text, overrides, name="moe.arch", disable=("fuse_experts",))
    torch.manual_seed(0)
    a, b = fused.build(), plain.build()
    load_canonical(a, fused, to_canonical(plain, b.state_dict()))
    return fused, plain, a, b


@pytest.mark.parametrize("router", ["softmax", "switch", "deepseek_v3"])
def test_fused_and_per_expert_loop_agree_forward_and_backward(router):
    fused, plain, a, b = pair(LAYER % router)
    assert "AF.GroupedLinear" in fused.source and "GroupedLinear" not in plain.source
    assert "zip(self.experts" in plain.source
    x = torch.randn(2, 7, 16)
    ya, yb = a(x)["y"], b(x)["y"]
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(ya.square().sum(), list(a.parameters()))
    gb = torch.autograd.grad(yb.square().sum(), list(b.parameters()))
    names_a = [n for n, _ in a.named_parameters()]
    names_b = [n for n, _ in b.named_parameters()]
    ca = to_canonical(fused, dict(zip(names_a, ga)))
    cb = to_canonical(plain, dict(zip(names_b, gb)))
    assert set(ca) == set(cb)
    for name in ca:
        torch.testing.assert_close(ca[name], cb[name], rtol=1e-4, atol=1e-6, msg=name)


def test_moe_layer_matches_a_per_token_loop():
    compiled, _plain, model, _b = pair(LAYER % "softmax")
    weights = to_canonical(compiled, model.state_dict())
    x = torch.randn(3, 5, 16)
    y = model(x)["y"]
    gate_w = weights["moe.router.gate.weight"]
    for b in range(3):
        for t in range(5):
            logits = gate_w @ x[b, t]
            top = logits.topk(2)
            w = torch.softmax(top.values, -1)
            expected = 0
            for j, e in enumerate(top.indices.tolist()):
                p = f"moe.experts.{e}."
                h = F.silu(weights[p + "gate.weight"] @ x[b, t]) * (weights[p + "up.weight"] @ x[b, t])
                expected = expected + w[j] * (weights[p + "down.weight"] @ h)
            torch.testing.assert_close(y[b, t], expected, rtol=1e-5, atol=1e-6)


def test_gated_shared_expert_and_unnormalised_gates_by_hand():
    """Qwen2-MoE's layer: the top 2 of a softmax over 4 experts as they are, plus the shared SwiGLU expert
    times sigmoid(x · w_g)."""
    text = """
    model M(x: Tensor[B, T, 16]) {
        y = experts(x, n=4, top_k=2, hidden=8, norm_topk_prob=false, shared=1, shared_hidden=12,
                    shared_gate=true) as moe
        return y
    }
    """
    compiled = archc.compile(text, name="qwen2_moe_layer.arch")
    torch.manual_seed(0)
    model = compiled.build()
    w = to_canonical(compiled, model.state_dict())
    x = torch.randn(2, 3, 16)

    def swiglu(p, v):
        return w[p + "down.weight"] @ (F.silu(w[p + "gate.weight"] @ v) * (w[p + "up.weight"] @ v))

    y = model(x)["y"]
    for b in range(2):
        for t in range(3):
            v = x[b, t]
            probs = torch.softmax(w["moe.router.gate.weight"] @ v, -1)
            top = probs.topk(2)
            want = sum(p * swiglu(f"moe.experts.{e}.", v) for p, e in zip(top.values, top.indices.tolist()))
            want = want + torch.sigmoid(w["moe.shared_gate.weight"] @ v) * swiglu("moe.shared.", v)
            torch.testing.assert_close(y[b, t], want, rtol=1e-5, atol=1e-6)


def test_fusion_is_skipped_with_a_reason_when_bodies_have_biases():
    text = """
    block Expert(x: Tensor[N, 16], hidden: int = 8) { return mlp(x, hidden=hidden) }
    model M(x: Tensor[B, T, 16]) { y = experts(x, n=3, top_k=1, hidden=8, body=Expert) as moe
    return y }
    """
    compiled = archc.compile(text, name="bias.arch")
    assert "has a bias" in compiled.ir.meta["fuse_experts"]["moe"]
    assert "zip(self.experts" in compiled.source
    no_bias = archc.compile(text.replace("hidden=hidden)", "hidden=hidden, bias=false)"), name="nb.arch")
    assert no_bias.ir.meta["fuse_experts"]["moe"] == "fused"


def test_model_loss_includes_router_aux_losses():
    compiled = archc.compile(str(SPECS / "mixtral.arch"), n_layers=1, d_model=32, n_heads=2, n_kv_heads=1,
                             d_expert=16)
    assert "loss = loss + AF.moe_aux_loss(self)" in compiled.source
    model = compiled.build()
    tokens = torch.randint(0, 256, (2, 9))
    out = model(tokens)
    lm = F.cross_entropy(out["logits"][:, :-1].reshape(-1, 256), tokens[:, 1:].reshape(-1))
    aux = model.layers[0].moe.router.aux_loss
    assert aux.item() > 0
    torch.testing.assert_close(out["loss"], lm + aux)


def test_summary_reports_total_and_active_parameters():
    compiled = archc.compile(str(SPECS / "deepseek_moe.arch"))
    text = compiled.summary(seq=16)
    assert "active params" in text
    expert_params = sum(v.numel() for k, v in compiled.build().state_dict().items() if ".moe.experts." in k)
    assert compiled.num_params() - compiled.active_params() == pytest.approx(expert_params * (1 - 6 / 64), abs=2)


@pytest.mark.parametrize("args,message", [
    ("n=4, top_k=5, hidden=8", "top_k=5 is larger than the number of experts n=4"),
    ("n=4, top_k=2, hidden=8, capacity=0", "the capacity factor must be positive"),
    ("n=6, top_k=2, hidden=8, groups=4", "groups=4 must divide n=6"),
    ("n=4, top_k=2, hidden=8, router=\"switc\"", "did you mean \"switch\""),
    ("n=4, top_k=2, hidden=8, balance=\"aux_free\"", "needs router=\"deepseek_v3\""),
    ("n=4, top_k=2, hidden=8, body=Nope", "`body=` names a block"),
    ("n=4, top_k=2, hiden=8", "did you mean `hidden`"),
    ("n=4, top_k=2, hidden=8, shared_gate=true", "shared_gate=true gates the shared experts, but there are none"),
    ("n=4, top_k=2, hidden=8, norm_topk_prob=1", "`norm_topk_prob` must be"),
])
def test_bad_experts_arguments_are_located_diagnostics(args, message):
    text = f"model M(x: Tensor[B, T, 16]) {{\n    y = experts(x, {args})\n    return y\n}}\n"
    with pytest.raises(archc.SpecError) as err:
        archc.compile(text, name="bad.arch")
    rendered = err.value.render()
    assert message in rendered and "bad.arch:2:" in rendered and "^" in rendered


def test_unfused_moe_spec_snapshot(snapshot_py):
    compiled = archc.compile(str(SPECS / "mixtral.arch"), disable=("fuse_experts",))
    assert compiled.source == snapshot_py
