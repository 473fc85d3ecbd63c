"""Linear-attention mixers in the compiler: numerics vs per-token loops, decoding, kernels, analysis, specs.

Each mixer layer's compiled module is checked against a plain per-token
recurrence written here from the papers' equations (docs/algorithms.md §3), using
the module's own weights — forward and gradients. Recurrent decoding must give
the logits of the whole sequence. Shapes are tiny; the file runs in well under
a minute on two cores.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

import archc
from archc.compiler import analysis
from archc.interop.weights import fused_layout, load_canonical, to_canonical
from archc.runtime.mixers import MixerCore, generate_recurrent, recurrent
from archc.training.optim import build_optimizer

D = 32
LAYER = """
model M(x: Tensor[B, T, 32]) {
    y = %s as mixer
    return y
}
"""
MIXERS = {
    "linear_attn": "linear_attn(x, heads=2, chunk=16)",
    "linear_attn_relu_unnormalised": 'linear_attn(x, heads=4, feature="relu", normalize=false, chunk=16)',
    "ssd": "ssd(x, heads=4, state=8, chunk=16)",
    "ssd_groups_no_norm": "ssd(x, heads=4, head_dim=8, state=8, groups=2, norm=false, expand=1, chunk=16)",
    "gated_deltanet": "gated_deltanet(x, heads=2, head_dim=8, chunk=16)",
    "gated_deltanet_sigmoid_negeig":
        'gated_deltanet(x, heads=2, gate="sigmoid", neg_eigval=true, expand_v=1, chunk=16)',
    "kda": "kda(x, heads=2, head_dim=8, chunk=16)",
    "kda_safe_gate_no_conv": "kda(x, heads=2, head_dim=8, conv=0, safe_gate=true, rank=4, chunk=16)",
}


def build(call: str, fuse: bool = True, **kernels):
    compiled = archc.compile(LAYER % call, name="mixer.arch", kernels=kernels or None,
                             disable=() if fuse else ("fuse_projections",))
    torch.manual_seed(0)
    model = compiled.build()
    with torch.no_grad():  # move every weight off its init so that gates, decays and biases all matter
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith(("dt_bias", "A_log")) else 0.15))
    return compiled, model


# ---- per-token references, from the equations -------------------------------------------------------


def conv_silu(u, weight, bias=None):
    """Causal depthwise conv, one token at a time: y_t = sum_j w_j u_{t-K+1+j}; then SiLU."""
    if weight is None:
        return F.silu(u)
    K = weight.shape[-1]
    w = weight[:, 0, :]  # [C, K]
    out = []
    for t in range(u.shape[1]):
        acc = torch.zeros_like(u[:, 0])
        for j in range(K):
            s = t - (K - 1) + j
            if s >= 0:
                acc = acc + w[:, j] * u[:, s]
        out.append(acc if bias is None else acc + bias)
    return F.silu(torch.stack(out, dim=1))


def rms(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def ref_linear_attn(m, x):
    c = m.mixer.core
    H, K = c.heads, c.head_dim
    phi = {"elu1": lambda t: F.elu(t) + 1, "relu": F.relu}[c.feature]
    q, k, v = (lin(x).unflatten(-1, (H, -1)) for lin in (m.mixer.q, m.mixer.k, m.mixer.v))
    q, k = phi(q), phi(k)
    S = x.new_zeros(x.shape[0], H, K, v.shape[-1])
    z = x.new_zeros(x.shape[0], H, K)
    ys = []
    for t in range(x.shape[1]):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = z + k[:, t]
        num = torch.einsum("bhk,bhkv->bhv", q[:, t], S)
        if c.normalize:
            ys.append(num / (torch.einsum("bhk,bhk->bh", q[:, t], z)[..., None] + c.eps))
        else:
            ys.append(num / math.sqrt(K))
    return m.mixer.o(torch.stack(ys, 1).flatten(-2))


def ref_ssd(m, x):
    mx, c = m.mixer, m.mixer.core
    H, P, G, N = c.heads, c.head_dim, c.groups, c.state_dim
    z, xs, b, cc, dt = (lin(x) for lin in (mx.z, mx.x, mx.b, mx.c, mx.dt))
    conv = c.conv1d
    xbc = conv_silu(torch.cat([xs, b, cc], -1), None if conv is None else conv.weight,
                    None if conv is None else conv.bias)
    xs, b, cc = xbc.split([H * P, G * N, G * N], -1)
    xs, b, cc = xs.unflatten(-1, (H, P)), b.unflatten(-1, (G, N)), cc.unflatten(-1, (G, N))
    b, cc = b.repeat_interleave(H // G, 2), cc.repeat_interleave(H // G, 2)
    dt = F.softplus(dt + c.dt_bias)
    A = -torch.exp(c.A_log)
    h = x.new_zeros(x.shape[0], H, P, N)
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        h = decay * h + (dt[:, t, :, None] * xs[:, t])[..., None] * b[:, t, :, None, :]
        y = torch.einsum("bhpn,bhn->bhp", h, cc[:, t])
        if c.D is not None:
            y = y + c.D[:, None] * xs[:, t]
        ys.append(y)
    y = torch.stack(ys, 1).flatten(-2) * F.silu(z)
    if c.norm is not None:
        y = rms(y.unflatten(-1, (G, -1)), 1.0, c.norm.eps).flatten(-2) * c.norm.weight
    return mx.o(y)


def ref_delta(m, x, kda: bool, call: str):
    mx, c = m.mixer, m.mixer.core
    H, K, V = c.heads, c.head_dim, c.value_dim
    q, k, v, b = mx.q(x), mx.k(x), mx.v(x), mx.b(x)
    conv = (lambda name: getattr(c, name).weight) if c.conv else (lambda name: None)
    q, k, v = conv_silu(q, conv("q_conv1d")), conv_silu(k, conv("k_conv1d")), conv_silu(v, conv("v_conv1d"))
    q, k, v = q.unflatten(-1, (H, K)), k.unflatten(-1, (H, K)), v.unflatten(-1, (H, V))
    q = q / torch.sqrt(q.square().sum(-1, keepdim=True) + 1e-6)
    k = k / torch.sqrt(k.square().sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(b) * (2.0 if "neg_eigval=true" in call else 1.0)
    if kda:
        f = (mx.f_up(mx.f(x)) + c.dt_bias).unflatten(-1, (H, K))
        rate = torch.exp(c.A_log)[:, None]
        g = c.lower_bound * torch.sigmoid(rate * f) if c.safe_gate else -rate * F.softplus(f)  # [B, T, H, K]
        gate = torch.sigmoid(mx.g_up(mx.g(x)))
    else:
        g = (-torch.exp(c.A_log) * F.softplus(mx.a(x) + c.dt_bias))[..., None]  # [B, T, H, 1]
        gate = torch.sigmoid(mx.g(x)) if 'gate="sigmoid"' in call else F.silu(mx.g(x))
    S = x.new_zeros(x.shape[0], H, K, V)
    ys = []
    for t in range(x.shape[1]):
        S = torch.exp(g[:, t])[..., None] * S  # decay the key rows
        err = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t])
        S = S + k[:, t, :, :, None] * (beta[:, t, :, None] * err)[:, :, None, :]
        ys.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]) / math.sqrt(K))
    o = rms(torch.stack(ys, 1), c.o_norm.weight, c.o_norm.eps)
    return mx.o((o * gate.unflatten(-1, (H, V))).flatten(-2))


def reference(name, call, m, x):
    if name.startswith("linear_attn"):
        return ref_linear_attn(m, x)
    if name.startswith("ssd"):
        return ref_ssd(m, x)
    return ref_delta(m, x, name.startswith("kda"), call)


# ---- numerics -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MIXERS))
def test_layer_matches_per_token_recurrence_forward_and_gradients(name):
    call = MIXERS[name]
    _compiled, model = build(call, fuse=False)
    x = torch.randn(2, 37, D, requires_grad=True)  # 37 tokens: three chunks of 16, the last one padded
    y = model(x)["y"]
    y_ref = reference(name, call, model, x)
    torch.testing.assert_close(y, y_ref, rtol=2e-4, atol=2e-5)
    params = [p for p in model.parameters()]
    w = torch.randn_like(y)
    grads = torch.autograd.grad((y * w).sum(), [x, *params], allow_unused=True)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), [x, *params], allow_unused=True)
    names = ["x", *(n for n, _ in model.named_parameters())]
    for n, a, b in zip(names, grads, grads_ref):
        assert a is not None and b is not None, n
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: d/d{n}: {m}")


@pytest.mark.parametrize("name", ["ssd", "gated_deltanet", "kda", "linear_attn"])
def test_fused_projections_give_the_same_layer(name):
    fused, a = build(MIXERS[name])
    plain, b = build(MIXERS[name], fuse=False)
    load_canonical(a, fused, to_canonical(plain, b.state_dict()))
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(a(x)["y"], b(x)["y"], rtol=1e-5, atol=1e-6)
    # one input matmul: Mamba-2's in_proj is [z, x, B, C, dt], FLA's GDN projections are q, k, v, a, b, g
    layout = {"ssd": "mixer.z_x_b_c_dt", "gated_deltanet": "mixer.qkvabg", "kda": "mixer.qkvfbg",
              "linear_attn": "mixer.qkv"}[name]
    assert layout + ".weight" in fused_layout(fused)


@pytest.mark.parametrize("kernel", ["reference", "chunked"])
def test_every_kernel_face_gives_the_same_layer(kernel):
    for call in (MIXERS["gated_deltanet"], MIXERS["kda"], MIXERS["ssd"], MIXERS["linear_attn"]):
        _c, auto = build(call)
        compiled, forced = build(call, mixer=kernel)
        assert f"kernel={kernel!r}" in compiled.source
        x = torch.randn(1, 21, D)
        torch.testing.assert_close(forced(x)["y"], auto(x)["y"], rtol=1e-4, atol=1e-5)


# ---- recurrent decoding -------------------------------------------------------------------------------

SMALL = dict(d_model=32, n_layers=2, n_heads=2, vocab=64)
DECODE = {
    "gated_deltanet": dict(SMALL, head_dim=16, d_ff=48),
    "mamba2": dict(SMALL, d_state=16),
    "linear_attention": dict(SMALL, d_ff=48),
}


@pytest.mark.parametrize("spec", list(DECODE))
def test_token_by_token_decoding_equals_full_sequence_logits(spec):
    compiled = archc.compile(SPECS / f"{spec}.arch", DECODE[spec])
    torch.manual_seed(1)
    model = compiled.build()
    prompt = torch.randint(0, 64, (2, 70))  # longer than one chunk of 64
    tokens, logits = generate_recurrent(model, prompt, steps=5, temperature=1.0, seed=3)
    assert tokens.shape == (2, 75) and logits.shape == (2, 74, 64)
    assert torch.equal(tokens[:, :70], prompt)
    with torch.no_grad():
        full = model(tokens[:, :-1])["logits"]
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
    # the state is reset after decoding: a plain call is unaffected
    assert all(not m.recurrent and m.state is None for m in model.modules() if isinstance(m, MixerCore))


def test_prompt_in_pieces_continues_exactly():
    compiled = archc.compile(SPECS / "gated_deltanet.arch", DECODE["gated_deltanet"])
    model = compiled.build().eval()
    tokens = torch.randint(0, 64, (1, 50))
    with torch.no_grad():
        full = model(tokens)["logits"]
        with recurrent(model):
            pieces = [model(tokens[:, :17])["logits"], model(tokens[:, 17:18])["logits"],
                      model(tokens[:, 18:])["logits"]]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-4)


def test_recurrent_state_size_is_what_the_summary_says():
    compiled = archc.compile(SPECS / "mamba2.arch", DECODE["mamba2"])
    model = compiled.build().eval()
    with torch.no_grad(), recurrent(model):
        model(torch.randint(0, 64, (1, 9)))
        kept = sum(t.numel() for m in model.modules() if isinstance(m, MixerCore)
                   for part in m.state.values() for t in (part if isinstance(part, tuple) else (part,)))
    assert kept == sum(analysis.recurrent_state(compiled.ir).values())


# ---- kernel choice ------------------------------------------------------------------------------------


def test_kernel_choice_is_recorded_in_source_and_overrides_apply_by_path():
    spec = SPECS / "gated_deltanet.arch"
    source = archc.compile(spec).source
    assert source.count("kernel='auto'") == 1  # one class for all layers
    assert "# kernel: auto — at run time: Triton on CUDA, else chunked PyTorch" in source
    forced = archc.compile(spec, kernels={"layers.*.mixer": "reference"})
    assert "kernel='reference'" in forced.source and "# kernel: reference — chosen with --kernel" in forced.source
    one = archc.compile(spec, kernels={"layers.1.mixer": "chunked"})
    kernels = {n.scope: n.attrs["kernel"] for n in one.ir.nodes() if n.op == "gated_deltanet_core"}
    assert kernels == {"layers.0.mixer": "auto", "layers.1.mixer": "chunked", "layers.2.mixer": "auto",
                       "layers.3.mixer": "auto"}
    family = archc.compile(SPECS / "kimi_linear.arch", kernels={"kda": "triton", "attention": "math"})
    assert {(n.op, n.attrs["kernel"]) for n in family.ir.nodes() if "kernel" in n.attrs} == {
        ("kda_core", "triton"), ("attention_core", "math")}


def test_kernel_overrides_that_do_not_fit_are_errors():
    with pytest.raises(archc.SpecError, match="not a kernel of attention"):
        archc.compile(SPECS / "llama.arch", kernels={"attention": "chunked"})
    with pytest.raises(archc.SpecError, match="not a kernel of gated_deltanet"):
        archc.compile(SPECS / "gated_deltanet.arch", kernels={"layers.*.mixer": "math"})
    with pytest.raises(archc.SpecError, match="unknown kernel `chunky`.*"):
        archc.compile(SPECS / "gated_deltanet.arch", kernels={"mixers": "chunky"})
    # `*` applies each kernel where it fits: math to attention only
    compiled = archc.compile(SPECS / "kimi_linear.arch", kernels={"*": "math"})
    assert {n.attrs["kernel"] for n in compiled.ir.nodes() if n.op == "kda_core"} == {"auto"}


def test_heads_too_wide_for_triton_stay_chunked_on_every_device():
    compiled = archc.compile(SPECS / "gated_deltanet.arch", head_dim=160)  # values 320 wide
    (kernel, reason), = {(n.attrs["kernel"], n.attrs["kernel_reason"]) for n in compiled.ir.nodes()
                         if n.op == "gated_deltanet_core"}
    assert kernel == "chunked" and "value_dim=320" in reason


# ---- analysis -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["linear_attention", "mamba2", "gated_deltanet"])
def test_mixer_flops_grow_linearly_and_summary_shows_state(spec):
    compiled = archc.compile(SPECS / f"{spec}.arch")
    f1, f2, f4 = analysis.flops_growth(compiled.ir, 2, 256)
    assert f2 == 2 * f1 and f4 == 4 * f1
    mixer_flops = sum(analysis.node_cost(compiled.ir, n, analysis.sizes_for(compiled.ir, 2, 256))[1]
                      for n in compiled.ir.nodes() if n.op.endswith("_core"))
    assert mixer_flops > 0
    text = compiled.summary(batch=2, seq=256)
    assert re.search(r"^mixers +\d+ \w+ \(linear in T\)$", text, re.M)
    assert re.search(r"^recurrent state +[\d.]+K floats per sequence .*constant in T", text, re.M)
    assert re.search(r"^FLOPs vs seq +T=256: .*512: .*\(x2\.00\), 1024: .*\(x2\.00\)$", text, re.M)


def test_hybrid_summary_shows_attention_growing_quadratically():
    compiled = archc.compile(SPECS / "kimi_linear.arch")
    f1, f2, _f4 = analysis.flops_growth(compiled.ir, 1, 512)
    assert f2 > 2 * f1
    text = compiled.summary(seq=512)
    assert "3 kda (linear in T); 1 attention (quadratic in T)" in text and "KV cache" in text


def test_mixer_flops_are_close_to_what_the_chunked_path_does():
    """The formula counts the chunked form's matmuls; FlopCounterMode sees them (bar the triangular solve)."""
    from torch.utils.flop_counter import FlopCounterMode

    for call in (MIXERS["gated_deltanet"], MIXERS["ssd"], MIXERS["linear_attn"]):
        compiled, model = build(call, mixer="chunked")
        x = torch.randn(2, 64, D)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        assert 0.75 < counter.get_total_flops() / compiled.flops(2, 64) < 1.25, call


# ---- specs --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["linear_attention", "mamba2", "gated_deltanet", "kimi_linear"])
def test_specs_take_an_optimizer_step_with_muon(spec):
    compiled = archc.compile(SPECS / f"{spec}.arch", n_layers=4 if spec == "kimi_linear" else 1, d_model=32,
                             n_heads=2)
    torch.manual_seed(0)
    model = compiled.build()
    roles = compiled.param_roles()
    assert roles["layers.0.mixer.core.A_log"] == "norm" if spec != "linear_attention" else True
    opt = build_optimizer(model, roles, fused_layout(compiled), name="muon", lr=1e-2)
    tokens = torch.randint(0, 256, (2, 24))
    loss = model(tokens)["loss"]
    loss.backward()
    opt.step()
    assert torch.isfinite(model(tokens)["loss"])


def test_mixer_shape_errors_are_located():
    with pytest.raises(archc.SpecError, match="does not split into heads=3") as err:
        archc.compile(LAYER % "ssd(x, heads=3, state=8)", name="bad.arch")
    assert err.value.span is not None
    with pytest.raises(archc.SpecError, match="heads=4 × head_dim=8 = 32 but the inner width"):
        archc.compile(LAYER % "ssd(x, heads=4, head_dim=8, expand=2, state=8)", name="bad.arch")
    with pytest.raises(archc.SpecError, match="`chunk` must be one of 16, 32, 64"):
        archc.compile(LAYER % "kda(x, heads=2, chunk=128)", name="bad.arch")


def test_nsa_position_tables_are_embeddings_not_muon_matrices():
    roles = archc.compile(SPECS / "nsa.arch").param_roles()
    assert roles["layers.0.mixer.core.k_compress.pos"] == "embedding"
    assert roles["layers.0.mixer.core.v_compress.fc1.weight"] == "matrix"
