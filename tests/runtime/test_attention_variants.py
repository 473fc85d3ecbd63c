"""Attention variants (window, sinks, prefix, cross-attention) and their kernels.

Every kernel in archc.kernels.attention is checked against `attention_math`, the
explicit-mask reference, on random inputs (outputs and gradients of q, k, v),
and the mask that reference uses is checked against a plain Python loop over
(query, key) pairs written from the definitions in GRAMMAR.md. flex_attention
has no backward on the CPU, so there only its forward is compared.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

import archc
from archc.compiler import analysis
from archc.kernels import attention as A
from archc.runtime.functional import RotaryEmbedding


def loop_mask(t: int, s: int, *, causal: bool, window=None, sinks: int = 0, prefix: int = 0) -> torch.Tensor:
    """The mask from the definitions, one pair at a time (query i sits at position i + s - t)."""
    mask = torch.zeros(t, s, dtype=torch.bool)
    for i in range(t):
        p = i + s - t
        for j in range(s):
            if causal:
                seen = j <= p and (window is None or j > p - window)
                seen = seen or (j < sinks and j <= p)
            else:
                seen = window is None or abs(p - j) < window
                seen = seen or j < sinks
            seen = seen or (p < prefix and j < prefix)
            mask[i, j] = seen
    return mask


# (T, S, H, K, mask options): lengths 1, windows of 1, not dividing T, >= T, several local blocks,
# grouped- and multi-query heads, keys longer and shorter than queries.
CASES = [
    (13, 13, 4, 2, dict(causal=True)),
    (13, 13, 4, 2, dict(causal=False)),
    (13, 13, 4, 2, dict(causal=True, window=1)),
    (13, 13, 4, 2, dict(causal=True, window=5)),
    (13, 13, 4, 1, dict(causal=True, window=20)),
    (13, 13, 4, 2, dict(causal=False, window=3)),
    (13, 13, 4, 2, dict(causal=True, window=4, sinks=2)),
    (13, 13, 2, 2, dict(causal=False, window=2, sinks=3)),
    (13, 13, 4, 2, dict(causal=True, prefix=5)),
    (13, 13, 4, 2, dict(causal=True, window=2, sinks=1, prefix=6)),
    (1, 1, 4, 2, dict(causal=True, window=1)),
    (1, 1, 4, 2, dict(causal=True)),
    (150, 150, 2, 1, dict(causal=True, window=70, sinks=3)),  # blocks of 128: two, the last partial
    (130, 130, 2, 2, dict(causal=False, window=9)),  # blocks of 64
    (5, 11, 4, 2, dict(causal=False)),  # cross-attention
    (5, 11, 4, 2, dict(causal=True, window=3)),
    (9, 4, 4, 2, dict(causal=True, window=2)),  # queries past the keys: the first see nothing
]
IDS = [f"T{t}-S{s}-H{h}K{k}-" + "-".join(f"{n}{v}" for n, v in o.items()) for t, s, h, k, o in CASES]


def tensors(t, s, h, k, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1 if t == 1 else 2, n, length, d, generator=g).requires_grad_()
            for n, length in ((h, t), (k, s), (k, s))]


def forward_backward(fn, q, k, v, **opts):
    for x in (q, k, v):
        x.grad = None
    out = fn(q, k, v, **opts)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out * weight).sum().backward()
    return out.detach(), [x.grad.clone() for x in (q, k, v)]


@pytest.mark.parametrize("t, s, h, k, opts", CASES, ids=IDS)
def test_reference_mask_is_the_definition(t, s, h, k, opts):
    assert torch.equal(A.attention_mask(t, s, **opts), loop_mask(t, s, **opts))


@pytest.mark.parametrize("t, s, h, k, opts", CASES, ids=IDS)
def test_reference_is_softmax_over_the_visible_keys(t, s, h, k, opts):
    """attention_math against a per-query loop: each query averages only its visible values."""
    q, kk, v = (x.detach() for x in tensors(t, s, h, k))
    out = A.attention_math(q, kk, v, **opts)
    mask = loop_mask(t, s, **opts)
    group = h // k
    for b in range(q.shape[0]):
        for head in range(h):
            for i in range(t):
                keys = mask[i].nonzero().flatten()
                if len(keys) == 0:
                    assert torch.equal(out[b, head, i], torch.zeros(q.shape[-1]))
                    continue
                scores = kk[b, head // group, keys] @ q[b, head, i] / q.shape[-1] ** 0.5
                want = torch.softmax(scores, 0) @ v[b, head // group, keys]
                torch.testing.assert_close(out[b, head, i], want, atol=1e-5, rtol=1e-5)


def _kernels(opts):
    kernels = {"sdpa_mask": A.attention_sdpa_mask, "auto": A.attention_auto}
    if opts.get("window") is not None:
        kernels["local"] = A.attention_local
    return kernels


@pytest.mark.parametrize("t, s, h, k, opts", CASES, ids=IDS)
def test_every_kernel_matches_the_reference_with_gradients(t, s, h, k, opts):
    q, kk, v = tensors(t, s, h, k)
    want, want_grads = forward_backward(A.attention_math, q, kk, v, **opts)
    for name, fn in _kernels(opts).items():
        got, grads = forward_backward(fn, q, kk, v, **opts)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=name)
        for what, g, w in zip("qkv", grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"{name}: grad of {what}")


FLEX = [3, 7, 9, 10, 13, 15, 16]  # building a BlockMask takes ~0.5 s on the CPU: a subset of every kind


@pytest.mark.parametrize("t, s, h, k, opts", [CASES[i] for i in FLEX], ids=[IDS[i] for i in FLEX])
def test_flex_forward_matches_the_reference(t, s, h, k, opts):
    q, kk, v = (x.detach() for x in tensors(t, s, h, k))
    torch.testing.assert_close(A.attention_flex(q, kk, v, **opts), A.attention_math(q, kk, v, **opts),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", [dict(causal=True), dict(causal=False)])
def test_plain_masks_match_sdpa(opts):
    q, kk, v = tensors(13, 13, 4, 2)
    want = forward_backward(A.attention_math, q, kk, v, **opts)
    got = forward_backward(lambda q, k, v, causal: F.scaled_dot_product_attention(
        q, k, v, is_causal=causal, enable_gqa=True), q, kk, v, **opts)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_local_with_any_block_size_matches():
    q, kk, v = tensors(37, 37, 2, 1)
    opts = dict(causal=True, window=6, sinks=2, prefix=3)
    want = forward_backward(A.attention_math, q, kk, v, **opts)
    for block in (1, 5, 6, 7, 37, 64):
        got = forward_backward(lambda *a, **o: A.attention_local(*a, block=block, **o), q, kk, v, **opts)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"block {block}")


def test_auto_resolves_by_mask_and_device_on_the_cpu():
    q = torch.zeros(1, 2, 16, 8)
    assert A.resolve(q, q, causal=True) == "sdpa"
    assert A.resolve(q, q, causal=True, window=4) == "local"
    assert A.resolve(q, q, causal=True, window=16, sinks=2) == "sdpa"  # the window reaches every key
    assert A.resolve(q, q, causal=False, window=16) == "sdpa"
    assert A.resolve(q, q, causal=False, window=15) == "local"
    assert A.resolve(q, q, causal=True, prefix=4) == "sdpa_mask"
    assert A.resolve(q, q[:, :, :9], causal=True) == "sdpa_mask"  # is_causal would align at the start


def test_flex_refuses_dropout_and_cpu_backward_clearly():
    q, kk, v = tensors(8, 8, 2, 2)
    with pytest.raises(ValueError, match="no attention dropout"):
        A.attention_flex(q, kk, v, causal=True, window=2, dropout_p=0.1)
    with pytest.raises(RuntimeError, match="no backward on the CPU"):
        A.attention_flex(q, kk, v, causal=True, window=2)


def test_rope_aligns_queries_and_keys_at_their_ends():
    rope = RotaryEmbedding(8)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 11, 8, generator=g), torch.randn(1, 2, 11, 8, generator=g)
    q_all, k_all = rope(q, k)
    q_end, k_same = rope(q[:, :, 6:], k)  # 5 queries, the last 5 positions of 11 keys
    torch.testing.assert_close(q_end, q_all[:, :, 6:])
    torch.testing.assert_close(k_same, k_all)
    q_same, k_end = rope(q, k[:, :, 7:])  # fewer keys than queries
    torch.testing.assert_close(q_same, q_all)
    torch.testing.assert_close(k_end, k_all[:, :, 7:])


# ---- compiled specs --------------------------------------------------------------------------------

WINDOWED = """
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 50, 32)
    x += attention(rms_norm(x), heads=4, kv_heads=2, rope=true, window=3, sinks=1) as local_attn
    x += attention(rms_norm(x), heads=4, prefix=4) as prefix_attn
    x += attention(rms_norm(x), heads=2) as full_attn
    y = linear(x, 50)
    return y
}
"""


def _core(compiled, scope):
    return next(n for n in compiled.ir.nodes() if n.op == "attention_core" and n.scope == scope)


def test_default_kernels_and_the_generated_call():
    compiled = archc.compile(WINDOWED, name="t.arch")
    assert _core(compiled, "local_attn").attrs["kernel"] == "auto"
    assert "window=3, sinks=1" in _core(compiled, "local_attn").attrs["kernel_reason"]
    assert _core(compiled, "prefix_attn").attrs["kernel"] == "auto"
    assert _core(compiled, "full_attn").attrs["kernel"] == "sdpa"
    lines = compiled.source.splitlines()
    call = next(i for i, line in enumerate(lines) if "AF.attention_auto(" in line)
    assert lines[call - 1].strip().startswith("# kernel: auto — causal, window=3, sinks=1: at run time")
    assert lines[call].strip() == "y = AF.attention_auto(q_BHTd, k_BKTd, v_BKTd, causal=True, window=3, sinks=1)"


@pytest.mark.parametrize("kernel", ["local", "flex", "sdpa_mask", "math", "auto"])
def test_each_kernel_choice_gives_the_same_module_output(kernel):
    reference = archc.compile(WINDOWED, name="t.arch", kernels={"attention": "math"}).build().eval()
    compiled = archc.compile(WINDOWED, name="t.arch", kernels={"attention": kernel})
    if kernel != "local":  # local fits only the windowed layer; the others keep their default
        assert all(n.attrs["kernel"] == kernel for n in compiled.ir.nodes() if n.op == "attention_core")
    model = compiled.build().eval()
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)["y"], reference(tokens)["y"], atol=1e-5, rtol=1e-5)


def test_sliding_window_spec_trains_a_step_on_the_cpu_kernel():
    compiled = archc.compile(SPECS / "sliding_window.arch", d_model=32, n_heads=2, n_kv_heads=1, d_ff=64, window=8)
    kernels = [n.attrs["kernel"] for n in compiled.ir.nodes() if n.op == "attention_core"]
    assert kernels == ["auto", "auto", "auto", "sdpa"]
    torch.manual_seed(0)
    model = compiled.build()
    loss = model(torch.randint(0, 256, (2, 40)))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters())


CROSS = """
model M(x: Tensor[B, T, 32], memory: Tensor[B, S, 48]) {
    y = cross_attention(x, memory, heads=4, kv_heads=2, rope=ROPE)
    return y
}
"""


@pytest.mark.parametrize("rope", ["false", "true"])
def test_cross_attention_reads_keys_of_another_length_and_width(rope):
    text = CROSS.replace("ROPE", rope)
    compiled = archc.compile(text, name="t.arch")
    core = next(n for n in compiled.ir.nodes() if n.op == "attention_core")
    assert not core.attrs["causal"] and core.attrs["kernel"] == "sdpa"
    assert "k_BKSd" in compiled.source and "nn.Linear(48, 32, bias=False)" in compiled.source  # fused k, v
    math = archc.compile(text, name="t.arch", kernels={"attention": "math"}).build()
    model = compiled.build()
    math.load_state_dict(model.state_dict())
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 48)
    out = model(x=x, memory=memory)["y"]
    assert out.shape == (2, 5, 32)
    torch.testing.assert_close(out, math(x=x, memory=memory)["y"], atol=1e-5, rtol=1e-5)


def test_causal_cross_attention_avoids_is_causal():
    compiled = archc.compile(CROSS.replace("rope=ROPE", "causal=true"), name="t.arch")
    core = next(n for n in compiled.ir.nodes() if n.op == "attention_core")
    assert core.attrs["kernel"] == "auto" and "keys of another length" in core.attrs["kernel_reason"]
    with pytest.raises(archc.SpecError, match="aligns queries with the first keys"):
        archc.compile(CROSS.replace("rope=ROPE", "causal=true"), name="t.arch", kernels={"attention": "sdpa"})


# ---- FLOPs ----------------------------------------------------------------------------------------


def test_windowed_attention_flops_grow_linearly_and_the_summary_says_so():
    compiled = archc.compile(SPECS / "sliding_window.arch", global_every=100)  # every layer windowed
    sizes = [analysis.sizes_for(compiled.ir, 2, t) for t in (256, 512, 1024)]
    cores = [n for n in compiled.ir.nodes() if n.op == "attention_core"]
    flops = [sum(analysis.node_cost(compiled.ir, n, s)[1] for n in cores) for s in sizes]
    assert flops[1] == 2 * flops[0] and flops[2] == 4 * flops[0]
    a = cores[0].attrs
    assert flops[0] == len(cores) * 4 * 2 * 256 * a["window"] * a["heads"] * a["head_dim"]
    text = compiled.summary(batch=2, seq=256)
    assert "(x2.00), 1024:" in text and "4 windowed (linear in T), 0 full" in text
    assert "attention kernel    auto for 4 layer(s): causal, window=64" in text


def test_window_wider_than_the_sequence_counts_every_key():
    compiled = archc.compile(SPECS / "sliding_window.arch", window=4096, global_every=100)
    full = archc.compile(SPECS / "sliding_window.arch", global_every=1)
    assert compiled.flops(1, 256) == full.flops(1, 256)


# ---- CUDA: compiled flex_attention with its backward (run by benchmarks/gpu.sh) ----------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("t, s, h, k, opts", [CASES[i] for i in FLEX], ids=[IDS[i] for i in FLEX])
def test_cuda_kernels_match_the_reference_with_gradients(t, s, h, k, opts):
    q, kk, v = (x.detach().cuda().requires_grad_() for x in tensors(t, s, h, k, d=16))
    assert A.resolve(q, kk, **opts) in ("flex", "sdpa")
    want, want_grads = forward_backward(A.attention_math, q, kk, v, **opts)
    for name, fn in {"flex": A.attention_flex, "auto": A.attention_auto, **_kernels(opts)}.items():
        got, grads = forward_backward(fn, q, kk, v, **opts)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3, msg=name)
        for what, g, w in zip("qkv", grads, want_grads):
            torch.testing.assert_close(g, w, atol=2e-3, rtol=2e-3, msg=f"{name}: grad of {what}")
