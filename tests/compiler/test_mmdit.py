"""MMDiT in the language: MSRoPE as an attention position option (against diffusers' Qwen-Image rotation),
`attend` over streams projected with their own weights (joint attention), and specs/mmdit.arch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import archc
from archc.dsl.diagnostics import SpecError
from archc.runtime.diffusion import msrope_axes, msrope_positions


def _build(text: str, **params):
    return archc.compile(text, params, name="m.arch").build()


# --- MSRoPE as an attention option ------------------------------------------------------


def test_msrope_default_axes_split_the_head_as_qwen_image():
    assert msrope_axes(128) == (16, 56, 56)  # Qwen-Image's
    assert msrope_axes(64) == (8, 28, 28) and msrope_axes(16) == (4, 6, 6) and msrope_axes(8) == (4, 2, 2)
    assert msrope_axes(6) == (2, 2, 2)
    for head_dim in (4, 7):
        with pytest.raises(ValueError, match="three even MSRoPE axes"):
            msrope_axes(head_dim)


def test_msrope_positions_of_a_small_joint_sequence_by_hand():
    """H = W = 4 with 3 text tokens (algorithms.md §7.4's recipe) and a 2×3 grid with 2."""
    image, text = msrope_positions(4, 4, 3)
    assert image.tolist() == [[0, r, c] for r in (-2, -1, 0, 1) for c in (-2, -1, 0, 1)]
    assert text.tolist() == [[2, 2, 2], [3, 3, 3], [4, 4, 4]]
    image, text = msrope_positions(2, 3, 2)
    assert image.tolist() == [[0, r, c] for r in (-1, 0) for c in (-2, -1, 0)]
    assert text.tolist() == [[1, 1, 1], [2, 2, 2]]  # M = max(2//2, 3//2) = 1


def _qwen_attention(q, k, v, heads, grid, text_len, axes, text_first):
    """diffusers 0.42.1's Qwen-Image rotation (QwenEmbedRope + apply_rotary_emb_qwen) then SDPA, on
    [B, T, H·d] streams laid out image-then-text (SD3) or text-then-image (Qwen-Image)."""
    qwen = pytest.importorskip("diffusers.models.transformers.transformer_qwenimage")
    rope = qwen.QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
    vid, txt = rope([(1, *grid)], max_txt_seq_len=text_len, device=torch.device("cpu"))
    freqs = torch.cat((txt, vid) if text_first else (vid, txt))
    b, t, _ = q.shape
    q, k, v = (x.view(b, t, heads, -1) for x in (q, k, v))
    q, k = (qwen.apply_rotary_emb_qwen(x, freqs, use_real=False) for x in (q, k))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, t, -1)


@pytest.mark.parametrize("grid, text_len, text_first, axes", [
    ((4, 4), 3, False, None), ((3, 5), 2, True, None), ((2, 4), 4, False, [4, 6, 6]), ((6, 2), 1, True, [8, 4, 4]),
])
def test_msrope_attention_matches_diffusers_qwen_image(grid, text_len, text_first, axes):
    rows, cols = grid
    given = f", rope_axes={axes}" if axes else ""
    order = ", rope_text_first=true" if text_first else ""
    model = _build(f"""
model M(q: Tensor[B, T, 32], k: Tensor[B, T, 32], v: Tensor[B, T, 32]) {{
    y = attend(q, k, v, heads=2, causal=false, rope="msrope", rope_grid=[{rows}, {cols}]{given}{order})
    return y
}}""")
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, rows * cols + text_len, 32)
    want = _qwen_attention(q, k, v, 2, grid, text_len, axes or msrope_axes(16), text_first)
    torch.testing.assert_close(model(q, k, v)["y"], want, rtol=1e-5, atol=1e-5)


def test_attention_takes_msrope_and_differs_from_no_positions():
    spec = """
model M(x: Tensor[B, T, 32]) {{
    y = attention(x, heads=2, causal=false{rope})
    return y
}}"""
    with_rope = _build(spec.format(rope=', rope="msrope", rope_grid=[2, 2]'))
    plain = _build(spec.format(rope=""))
    with torch.no_grad():
        for weight in with_rope.parameters():
            weight.normal_(0, 0.3)  # scores far from uniform, so positions show
    plain.load_state_dict(with_rope.state_dict())
    x = torch.randn(2, 6, 32)
    attn = with_rope.attn
    q, k, v = attn.qkv(x).split((32, 32, 32), dim=-1) if hasattr(attn, "qkv") else (attn.q(x), attn.k(x), attn.v(x))
    want = attn.o(_qwen_attention(q, k, v, 2, (2, 2), 2, msrope_axes(16), False))
    torch.testing.assert_close(with_rope(x)["y"], want, rtol=1e-5, atol=1e-5)
    assert (plain(x)["y"] - want).abs().max() > 0.05


@pytest.mark.parametrize("options, words", [
    ('rope="msrope"', "needs the image's patch grid"),
    ('rope="msrop", rope_grid=[2, 2]', 'did you mean `msrope`'),
    ("rope=true, rope_grid=[2, 2]", "places tokens for MSRoPE"),
    ('rope="msrope", rope_grid=[2]', "two positive ints"),
    ('rope="msrope", rope_grid=[2, 2], rope_axes=[4, 6, 5]', "three positive even ints"),
    ('rope="msrope", rope_grid=[2, 2], rope_axes=[4, 6, 8]', "sum to 18, not the head size 16"),
    ('rope="msrope", rope_grid=[4, 4]', "cannot hold the 4×4 image grid"),
    ('rope="msrope", rope_grid=[2, 2], rope_dim=8', "which MSRoPE does not use"),
])
def test_msrope_options_are_checked_where_they_are_written(options, words):
    with pytest.raises(SpecError) as info:
        archc.compile(f"model M(x: Tensor[B, 6, 32]) {{\n    y = attention(x, heads=2, causal=false, {options})\n"
                      "    return y\n}", name="m.arch")
    assert words in str(info.value)
    assert "m.arch:2:" in str(info.value)
