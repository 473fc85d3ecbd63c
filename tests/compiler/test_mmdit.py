"""MMDiT in the language: MSRoPE as an attention position option (against diffusers' Qwen-Image rotation),
`attend` over streams projected with their own weights (joint attention), and specs/mmdit.arch."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS

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


# --- joint attention and the MMDiT blocks of specs/mmdit.arch --------------------------------------------


def _mmdit(**params):
    return archc.compile(SPECS / "mmdit.arch", params).build()


def _joint_reference(attn, x, context, heads):
    """MMDiT's joint attention written out: each stream's own q, k, v; one softmax over image then text."""
    def qkv(fused, stream):
        return fused(stream).chunk(3, dim=-1)

    qx, kx, vx = qkv(attn.to_q_to_k_to_v, x)
    qc, kc, vc = qkv(attn.add_q_proj_add_k_proj_add_v_proj, context)
    b, n, d = x.shape
    q, k, v = (torch.cat(pair, dim=1).view(b, -1, heads, d // heads).transpose(1, 2)
               for pair in ((qx, qc), (kx, kc), (vx, vc)))
    scores = (q @ k.transpose(-1, -2)) / (d // heads) ** 0.5
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, d)
    return y[:, :n], y[:, n:]


def test_joint_attention_is_one_softmax_over_both_streams_with_their_own_weights():
    torch.manual_seed(0)
    model = _mmdit()
    attn = model.transformer_blocks[0].attn
    with torch.no_grad():
        for weight in attn.parameters():
            weight.normal_(0, 0.2)
    x, context = torch.randn(2, 32, 64), torch.randn(2, 3, 64)
    got = attn(x, context)
    for ours, want in zip(got, _joint_reference(attn, x, context, heads=4)):
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
    # the last block (context_pre_only) attends over both streams but gives only the image's output
    last = model.transformer_blocks[-1].attn
    last.load_state_dict(attn.state_dict())
    torch.testing.assert_close(last(x, context), got[0])


def test_joint_attention_with_shared_weights_is_attention_over_the_concatenated_streams():
    """With the text stream given the image stream's weights, `attend` over the concatenated projections is
    `attention` over the concatenated sequence."""
    joint = _build("""
model J(x: Tensor[B, N, 32], c: Tensor[B, L, 32]) {
    q = concat([linear(x, 32) as x_q, linear(c, 32) as c_q], dim=1)
    k = concat([linear(x, 32) as x_k, linear(c, 32) as c_k], dim=1)
    v = concat([linear(x, 32) as x_v, linear(c, 32) as c_v], dim=1)
    y_x, y_c = split(attend(q, k, v, heads=4, causal=false), [N, L], dim=1)
    return linear(y_x, 32) as x_o, linear(y_c, 32) as c_o
}""")
    whole = _build("""
model A(x: Tensor[B, N, 32], c: Tensor[B, L, 32]) {
    y = attention(concat([x, c], dim=1), heads=4, causal=false, bias=true) as attn
    y_x, y_c = split(y, [N, L], dim=1)
    return y_x, y_c
}""")
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in whole.parameters():
            weight.normal_(0, 0.2)
    shared = whole.state_dict()
    qkv_w, qkv_b = shared["attn.qkv.weight"], shared["attn.qkv.bias"]
    state = {f"{s}_q_{s}_k_{s}_v.{p}": t for s in ("x", "c") for p, t in (("weight", qkv_w), ("bias", qkv_b))}
    state.update({f"{s}_o.{p}": shared[f"attn.o.{p}"] for s in ("x", "c") for p in ("weight", "bias")})
    joint.load_state_dict(state)
    x, c = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    ours, want = joint(x, c), whole(x, c)
    torch.testing.assert_close(ours["out0"], want["y_x"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["out1"], want["y_c"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("msrope", [False, True])
def test_mmdit_blocks_start_as_the_identity_and_the_model_predicts_zeros(msrope):
    model = _mmdit(msrope=msrope)
    image, caption = torch.randn(3, 1, 8, 16), torch.tensor([[4, 11, 8], [1, 11, 2], [0, 0, 0]])
    out = model(image, caption)
    assert out["pred"].shape == image.shape and torch.equal(out["pred"], torch.zeros_like(image))
    x, context, c = torch.randn(3, 32, 64), torch.randn(3, 3, 64), torch.randn(3, 64)
    first, last = model.transformer_blocks
    for ours, given in zip(first(x, context, c), (x, context)):
        torch.testing.assert_close(ours, given)
    torch.testing.assert_close(last(x, context, c), x)
    assert not hasattr(last, "to_add_out") and not hasattr(last, "ff_context")  # context_pre_only


def test_one_mmdit_training_step_on_a_fixed_batch_lowers_the_loss():
    torch.manual_seed(0)
    model = _mmdit(msrope=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    image = torch.rand(16, 1, 8, 16) * 2 - 1
    caption = torch.randint(1, 12, (16, 3))

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same times, noise and dropped captions each time
        return model(image, caption)["loss"]

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before - 1e-3, (before.item(), after.item())


# --- training on the captioned digit pairs, sampling from a prompt ----------------------------------------


def test_archc_train_learns_captioned_pairs_and_archc_sample_draws_a_prompt(tmp_path, capsys):
    from PIL import Image

    from archc.cli import main
    from archc.training.image_source import diffusion_spec, generate
    from archc.training.train import TrainConfig, train

    small = {"n_layers": 2, "d_model": 32, "n_heads": 2}
    cfg = TrainConfig(batch_size=32, steps=20, eval_every=20, checkpoint_every=20, progress=False, lr=2e-3,
                      warmup=0, out_dir=str(tmp_path / "run"))
    result = train(str(SPECS / "mmdit.arch"), cfg, small)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and result.val_loss < rows[0]["val_loss"] - 0.05, (rows[0], result.val_loss)
    assert (tmp_path / "run" / "samples.png").exists()
    assert result.sample.startswith("caption adherence: ") and "of 40 pairs" in result.sample
    grid = tmp_path / "grid.png"
    args = ["sample", str(SPECS / "mmdit.arch"), "--checkpoint", str(tmp_path / "run"), "--prompt", "three and seven",
            "--cfg", "3", "--steps", "4", "--count", "3", "-o", str(grid)]
    assert main(args) == 0
    first = grid.read_bytes()
    assert main(args) == 0 and grid.read_bytes() == first  # a fixed seed gives the same images
    assert Image.open(grid).size == (2 * 17 * 4 + 4, 2 * 9 * 4 + 4)  # 2 columns of 8×16 pairs, 2 rows
    # the API draws the same images as the command line
    from archc.cli.eval import load_run

    compiled, model, _ = load_run(SPECS / "mmdit.arch", str(tmp_path / "run"), {}, "cpu", False)
    spec = diffusion_spec(compiled)
    assert spec.caption and spec.label == "caption" and spec.null_label == 0 and spec.caption_len == 3
    captions = spec.captions(["three and seven"] * 3)
    assert captions.tolist() == [[4, 11, 8]] * 3
    images = generate(model, spec, captions, steps=4, cfg_scale=3.0, seed=0)
    assert images.shape == (3, 1, 8, 16)
    from archc.training.image_source import write_grid

    write_grid(images, tmp_path / "api.png")
    assert (tmp_path / "api.png").read_bytes() == first
    # prompts are checked, with the word that is not in the vocabulary named
    capsys.readouterr()
    for bad, words in [(["--prompt", "three and seben"], "did you mean 'seven'?"),
                       (["--prompt", "one and two", "--label", "12"], "give --prompt or --label, not both"),
                       (["--label", "100"], "a digit pair is 10·left + right")]:
        code = main(["sample", str(SPECS / "mmdit.arch"), "--checkpoint", str(tmp_path / "run"),
                     "-o", str(tmp_path / "bad.png"), *bad])
        assert code not in (0, 3) and words in capsys.readouterr().err


def test_archc_sample_refuses_a_prompt_for_a_label_spec(tmp_path, capsys):
    from archc.cli import main
    from archc.training.train import TrainConfig, train

    run = tmp_path / "run"
    train(str(SPECS / "dit.arch"), TrainConfig(batch_size=4, steps=1, eval_every=1, checkpoint_every=1,
                                               progress=False, out_dir=str(run)), {"n_layers": 1, "d_model": 16})
    code = main(["sample", str(SPECS / "dit.arch"), "--checkpoint", str(run), "-o", str(tmp_path / "g.png"),
                 "--prompt", "one and two"])
    assert code not in (0, 3) and "not conditioned on a caption (it takes a class: --label)" in capsys.readouterr().err


def test_sincos_2d_crops_sd3s_rescaled_table():
    from archc.runtime.diffusion import crop_position_embedding, sincos_2d_position_embedding

    model = _build("""
model M(x: Tensor[B, 6, 8]) {
    p = sincos_2d(x, rows=2, cols=3, base_size=4, max_size=6)
    return p
}""")
    table = sincos_2d_position_embedding(8, 6, base_size=4)  # positions 0, 2/3, 4/3, ... on a 6×6 grid
    torch.testing.assert_close(model(torch.zeros(1, 6, 8))["p"], crop_position_embedding(table, 6, 2, 3))
    torch.testing.assert_close(crop_position_embedding(table, 6, 2, 3)[0], table[2 * 6 + 1])  # centre: row 2, col 1
    with pytest.raises(SpecError, match="does not fit the 2×2 table"):
        archc.compile("model M(x: Tensor[B, 6, 8]) {\n    p = sincos_2d(x, rows=2, cols=3, max_size=2)\n"
                      "    return p\n}", name="m.arch")
