"""The attention knobs of the released families, each against a plain reference written here from its
definition (and, where transformers has the piece, against transformers' own function):

- scores: `scale`, `softcap` (Gemma 2), position biases ALiBi (BLOOM's slopes) and T5's bucketed table,
  in every kernel that can apply them, and refused by the ones that cannot;
- RoPE: partial rotary (`rope_dim`), Llama 3.1's and YaRN's frequency scaling;
- projections: full-width q/k RMSNorm (OLMo-2) and the output gate (Qwen3-Next);
- decoding token by token from the KV cache (windowed or not) with all of them;
- the kernel choice (and its reasons), and located errors for bad values.

Whole-model parity with transformers is in test_hf_families.py (Gemma 2, OLMo-2, GPT-NeoX, BLOOM,
Llama with llama3 / YaRN scaling).
"""

from __future__ import annotations

import math

import pytest
import torch

import archc
from archc.dsl.diagnostics import SpecError
from archc.interop.weights import load_canonical, to_canonical
from archc.kernels import attention as A
from archc.runtime.mixers import recurrent
from archc.runtime.position_bias import ALiBi, RelativePositionBias, alibi_slopes, relative_bucket
from archc.runtime.rope import Llama3RopeScaling, RotaryEmbedding, YarnRopeScaling

# ---- the score modifications, from their definitions ---------------------------------------------------


def reference(q, k, v, *, causal, window=None, scale=None, softcap=None, bias=None):
    """One (head, query, key) at a time: score = scale·q·k, s·tanh(score/s), + bias(h, i, j), the causal /
    window mask, softmax, the weighted values. Queries sit at the end of the keys."""
    B, H, T, d = q.shape
    K, S = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh = h // (H // K)
            for i in range(T):
                p = i + S - T
                scores, values = [], []
                for j in range(S):
                    if causal and j > p or window is not None and (p - j >= window if causal else abs(p - j) >= window):
                        continue
                    score = scale * float(q[b, h, i] @ k[b, kh, j])
                    if softcap is not None:
                        score = softcap * math.tanh(score / softcap)
                    if bias is not None:
                        score += bias(h, p, j)
                    scores.append(score)
                    values.append(v[b, kh, j].double())
                weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0)
                out[b, h, i] = sum(w * val for w, val in zip(weights, values))
    return out.float()


def qkv(t=7, s=7, h=4, kv=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [2 * torch.randn(2, n, length, d, generator=g) for n, length in ((h, t), (kv, s), (kv, s))]


def alibi_by_hand(heads):
    """BLOOM's slopes written out: n = the largest power of two <= heads gets 2^(-8i/n), i = 1..n; the rest
    the odd-numbered slopes of 2n heads, 2^(-8(2i-1)/2n)."""
    n = 2 ** int(math.log2(heads))
    slopes = [2 ** (-8 * i / n) for i in range(1, n + 1)]
    slopes += [2 ** (-8 * (2 * i - 1) / (2 * n)) for i in range(1, heads - n + 1)]
    return slopes


@pytest.mark.parametrize("heads", [1, 2, 4, 6, 8, 12, 16, 20, 40])
def test_alibi_slopes_are_blooms(heads):
    torch.testing.assert_close(alibi_slopes(heads), torch.tensor(alibi_by_hand(heads)), rtol=1e-6, atol=0)
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    assert torch.equal(alibi_slopes(heads), bloom._get_alibi_slopes(heads, torch.device("cpu")))


def test_alibi_bias_is_minus_slope_times_distance_and_blooms_causally():
    alibi, slopes = ALiBi(6), alibi_by_hand(6)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    bias = A._bias(alibi, 6, torch.arange(9), torch.arange(9))
    for h in range(6):
        torch.testing.assert_close(bias[h], -slopes[h] * (i - j).abs().float(), rtol=1e-6, atol=0)
    # causally, BLOOM's slope · j differs by slope · i per query row: the same softmax
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    bloom = torch.tensor(slopes)[:, None, None] * j.float()
    torch.testing.assert_close(torch.softmax(bias.masked_fill(~causal, -torch.inf), -1),
                               torch.softmax(bloom.masked_fill(~causal, -torch.inf), -1))


def t5_bucket_by_hand(relative, bidirectional, buckets, max_distance):
    """T5's bucket of one key-minus-query distance, from the paper's description."""
    offset = 0
    if bidirectional:
        buckets //= 2
        offset = buckets if relative > 0 else 0
        n = abs(relative)
    else:
        n = max(-relative, 0)
    exact = buckets // 2
    if n < exact:
        return offset + n
    return offset + min(buckets - 1, exact + int(math.log(n / exact) / math.log(max_distance / exact)
                                                 * (buckets - exact)))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_and_bias_are_t5s(bidirectional):
    relative = torch.arange(-300, 301)
    got = relative_bucket(relative, bidirectional=bidirectional, buckets=32, max_distance=128)
    assert got.tolist() == [t5_bucket_by_hand(r, bidirectional, 32, 128) for r in relative.tolist()]
    t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
    assert torch.equal(got, t5.T5Attention._relative_position_bucket(relative, bidirectional, 32, 128))
    # the whole [1, H, T, S] bias as T5Attention.compute_bias gives it (the decoder's: causal buckets)
    config = pytest.importorskip("transformers").T5Config(d_model=16, d_kv=4, num_heads=3, is_decoder=not bidirectional,
                                                            relative_attention_num_buckets=32)
    layer = t5.T5Attention(config, has_relative_attention_bias=True).eval()
    torch.nn.init.normal_(layer.relative_attention_bias.weight)
    ours = RelativePositionBias(3, 32, 128, bidirectional=bidirectional)
    ours.weight.data.copy_(layer.relative_attention_bias.weight)
    q_pos, k_pos = torch.arange(40, 50), torch.arange(50)  # ten queries after 40 cached keys
    with torch.no_grad():
        theirs = layer.compute_bias(10, 50, past_seen_tokens=40)
        torch.testing.assert_close(A._bias(ours, 3, q_pos, k_pos)[None], theirs, atol=0, rtol=0)


BIASES = {"alibi": lambda: ALiBi(4), "t5": lambda: RelativePositionBias(4, 8, 16, bidirectional=False)}
KNOBS = [dict(scale=0.7), dict(softcap=2.0), dict(scale=0.3, softcap=1.5), dict(bias="alibi"),
         dict(bias="t5"), dict(bias="alibi", softcap=3.0, window=3)]


def _knobs(opts):
    opts = dict(opts)
    name = opts.pop("bias", None)
    if name is not None:
        torch.manual_seed(0)
        module = BIASES[name]()
        if name == "t5":
            torch.nn.init.normal_(module.weight)
        opts["position_bias"] = module
    return opts


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("opts", KNOBS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_math_and_flex_apply_scale_softcap_and_bias_as_defined(opts, causal):
    knobs = _knobs(opts)
    bias = knobs.get("position_bias")
    q, k, v = qkv()
    want = reference(q, k, v, causal=causal, window=knobs.get("window"), scale=knobs.get("scale"),
                     softcap=knobs.get("softcap"),
                     bias=None if bias is None else lambda h, i, j: float(bias(torch.tensor(h), torch.tensor(i),
                                                                               torch.tensor(j))))
    torch.testing.assert_close(A.attention_math(q, k, v, causal=causal, **knobs), want, atol=2e-5, rtol=1e-5)
    with torch.no_grad():  # flex_attention has no backward on the CPU
        torch.testing.assert_close(A.attention_flex(q, k, v, causal=causal, **knobs), want, atol=2e-5, rtol=1e-5)
    auto = A.attention_auto(q, k, v, causal=causal, **knobs)
    torch.testing.assert_close(auto, want, atol=2e-5, rtol=1e-5)
    if "softcap" not in knobs:
        torch.testing.assert_close(A.attention_sdpa_mask(q, k, v, causal=causal, **knobs), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("opts", KNOBS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_score_modifications_with_keys_of_another_length(opts):
    """Cross-attention's shapes: 5 queries at the end of 9 keys (positions 4..8), bidirectional."""
    knobs = _knobs(opts)
    bias = knobs.get("position_bias")
    q, k, v = qkv(t=5, s=9)
    want = reference(q, k, v, causal=False, window=knobs.get("window"), scale=knobs.get("scale"),
                     softcap=knobs.get("softcap"),
                     bias=None if bias is None else lambda h, i, j: float(bias(torch.tensor(h), torch.tensor(i),
                                                                               torch.tensor(j))))
    torch.testing.assert_close(A.attention_auto(q, k, v, causal=False, **knobs), want, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(A.attention_flex(q, k, v, causal=False, **knobs), want, atol=2e-5, rtol=1e-5)


def test_cross_attention_takes_the_score_and_projection_knobs():
    spec = """
model M(x: Tensor[B, T, 16], m: Tensor[B, S, 24]) {
    y = cross_attention(x, m, heads=2, scale=0.2, softcap=3.0, alibi=true, qk_norm="full", gate=true) as cross
    return y
}
"""
    compiled = archc.compile(spec, name="cross.arch")
    torch.manual_seed(0)
    model = compiled.build()
    w = {k: v.detach() for k, v in to_canonical(compiled, model.state_dict()).items()}
    x, m = torch.randn(2, 3, 16), torch.randn(2, 6, 24)
    q = rms(x @ w["cross.q.weight"].T, w["cross.q_norm.weight"])
    k = rms(m @ w["cross.k.weight"].T, w["cross.k_norm.weight"])
    v = m @ w["cross.v.weight"].T
    slopes = alibi_slopes(2)
    heads = [t.view(2, -1, 2, 8).transpose(1, 2) for t in (q, k, v)]
    y = reference(*heads, causal=False, scale=0.2, softcap=3.0, bias=lambda h, i, j: -float(slopes[h]) * abs(i - j))
    y = y.transpose(1, 2).reshape(2, 3, 16) * torch.sigmoid(x @ w["cross.gate.weight"].T)
    with torch.no_grad():
        torch.testing.assert_close(model(x=x, m=m)["y"], y @ w["cross.o.weight"].T, atol=1e-5, rtol=1e-5)


def test_kernels_that_cannot_modify_scores_refuse_and_auto_avoids_them():
    q, k, v = qkv()
    cap, bias = dict(softcap=2.0), dict(position_bias=ALiBi(4))
    for kernel, opts in ((A.attention_sdpa_mask, cap), (A.attention_local, cap), (A.attention_local, bias)):
        with pytest.raises(ValueError, match="cannot"):
            kernel(q, k, v, causal=True, window=3, **opts)
    assert A.resolve(q, k, causal=True, softcap=2.0) == "math"
    assert A.resolve(q, k, causal=True, position_bias=ALiBi(4)) == "sdpa_mask"
    assert A.resolve(q, k, causal=True, window=3, position_bias=ALiBi(4)) == "sdpa_mask"
    assert A.resolve(q, k, causal=True) == "sdpa"
    # a scale alone: every kernel
    want = reference(q, k, v, causal=True, window=3, scale=0.4)
    for kernel in (A.attention_local, A.attention_sdpa_mask, A.attention_math):
        torch.testing.assert_close(kernel(q, k, v, causal=True, window=3, scale=0.4), want, atol=2e-5, rtol=1e-5)


def test_softcap_and_bias_gradients_match_the_reference_kernel():
    q, k, v = (x.requires_grad_() for x in qkv())
    bias = RelativePositionBias(4, 8, 16, bidirectional=False)
    grads = []
    for kernel in (A.attention_math, A.attention_sdpa_mask):
        for x in (q, k, v, bias.weight):
            x.grad = None
        kernel(q, k, v, causal=True, position_bias=bias).square().sum().backward()
        grads.append([x.grad.clone() for x in (q, k, v, bias.weight)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert grads[0][3].abs().sum() > 0  # the table learns


# ---- RoPE: partial rotary and scaling ------------------------------------------------------------------


def test_partial_rotary_turns_only_the_first_rope_dim_dims():
    q, k = torch.randn(2, 3, 6, 16), torch.randn(2, 1, 6, 16)
    partial = RotaryEmbedding(16, theta=100.0, rope_dim=4)
    got_q, got_k = partial(q, k)
    assert torch.equal(got_q[..., 4:], q[..., 4:]) and torch.equal(got_k[..., 4:], k[..., 4:])
    # the first 4 dims: rotate-half pairs (0, 2) and (1, 3) turned by position · 100^(-2i/4)
    pos = torch.arange(6.0)[:, None]
    angle = pos * torch.tensor([1.0, 100 ** -0.5])
    x1, x2 = q[..., :2], q[..., 2:4]
    want = torch.cat((x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()), dim=-1)
    torch.testing.assert_close(got_q[..., :4], want)


def llama3_by_hand(dim, theta, factor, low, high, original):
    """Llama 3.1's bands, one frequency at a time."""
    out = []
    for i in range(0, dim, 2):
        f = theta ** (-i / dim)
        wavelength = 2 * math.pi / f
        if wavelength < original / high:
            out.append(f)
        elif wavelength > original / low:
            out.append(f / factor)
        else:
            s = (original / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out)


def test_llama3_scaling_is_the_three_bands():
    scaling = Llama3RopeScaling(factor=8.0, original_max=64, low_freq_factor=1.0, high_freq_factor=4.0)
    got = scaling.inv_freq(32, 500.0)
    want = llama3_by_hand(32, 500.0, 8.0, 1.0, 4.0, 64)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    wavelengths = 2 * math.pi / llama3_by_hand(32, 500.0, 1.0, 1.0, 4.0, 64)
    assert (wavelengths < 16).any() and (wavelengths > 64).any() and ((wavelengths > 16) & (wavelengths < 64)).any()


CONFIGS = [
    ("llama3", dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    ("llama3", dict(factor=32.0, low_freq_factor=2.0, high_freq_factor=3.0, original_max_position_embeddings=128)),
    ("yarn", dict(factor=4.0, original_max_position_embeddings=32)),
    ("yarn", dict(factor=16.0, original_max_position_embeddings=64, beta_fast=16, beta_slow=2, truncate=False)),
    ("yarn", dict(factor=4.0, original_max_position_embeddings=32, attention_factor=1.3)),
]


@pytest.mark.parametrize("rope_type, params", CONFIGS)
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_scaled_frequencies_are_transformers(rope_type, params, partial):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = transformers.LlamaConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=256,
                                      rope_parameters={"rope_type": rope_type, "rope_theta": 1000.0,
                                                       "partial_rotary_factor": partial, **params})
    theirs, their_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    fields = {"factor": params["factor"], "original_max": params["original_max_position_embeddings"]}
    if rope_type == "llama3":
        scaling = Llama3RopeScaling(**fields, low_freq_factor=params["low_freq_factor"],
                                    high_freq_factor=params["high_freq_factor"])
    else:
        scaling = YarnRopeScaling(**fields, beta_fast=params.get("beta_fast", 32.0),
                                  beta_slow=params.get("beta_slow", 1.0), truncate=params.get("truncate", True),
                                  attention_factor=params.get("attention_factor"))
    dim = int(32 * partial)
    assert torch.equal(scaling.inv_freq(dim, 1000.0), theirs)
    assert scaling.attention_factor == their_factor
    # and the rotary module applies both: cos and sin times the attention factor on the turned dims only
    rope = RotaryEmbedding(32, theta=1000.0, rope_dim=dim, scaling=scaling)
    cos, sin = rope.angles(9, torch.device("cpu"))
    angles = torch.arange(9.0)[:, None] * theirs
    torch.testing.assert_close(cos, angles.cos() * their_factor)
    torch.testing.assert_close(sin, angles.sin() * their_factor)


# ---- projections: full-width q/k norm and the output gate ----------------------------------------------

SPEC = """
param d: int = 32
model M(tokens: Tokens[B, T]) {{
    x = embedding(tokens, 50, d) as embed
    x += attention(x, {opts}) as attn
    logits = linear(x, 50, bias=false) as head
    loss = next_token_loss(logits, tokens)
    return logits, loss
}}
"""


def build(opts: str, seed: int = 0, **options):
    compiled = archc.compile(SPEC.format(opts=opts), name="knobs.arch", **options)
    torch.manual_seed(seed)
    model = compiled.build().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() > 1 else 1.0)
    return compiled, model


def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_full_width_qk_norm_and_output_gate_by_hand():
    compiled, model = build('heads=4, kv_heads=2, qk_norm="full", gate=true, norm_eps=1e-6', kernels={"*": "math"})
    w = {k: v.detach() for k, v in to_canonical(compiled, model.state_dict()).items()}
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(3))
    x = w["embed.weight"][tokens]
    q = rms(x @ w["attn.q.weight"].T, w["attn.q_norm.weight"])  # one norm over all 4 heads x 8
    k = rms(x @ w["attn.k.weight"].T, w["attn.k_norm.weight"])  # and over both kv heads
    v = x @ w["attn.v.weight"].T
    heads = [t.view(2, 6, n, 8).transpose(1, 2) for t, n in ((q, 4), (k, 2), (v, 2))]
    y = reference(*heads, causal=True).transpose(1, 2).reshape(2, 6, 32)
    y = y * torch.sigmoid(x @ w["attn.gate.weight"].T)  # one gate per element
    want = (x + y @ w["attn.o.weight"].T) @ w["head.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)["logits"], want, atol=1e-4, rtol=1e-4)
    assert w["attn.q_norm.weight"].shape == (32,) and w["attn.k_norm.weight"].shape == (16,)


def test_the_gate_is_qwen3_nexts(tmp_path):
    """Qwen3NextAttention (gate interleaved per head in q_proj, per-head (1 + w) norms, partial rotary) and
    archc's attention with the same weights give the same output."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as qn

    config = transformers.Qwen3NextConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          rms_norm_eps=1e-6, partial_rotary_factor=0.25,
                                          rope_parameters={"rope_type": "default", "rope_theta": 777.0})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = qn.Qwen3NextAttention(config, 0).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0.0, 0.3)
    compiled, model = build("heads=4, kv_heads=2, head_dim=16, rope=true, rope_theta=777.0, rope_dim=4, "
                            "qk_norm=true, gate=true, norm_eps=1e-6")
    q_gate = theirs.q_proj.weight.detach().view(4, 2, 16, 32)  # per head: 16 query rows, then 16 gate rows
    state = {"attn.q.weight": q_gate[:, 0].reshape(64, 32), "attn.gate.weight": q_gate[:, 1].reshape(64, 32),
             "attn.k.weight": theirs.k_proj.weight, "attn.v.weight": theirs.v_proj.weight,
             "attn.o.weight": theirs.o_proj.weight, "attn.q_norm.weight": 1 + theirs.q_norm.weight,
             "attn.k_norm.weight": 1 + theirs.k_norm.weight}
    weights = {**to_canonical(compiled, model.state_dict()), **{k: v.detach() for k, v in state.items()}}
    load_canonical(model, compiled, weights)
    x = torch.randn(2, 7, 32)
    position = qn.Qwen3NextRotaryEmbedding(config)(x, torch.arange(7)[None])
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want = theirs(x, position, causal)[0]
        got = model.attn(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ---- decoding -------------------------------------------------------------------------------------------

DECODING = [
    "heads=4, kv_heads=2, softcap=2.0, scale=0.4, rope=true, rope_dim=4",
    "heads=4, alibi=true, window=4",
    "heads=4, alibi=true, window=3, sinks=1, softcap=3.0",
    "heads=4, relative_buckets=8, relative_max_distance=12",
    "heads=4, kv_heads=1, rope=true, rope_scaling=\"llama3\", rope_factor=8.0, rope_original_max=8",
    "heads=4, rope=true, rope_scaling=\"yarn\", rope_factor=4.0, rope_original_max=8, qk_norm=\"full\", gate=true",
]


@pytest.mark.parametrize("opts", DECODING)
def test_decoding_from_the_cache_equals_the_whole_sequence(opts):
    _compiled, model = build(opts)
    tokens = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(tokens)["logits"]
        with recurrent(model):
            steps = [model(tokens[:, :4])["logits"]] + [model(tokens[:, t:t + 1])["logits"] for t in range(4, 13)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-5, rtol=1e-5)


# ---- kernel choice ---------------------------------------------------------------------------------------


def test_kernel_choice_sends_score_modifications_to_kernels_that_can_apply_them():
    compiled, _ = build("heads=4, softcap=20.0")
    assert "kernel: auto — causal, softcap=20.0: at run time flex_attention" in compiled.source
    assert "math kernel (the soft-cap needs the scores) elsewhere" in compiled.source
    compiled, _ = build("heads=4, alibi=true")
    assert "causal, ALiBi" in compiled.source and "the bias as a float mask" in compiled.source
    assert "F.scaled_dot_product_attention(q_BHTd, k_BKTd, v_BKTd, is_causal=True, scale=0.5)" in \
        build("heads=4, scale=0.5")[0].source
    for opts, kernel, why in (("softcap=20.0", "sdpa", "cannot soft-cap"), ("softcap=20.0", "sdpa_mask", "soft-cap"),
                              ("alibi=true, window=4", "local", "position bias"),
                              ("relative_buckets=8", "sdpa", "position bias")):
        with pytest.raises(SpecError, match=why):
            build(f"heads=4, {opts}", kernels={"attn": kernel})
    for opts in ("softcap=20.0", "alibi=true", "relative_buckets=8"):
        assert "AF.attention_math(" in build(f"heads=4, {opts}", kernels={"attn": "math"})[0].source


# ---- errors ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opts, message", [
    ("heads=4, softcap=0.0", "`softcap` must be positive, got 0.0"),
    ("heads=4, scale=-1.0", "`scale` must be positive"),
    ("heads=4, rope=true, rope_dim=5", "`rope_dim` must be even, got 5"),
    ("heads=4, rope=true, rope_dim=10", "rope_dim=10 is more than head_dim=8"),
    ("heads=4, head_dim=8, rope=true, rope_dim=12", "rope_dim=12 is more than the head size 8"),
    ("heads=4, rope_dim=4", "`rope_dim` shapes RoPE, which this attention does not use"),
    ("heads=4, rope=true, rope_scaling=\"llama4\"", "`rope_scaling` must be one of \"none\", \"llama3\", \"yarn\""),
    ("heads=4, rope=true, rope_scaling=\"yarn\"", "needs `rope_original_max`"),
    ("heads=4, rope=true, rope_scaling=\"llama3\", rope_original_max=8, rope_high_freq_factor=0.5",
     "rope_high_freq_factor > rope_low_freq_factor"),
    ("heads=4, qk_norm=\"ful\"", "`qk_norm` must be true, false, \"head\" or \"full\""),
    ("heads=4, alibi=true, relative_buckets=8", "two position biases"),
    ("heads=4, relative_buckets=8, relative_max_distance=2", "`relative_max_distance` must exceed"),
])
def test_bad_values_are_located_errors(opts, message):
    with pytest.raises(SpecError, match="") as err:
        archc.compile(SPEC.format(opts=opts), name="knobs.arch")
    assert message in str(err.value)
    assert err.value.span is not None and err.value.span.line == 5


def test_cross_attention_has_no_t5_bias():
    spec = """
model M(x: Tensor[B, T, 16], m: Tensor[B, S, 16]) {
    y = cross_attention(x, m, heads=2, relative_buckets=8)
    return y
}
"""
    with pytest.raises(SpecError, match="has no argument `relative_buckets`"):
        archc.compile(spec, name="cross.arch")
