"""`a @ b`, `einsum` and `arange` (archc/compiler/ops/linalg.py): the shapes the checker gives, the values
against torch, the located errors, and two things papers write with them — attention by hand and CLIP's
contrastive loss — equal to plain PyTorch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import archc


def compiled(text: str, **overrides):
    return archc.compile(text, name="t.arch", **overrides)


def error(text: str) -> archc.SpecError:
    with pytest.raises(archc.SpecError) as info:
        compiled(text)
    return info.value


def shapes(c) -> dict[str, tuple]:
    return {n.var: n.shape for n in c.ir.nodes() if n.var}


PRODUCTS = """
param d: int = 8
model M(x: Tensor[B, T, d], w: Tensor[d, 4], v: Tensor[d], q: Tensor[B, H, T, d], k: Tensor[B, H, S, d]) {
    xw = x @ w
    xv = x @ v
    vw = v @ w
    scores = q @ transpose(k, -2, -1)
    e = einsum("bhtd,bhsd->bhts", q, k)
    summed = einsum("btd->bd", x)
    outer = einsum("i,j->ij", v, v)
    return xw, xv, vw, scores, e, summed, outer
}
"""


def test_products_have_torch_s_shapes_and_values():
    c = compiled(PRODUCTS)
    got = shapes(c)
    assert got["xw"] == ("B", "T", 4) and got["xv"] == ("B", "T") and got["vw"] == (4,)
    assert got["scores"] == ("B", "H", "T", "S") and got["e"] == ("B", "H", "T", "S")
    assert got["summed"] == ("B", 8) and got["outer"] == (8, 8)
    torch.manual_seed(0)
    x, w, v = torch.randn(2, 5, 8), torch.randn(8, 4), torch.randn(8)
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    out = c.build()(x, w, v, q, k)
    want = [x @ w, x @ v, v @ w, q @ k.transpose(-2, -1), torch.einsum("bhtd,bhsd->bhts", q, k), x.sum(1),
            torch.outer(v, v)]
    for got_value, want_value in zip(out.values(), want):
        torch.testing.assert_close(got_value, want_value)
    assert "xw = x @ w" in c.source and "torch.einsum('bhtd,bhsd->bhts', q, k)" in c.source


def test_matmul_flops_are_two_m_n_k():
    c = compiled("""
model M(x: Tensor[B, T, 16], w: Tensor[16, 32]) {
    return x @ w
}""")
    assert c.flops(3, 10) == 2 * 3 * 10 * 16 * 32


def test_arange_gives_positions_for_a_dim_or_a_number():
    c = compiled("""
param n: int = 6
model M(x: Tensor[B, T, 4]) {
    b = arange(B)
    t = arange(T - 1)
    fixed = arange(n)
    return b, t, fixed
}""")
    assert shapes(c)["b"] == ("B",) and shapes(c)["t"] == ("T - 1",) and shapes(c)["fixed"] == (6,)
    model = c.build()
    out = model(torch.zeros(3, 5, 4))
    assert out["b"].tolist() == [0, 1, 2] and out["t"].tolist() == [0, 1, 2, 3] and out["fixed"].tolist() == list(
        range(6))
    assert out["b"].dtype == torch.long and not model.state_dict()  # positions are not weights
    huge = compiled("model M(x: Tensor[B, 4]) {\n    return x + arange(10000000000000)[:1] * 1.0\n}").build()
    assert sum(b.numel() for b in huge.buffers()) == 0  # nothing of size n is made until the model runs
    assert any(type(m).__name__ == "Positions" for m in huge.modules())


ATTENTION_BY_HAND = """
param d_model: int = 32
param heads: int = 4
param head_dim: int = d_model // heads

model Attention(x: Tensor[B, T, d_model]) {
    q = transpose(reshape(linear(x, d_model) as q_proj, [B, T, heads, head_dim]), 1, 2)
    k = transpose(reshape(linear(x, d_model) as k_proj, [B, T, heads, head_dim]), 1, 2)
    v = transpose(reshape(linear(x, d_model) as v_proj, [B, T, heads, head_dim]), 1, 2)
    scores = q @ transpose(k, -2, -1) / sqrt(head_dim)
    causal = unsqueeze(arange(T), 1) >= unsqueeze(arange(T), 0)
    weights = softmax(where(causal, scores, -1e9), dim=-1)
    return linear(reshape(transpose(weights @ v, 1, 2), [B, T, d_model]), d_model) as o_proj
}
"""


def test_attention_written_by_hand_is_sdpa():
    c = compiled(ATTENTION_BY_HAND)
    torch.manual_seed(0)
    model = c.build()
    x = torch.randn(2, 9, 32)
    p = dict(model.named_parameters())

    def heads(t):
        return t.view(2, 9, 4, 8).transpose(1, 2)

    q, k, v = (heads(t) for t in F.linear(x, p["q_proj_k_proj_v_proj.weight"], p["q_proj_k_proj_v_proj.bias"])
               .split(32, dim=-1))  # fuse_projections made the three linears one
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 9, 32)
    want = F.linear(y, p["o_proj.weight"], p["o_proj.bias"])
    torch.testing.assert_close(next(iter(model(x).values())), want, atol=1e-5, rtol=1e-5)


CLIP = """
param d_model: int = 16
param d_embed: int = 8

model Clip(image: Tensor[B, d_model], text: Tensor[B, d_model]) {
    i = linear(image, d_embed, bias=false) as image_proj
    t = linear(text, d_embed, bias=false) as text_proj
    i = i / sqrt(sum(i * i, dim=-1, keepdim=true))
    t = t / sqrt(sum(t * t, dim=-1, keepdim=true))
    logits = exp(learned([], init=constant(2.659)) as logit_scale) * (i @ transpose(t, 0, 1))
    targets = arange(B)
    loss = (cross_entropy(logits, targets) + cross_entropy(transpose(logits, 0, 1), targets)) / 2
    return logits, loss
}
"""


def test_clip_s_contrastive_loss():
    c = compiled(CLIP)
    torch.manual_seed(0)
    model = c.build()
    image, text = torch.randn(5, 16), torch.randn(5, 16)
    out = model(image, text)
    p = dict(model.named_parameters())
    i = F.normalize(image @ p["image_proj.weight"].T, dim=-1)
    t = F.normalize(text @ p["text_proj.weight"].T, dim=-1)
    logits = math.exp(2.659) * i @ t.T
    labels = torch.arange(5)
    torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
    out["loss"].backward()
    assert p["logit_scale"].grad is not None


@pytest.mark.parametrize("body, phrase", [
    ("return x @ y", "cannot multiply [B, T, 8] @ [B, T, 8]: the inner dims differ (8 vs T)"),
    ("return x @ 2.0", "`@` multiplies two tensors, not a tensor and float 2.0"),
    ("return ids @ w", "`@` multiplies float tensors, and an operand holds integers"),
    ('return einsum("btd,de->bte", x)', "names 2 operand(s), the call gives 1"),
    ('return einsum("bt->b", x)', "operand 0 is [B, T, 8] (3 axes) but `bt` names 2"),
    ('return einsum("btd,tb->bt", x, w)', "`t` stands for T and for 8"),
    ('return einsum("btd;x", x)', "is not of the form"),
    ('return einsum("btd->btz", x)', "must name each letter of the inputs at most once"),
    ('return einsum("bii->b", x)', "repeats a letter"),
    ("return arange(0)", "arange needs a positive count, got 0"),
])
def test_bad_products_are_located_errors(body, phrase):
    text = f"""
model M(x: Tensor[B, T, 8], y: Tensor[B, T, 8], w: Tensor[8, 4], ids: Tokens[B, T]) {{
    {body}
}}"""
    err = error(text)
    assert phrase in str(err), str(err)
    assert err.span.line == 3


def test_at_of_numbers_is_an_error():
    err = error("""
param a: int = 2 @ 3
model M(x: Tensor[B, 4]) {
    return x
}""")
    assert "`@` is the matrix product of tensors, not of int and int" in str(err)


DIFFERENTIAL_ATTENTION = """
param d: int = 32
param h: int = 2
param hd: int = 8
model DiffAttn(x: Tensor[B, T, d]) {
    q1, q2 = chunk(transpose(reshape(linear(x, 2 * h * hd) as wq, [B, T, h, 2 * hd]), 1, 2), 2, dim=-1)
    k1, k2 = chunk(transpose(reshape(linear(x, 2 * h * hd) as wk, [B, T, h, 2 * hd]), 1, 2), 2, dim=-1)
    v = transpose(reshape(linear(x, 2 * h * hd) as wv, [B, T, h, 2 * hd]), 1, 2)
    lam = exp(sum(learned([hd], init=normal(0.1)) as lq1 * learned([hd], init=normal(0.1)) as lk1, dim=0))
    causal = unsqueeze(arange(T), 1) >= unsqueeze(arange(T), 0)
    a1 = softmax(where(causal, q1 @ transpose(k1, -2, -1) / sqrt(hd), -1e9), dim=-1)
    a2 = softmax(where(causal, q2 @ transpose(k2, -2, -1) / sqrt(hd), -1e9), dim=-1)
    o = (a1 - lam * a2) @ v
    angles = cos(arange(T) * 0.5) + sin(arange(T) * cos(0.0))
    return o, angles
}
"""


def test_differential_attention_and_sin_cos_by_hand():
    c = compiled(DIFFERENTIAL_ATTENTION)
    torch.manual_seed(0)
    model = c.build()
    x = torch.randn(2, 6, 32)
    out = model(x)
    p = dict(model.named_parameters())
    proj = F.linear(x, p["wq_wk_wv.weight"], p["wq_wk_wv.bias"]).split(32, dim=-1)
    q, k, v = (t.view(2, 6, 2, 16).transpose(1, 2) for t in proj)
    lam = torch.exp((p["lq1"] * p["lk1"]).sum())
    a1 = torch.softmax((q[..., :8] @ k[..., :8].transpose(-2, -1) / math.sqrt(8)).masked_fill(
        ~torch.ones(6, 6, dtype=torch.bool).tril(), -1e9), -1)
    a2 = torch.softmax((q[..., 8:] @ k[..., 8:].transpose(-2, -1) / math.sqrt(8)).masked_fill(
        ~torch.ones(6, 6, dtype=torch.bool).tril(), -1e9), -1)
    torch.testing.assert_close(out["o"], (a1 - lam * a2) @ v, atol=1e-5, rtol=1e-5)
    t = torch.arange(6)
    torch.testing.assert_close(out["angles"], torch.cos(t * 0.5) + torch.sin(t * 1.0))
