"""archc.runtime.diffusion: schedules, objectives, condition dropout, embeddings, patches, MSRoPE.

Reference transcriptions of DiT's numpy functions are written out here; parity with
diffusers' own functions runs when diffusers (a test extra) is installed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from archc.runtime import diffusion as D

# --- schedules ----------------------------------------------------------------------


def test_linear_schedule_values():
    betas = D.linear_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert betas[0].item() == pytest.approx(1e-4, rel=1e-14)
    assert betas[-1].item() == pytest.approx(0.02, rel=1e-14)
    assert betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 999, rel=1e-12)
    ddpm = D.DDPMObjective("eps", "linear")
    assert ddpm.alphas_cumprod[0].item() == pytest.approx(1 - 1e-4, rel=1e-14)
    assert ddpm.alphas_cumprod[1].item() == pytest.approx((1 - 1e-4) * (1 - betas[1].item()), rel=1e-14)
    assert ddpm.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-3)  # DDPM's ᾱ_T
    # other T: both ends scale by 1000/T (DiT), so T=100 runs from 1e-3 to 0.2
    assert D.linear_betas(100)[[0, -1]].tolist() == pytest.approx([1e-3, 0.2], rel=1e-12)
    with pytest.raises(ValueError, match="at least 20 timesteps"):
        D.make_betas("linear", 10)


def test_cosine_schedule_telescopes_to_f_ratio():
    T, s = 1000, 0.008

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    ddpm = D.DDPMObjective("eps", "cosine", T)
    # ᾱ at index t is the product of (1 − β) up to t, which telescopes to f((t+1)/T) / f(0) until β is capped
    for t in (0, 1, 10, 499, 900, 990):
        assert ddpm.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-10)
    assert ddpm.betas[-1].item() == 0.999  # f(1) = 0: capped
    assert ddpm.betas[0].item() == pytest.approx(1 - f(1 / T) / f(0), rel=1e-12)
    assert (ddpm.betas[:-1] < 0.999).all()


def test_unknown_names_suggest():
    with pytest.raises(ValueError, match="did you mean 'cosine'"):
        D.make_betas("cosin")
    with pytest.raises(ValueError, match="did you mean 'flow'"):
        D.make_objective("flwo")
    with pytest.raises(ValueError, match="did you mean 'logit_normal'"):
        D.FlowMatchingObjective("logitnormal")
    with pytest.raises(ValueError, match="only apply to objective 'flow'"):
        D.make_objective("eps", shift=3.0)


# --- objectives ---------------------------------------------------------------------


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("schedule", D.SCHEDULES)
def test_ddpm_targets_and_conversions(prediction, schedule):
    obj = D.make_objective(prediction, schedule=schedule)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 5, 3, 4, 4, generator=gen, dtype=torch.float64)
    t = torch.tensor([3, 400, 998, 0, 700])
    ab = obj.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = obj.noisy(x0, eps, t)
    torch.testing.assert_close(x_t, ab.sqrt() * x0 + (1 - ab).sqrt() * eps)
    expected = {"eps": eps, "x0": x0, "v": ab.sqrt() * eps - (1 - ab).sqrt() * x0}[prediction]
    target = obj.target(x0, eps, t)
    torch.testing.assert_close(target, expected)
    x0_hat, eps_hat = obj.split_prediction(x_t, t, target)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    assert obj.model_time(t).dtype == torch.float32 and obj.model_time(t).tolist() == t.tolist()


def test_flow_matching_sd3_convention():
    obj = D.FlowMatchingObjective("uniform")
    assert obj.convention == "sd3" and obj.prediction == "velocity"
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 2, 3, 3, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.0, 0.25, 0.9, 1.0], dtype=torch.float64)
    x_t = obj.noisy(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])  # t = 0 is the data
    torch.testing.assert_close(x_t[3], eps[3])  # t = 1 is pure noise
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * eps[1])
    v = obj.target(x0, eps, t)
    torch.testing.assert_close(v, eps - x0)
    x0_hat, eps_hat = obj.split_prediction(x_t, t, v)
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)
    assert obj.model_time(torch.tensor([0.25])).tolist() == [250.0]


def test_timestep_sampling_and_shift():
    assert D.shift_timesteps(torch.tensor([0.0, 0.5, 1.0]), 3.0).tolist() == [0.0, 0.75, 1.0]
    assert D.shift_timesteps(torch.tensor(0.2), 1.0).item() == pytest.approx(0.2)
    assert D.resolution_shift(4096, 1024) == 2.0
    gen = torch.Generator().manual_seed(0)
    steps = D.DDPMObjective().sample_timesteps(20000, generator=gen)
    assert steps.dtype == torch.long and steps.min() == 0 and steps.max() == 999
    uniform = D.FlowMatchingObjective("uniform").sample_timesteps(20000, generator=gen)
    assert 0 <= uniform.min() and uniform.max() < 1 and uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    m, s = 0.5, 0.8
    t = D.FlowMatchingObjective("logit_normal", logit_mean=m, logit_std=s).sample_timesteps(20000, generator=gen)
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(m, abs=0.03) and logit.std().item() == pytest.approx(s, abs=0.03)
    shifted = D.FlowMatchingObjective("logit_normal", shift=3.0).sample_timesteps(20000, generator=gen)
    median = 3 * 0.5 / (1 + 2 * 0.5)  # the shift is monotone: the median moves from sigmoid(0) = 0.5 to 0.75
    assert shifted.median().item() == pytest.approx(median, abs=0.01)


def test_add_noise_draws_consistently_and_loss():
    obj = D.make_objective("v", schedule="cosine")
    x0 = torch.randn(6, 1, 4, 4)
    a = D.add_noise(x0, obj, generator=torch.Generator().manual_seed(5))
    b = D.add_noise(x0, obj, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    torch.testing.assert_close(a.x_t, obj.noisy(x0, a.noise, a.t))
    pred = torch.randn_like(x0)
    target = obj.target(x0, a.noise, a.t)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(D.diffusion_loss(pred, a, obj), per_sample.mean())
    w = torch.arange(6.0)
    torch.testing.assert_close(D.diffusion_loss(pred, a, obj, weight=w), (w * per_sample).mean())
    with pytest.raises(ValueError, match="one value per input value"):
        D.diffusion_loss(torch.randn(6, 2, 4, 4), a, obj)
    with pytest.raises(ValueError, match="one value per sample"):
        D.diffusion_loss(pred, a, obj, weight=torch.ones(3))


# --- condition dropout --------------------------------------------------------------


def test_drop_condition_labels_and_embeddings():
    labels = torch.arange(8)
    assert torch.equal(D.drop_condition(labels, 0.0, 10), labels)
    assert D.drop_condition(labels, 1.0, 10).tolist() == [10] * 8
    mask = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1], dtype=torch.bool)
    assert D.drop_condition(labels, 0.5, 10, mask=mask).tolist() == [10, 1, 2, 10, 4, 5, 6, 10]
    emb, null = torch.randn(8, 3, 5), torch.randn(3, 5)
    dropped = D.drop_condition(emb, 0.5, null, mask=mask)
    for i in range(8):
        torch.testing.assert_close(dropped[i], null if mask[i] else emb[i])
    many = D.drop_condition(torch.zeros(20000, dtype=torch.long), 0.1, 1, generator=torch.Generator().manual_seed(0))
    assert many.float().mean().item() == pytest.approx(0.1, abs=0.01)
    with pytest.raises(ValueError, match="null condition has shape"):
        D.drop_condition(emb, 0.5, torch.zeros(5))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        D.drop_condition(labels, 1.5, 10)


# --- timestep embedding -------------------------------------------------------------


def dit_timestep_embedding(t, dim, max_period=10000):
    """facebookresearch/DiT models.py TimestepEmbedder.timestep_embedding, transcribed."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


@pytest.mark.parametrize("dim", [256, 33])
def test_timestep_embedding_matches_dit(dim):
    t = torch.tensor([0.0, 1.0, 17.0, 999.0, 250.5])
    torch.testing.assert_close(D.timestep_embedding(t, dim), dit_timestep_embedding(t, dim), rtol=0, atol=0)
    half = dim // 2
    assert D.timestep_embedding(torch.tensor([0.0]), dim)[0, :half].tolist() == [1.0] * half  # cos 0
    plain = D.timestep_embedding(t, dim, flip_sin_to_cos=False)
    torch.testing.assert_close(plain[:, :half], dit_timestep_embedding(t, dim)[:, half:2 * half])


def test_timestep_embedding_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 3.0, 250.0, 999.0, 0.125])
    for dim in (256, 64, 7):
        for flip in (False, True):
            for shift in (0, 1):
                for scale in (1, 1000):
                    ours = D.timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift,
                                                scale=scale)
                    theirs = embeddings.get_timestep_embedding(t, dim, flip_sin_to_cos=flip,
                                                               downscale_freq_shift=shift, scale=scale)
                    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# --- 2-D sin-cos positions ------------------------------------------------------------


def dit_2d_sincos(embed_dim, grid_size):
    """facebookresearch/DiT models.py get_2d_sincos_pos_embed (and its helpers), transcribed in numpy."""
    def one_d(embed_dim, pos):
        omega = np.arange(embed_dim // 2, dtype=np.float64)
        omega /= embed_dim / 2.0
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


@pytest.mark.parametrize("dim,grid", [(16, 4), (64, 8), (8, 1)])
def test_sincos_2d_matches_dit(dim, grid):
    ours = D.sincos_2d_position_embedding(dim, grid)
    assert ours.dtype == torch.float32 and ours.shape == (grid * grid, dim)
    torch.testing.assert_close(ours, torch.from_numpy(dit_2d_sincos(dim, grid)).float(), rtol=0, atol=0)


def test_sincos_2d_layout_by_hand():
    table = D.sincos_2d_position_embedding(8, (2, 3))  # 2 rows, 3 columns
    # token r·3 + c: channels 0..3 = [sin c, sin c/100, cos c, cos c/100], 4..7 the same for r
    for r in range(2):
        for c in range(3):
            expect = [math.sin(c), math.sin(c / 100), math.cos(c), math.cos(c / 100),
                      math.sin(r), math.sin(r / 100), math.cos(r), math.cos(r / 100)]
            assert table[r * 3 + c].tolist() == pytest.approx(expect, abs=1e-7)
    with pytest.raises(ValueError, match="divisible by 4"):
        D.sincos_2d_position_embedding(6, 2)


def test_sincos_2d_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    for grid, base, scale in [(4, 4, 1.0), ((3, 5), 16, 1.0), ((6, 4), 8, 2.0)]:
        ours = D.sincos_2d_position_embedding(32, grid, base_size=base, interpolation_scale=scale)
        theirs = embeddings.get_2d_sincos_pos_embed(32, grid, base_size=base, interpolation_scale=scale)
        torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-7)


# --- patches ------------------------------------------------------------------------


def dit_unpatchify(x, p, c):
    """facebookresearch/DiT models.py DiT.unpatchify, transcribed."""
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))


def test_patchify_order_and_round_trip():
    images = torch.randn(2, 3, 8, 8)
    tokens = D.patchify(images, 2)
    assert tokens.shape == (2, 16, 12)
    torch.testing.assert_close(dit_unpatchify(tokens, 2, 3), images, rtol=0, atol=0)
    torch.testing.assert_close(D.unpatchify(tokens, 2, 3), images, rtol=0, atol=0)
    # token 5 is patch row 1, column 1 (pixels 2..3 × 2..3); value 7 = 1·(2·3) + 0·3 + 1 is
    # (row 1 in the patch, column 0, channel 1)
    assert tokens[1, 5, 7] == images[1, 1, 3, 2]
    wide = torch.randn(1, 2, 4, 12)
    tokens = D.patchify(wide, 4)
    assert tokens.shape == (1, 3, 32)
    torch.testing.assert_close(D.unpatchify(tokens, 4, 2, height=4, width=12), wide, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not split into 3×3"):
        D.patchify(images, 3)
    with pytest.raises(ValueError, match="square grid"):
        D.unpatchify(tokens, 4, 2)
    with pytest.raises(ValueError, match="not 4×4 patches of 3 channels"):
        D.unpatchify(tokens, 4, 3)


def test_patch_linear_equals_conv():
    conv = torch.nn.Conv2d(3, 10, kernel_size=2, stride=2)
    images = torch.randn(2, 3, 6, 4)
    expected = conv(images).flatten(2).transpose(1, 2)
    ours = D.patchify(images, 2) @ D.patch_weight_from_conv(conv.weight).T + conv.bias
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_patch_embed_matches_diffusers():
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    torch.manual_seed(0)
    theirs = embeddings.PatchEmbed(height=8, width=8, patch_size=2, in_channels=4, embed_dim=32)
    images = torch.randn(2, 4, 8, 8)
    ours = D.patchify(images, 2) @ D.patch_weight_from_conv(theirs.proj.weight).T + theirs.proj.bias
    ours = ours + D.sincos_2d_position_embedding(32, 4, base_size=4)
    torch.testing.assert_close(ours, theirs(images), rtol=1e-5, atol=1e-6)
    # SD3: a table for a 6×6 grid, cropped at its centre to the image's grid
    sd3 = embeddings.PatchEmbed(height=8, width=8, patch_size=2, in_channels=4, embed_dim=32, pos_embed_max_size=6)
    small = torch.randn(1, 4, 4, 8)  # a 2×4 grid of patches
    ours = D.patchify(small, 2) @ D.patch_weight_from_conv(sd3.proj.weight).T + sd3.proj.bias
    table = D.sincos_2d_position_embedding(32, 6, base_size=4)
    ours = ours + D.crop_position_embedding(table, 6, 2, 4)
    torch.testing.assert_close(ours, sd3(small), rtol=1e-5, atol=1e-6)


# --- MSRoPE -------------------------------------------------------------------------


def test_msrope_positions_by_hand():
    image, text = D.msrope_positions(4, 4, 3)
    rows = [-2, -1, 0, 1]
    assert image.tolist() == [[0, r, c] for r in rows for c in rows]
    assert text.tolist() == [[2, 2, 2], [3, 3, 3], [4, 4, 4]]  # M = max(4//2, 4//2) = 2
    image, text = D.msrope_positions(3, 5, 2)
    assert image.tolist() == [[0, r, c] for r in (-2, -1, 0) for c in (-3, -2, -1, 0, 1)]
    assert text.tolist() == [[2, 2, 2], [3, 3, 3]]  # M = max(1, 2)
    image, text = D.msrope_positions(2, 3, 2, centred=False, frames=2, image_index=1)
    assert image.tolist() == [[f, r, c] for f in (1, 2) for r in (0, 1) for c in (0, 1, 2)]
    assert text.tolist() == [[3, 3, 3], [4, 4, 4]]  # M = max(2, 3)


def test_msrope_angles_and_rotation_by_hand():
    positions = torch.tensor([[0, -1, 2], [1, 0, -3]])
    angles = D.msrope_angles(positions, axes_dims=(2, 4, 4), theta=100.0)
    expect = [[0.0, -1.0, -1 / 10, 2.0, 2 / 10], [1.0, 0.0, 0.0, -3.0, -3 / 10]]  # θ^(-2i/d): 1, 100^(-1/2)
    torch.testing.assert_close(angles, torch.tensor(expect))
    x = torch.randn(2, 10)
    rotated = D.apply_msrope(x, angles)
    # pair i = (x[2i], x[2i+1]) multiplied by e^{iθ}; laid out as [first members, second members]
    z = torch.view_as_complex(x.reshape(2, 5, 2).contiguous()) * torch.polar(torch.ones_like(angles), angles)
    torch.testing.assert_close(rotated, torch.cat((z.real, z.imag), dim=-1))


def test_msrope_attention_is_relative():
    """Scores of rotated queries and keys depend only on the position difference, axis by axis."""
    q, k = torch.randn(2, 12)
    shift = torch.tensor([[3, -2, 5]])
    pq, pk = torch.tensor([[0, 1, -1]]), torch.tensor([[2, -3, 4]])

    def score(a, b):
        axes = (4, 4, 4)
        return (D.apply_msrope(q, D.msrope_angles(a, axes)) * D.apply_msrope(k, D.msrope_angles(b, axes))).sum()

    torch.testing.assert_close(score(pq, pk), score(pq + shift, pk + shift), rtol=1e-5, atol=1e-5)


def test_msrope_matches_diffusers_qwen_image():
    qwen = pytest.importorskip("diffusers.models.transformers.transformer_qwenimage")
    axes = (4, 6, 6)
    rope = qwen.QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
    for h, w, text_len in [(4, 4, 3), (3, 5, 2), (6, 2, 4)]:
        vid, txt = rope([(1, h, w)], max_txt_seq_len=text_len, device=torch.device("cpu"))
        image, text = D.msrope_positions(h, w, text_len)
        torch.testing.assert_close(torch.polar(torch.ones(1), D.msrope_angles(image, axes)), vid)
        torch.testing.assert_close(torch.polar(torch.ones(1), D.msrope_angles(text, axes)), txt)
        # attention over the joint sequence (text first, as Qwen-Image) is the same with either rotation
        n = text_len + h * w
        q, k = torch.randn(2, 1, n, 2, sum(axes))  # [B, S, H, D]
        freqs = torch.cat((txt, vid))
        theirs = [qwen.apply_rotary_emb_qwen(x, freqs, use_real=False) for x in (q, k)]
        angles = D.joint_msrope_angles(h, w, text_len, axes_dims=axes)
        ours = [D.apply_msrope(x.transpose(1, 2), angles) for x in (q, k)]  # [B, H, S, D]
        torch.testing.assert_close(ours[0] @ ours[1].transpose(-1, -2),
                                   theirs[0].transpose(1, 2) @ theirs[1].transpose(1, 2).transpose(-1, -2),
                                   rtol=1e-5, atol=1e-5)
