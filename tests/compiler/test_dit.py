"""The diffusion ops of the language (archc/compiler/ops/diffusion.py) against plain references, and
specs/dit.arch: adaLN-Zero blocks are the identity at init, and a training step lowers the loss."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SPECS

import archc
from archc.dsl.diagnostics import SpecError
from archc.runtime.diffusion import DDPMObjective, sincos_2d_position_embedding


def _build(text: str):
    return archc.compile(text, name="d.arch").build()


def test_patchify_orders_patches_row_major_and_unpatchify_inverts_it():
    model = _build("""
model M(image: Image[B, 3, 4, 6]) {
    x = patchify(image, size=2)
    y = unpatchify(x, like=image, size=2)
    return x, y
}""")
    image = torch.randn(2, 3, 4, 6)
    out = model(image)
    assert out["x"].shape == (2, 6, 12)
    for r in range(2):
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    for ch in range(3):  # token r·cols + c, channel (row in patch, column, channel)
                        assert out["x"][1, r * 3 + c, (i * 2 + j) * 3 + ch] == image[1, ch, r * 2 + i, c * 2 + j]
    assert torch.equal(out["y"], image)


def test_unpatchify_with_channels_gives_that_many_channels_at_the_images_size():
    model = _build("""
model M(image: Image[B, 1, 4, 6]) {
    x = patchify(concat([image, image * 2], dim=1), size=2)
    y = unpatchify(x, like=image, size=2, channels=2)
    return y
}""")
    image = torch.randn(3, 1, 4, 6)
    torch.testing.assert_close(model(image)["y"], torch.cat([image, image * 2], dim=1))


@pytest.mark.parametrize("body, words", [
    ("x = patchify(image, size=3)", "does not split into 3×3 patches"),
    ("x = unpatchify(linear(patchify(image, size=2), 5), like=image, size=2)", "are not the 2×3 grid"),
    ("x = unpatchify(patchify(image, size=2), like=image, size=2, channels=2)", "of 2 channels of an image [B, 2, 4, 6]"),
    ("x, t, y = add_noise(image, objective=\"epsilon\")", 'must be one of "eps", "x0", "v", "flow"'),
    ("x = sincos_2d(linear(patchify(image, size=2), 8), rows=3, cols=3)", "not a 3×3 grid"),
])
def test_diffusion_ops_check_their_shapes_and_choices(body, words):
    with pytest.raises(SpecError) as info:
        archc.compile(f"model M(image: Image[B, 1, 4, 6]) {{\n    {body}\n    return x\n}}", name="d.arch")
    assert words in str(info.value)


def test_timestep_and_sincos_embeddings_match_their_formulas():
    model = _build("""
model M(t: Tensor[B], x: Tensor[B, 6, 8]) {
    e = timestep_embedding(t, 6)
    p = sincos_2d(x, rows=2, cols=3)
    return e, p
}""")
    t = torch.tensor([0.0, 3.0, 250.5])
    out = model(t, torch.zeros(3, 6, 8))
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 3) for i in range(3)])
    angles = t[:, None] * freqs[None]
    torch.testing.assert_close(out["e"], torch.cat([angles.cos(), angles.sin()], dim=-1))  # DiT: [cos, sin]
    table = out["p"]
    assert table.shape == (6, 8)
    for r in range(2):
        for c in range(3):  # column in the first half, row in the second (DiT's meshgrid quirk)
            for half, pos in ((0, c), (1, r)):
                w = torch.tensor([1 / 10000 ** (i / 2) for i in range(2)])
                want = torch.cat([(pos * w).sin(), (pos * w).cos()])
                torch.testing.assert_close(table[r * 3 + c, half * 4:(half + 1) * 4], want)
    torch.testing.assert_close(table, sincos_2d_position_embedding(8, (2, 3)))


@pytest.mark.parametrize("objective", ["eps", "x0", "v", "flow"])
def test_add_noise_gives_the_noised_image_its_time_and_the_target(objective):
    model = _build(f"""
model M(image: Image[B, 1, 4, 4]) {{
    noisy, t, target = add_noise(image, objective="{objective}", schedule="cosine", steps=100)
    loss = diffusion_loss(noisy, target)
    return noisy, t, target, loss
}}""")
    x0 = torch.randn(64, 1, 4, 4)
    torch.manual_seed(0)
    out = model(x0)
    noisy, t, target = out["noisy"], out["t"], out["target"]
    assert t.shape == (64,) and t.dtype == torch.float32
    if objective == "flow":  # x_t = (1 − s) x0 + s ε with s = t / 1000, target ε − x0
        s = (t / 1000).reshape(-1, 1, 1, 1)
        assert ((s > 0) & (s < 1)).all()
        eps = target + x0
        torch.testing.assert_close(noisy, (1 - s) * x0 + s * eps)
    else:
        assert torch.equal(t, t.round()) and t.min() >= 0 and t.max() <= 99 and len(set(t.tolist())) > 10
        ab = DDPMObjective(objective, "cosine", 100).alpha_bar(t.long()).float().reshape(-1, 1, 1, 1)
        a, sigma = ab.sqrt(), (1 - ab).sqrt()
        eps = (noisy - a * x0) / sigma
        want = {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[objective]
        torch.testing.assert_close(target, want, atol=1e-4, rtol=1e-4)
        assert abs(eps.std().item() - 1) < 0.15  # the noise is standard normal
    per_sample = (noisy - target).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(out["loss"], per_sample)


def test_drop_condition_drops_to_the_null_label_only_while_training():
    model = _build("""
model M(label: Tokens[B]) {
    y = drop_condition(label, 0.5, null=10)
    return y
}""")
    label = torch.randint(0, 10, (4000,))
    y = model(label)["y"]
    dropped = y == 10
    assert 0.45 < dropped.float().mean() < 0.55
    assert torch.equal(y[~dropped], label[~dropped])
    model.eval()
    assert torch.equal(model(label)["y"], label)


def test_dit_blocks_start_as_the_identity_and_the_model_predicts_zeros():
    model = archc.compile(SPECS / "dit.arch").build()
    image = torch.randn(4, 1, 8, 8)
    label = torch.tensor([0, 3, 7, 9])
    out = model(image, label)
    assert out["pred"].shape == image.shape and torch.equal(out["pred"], torch.zeros_like(image))
    h, c = torch.randn(4, 16, 64), torch.randn(4, 64)
    for block in model.blocks:
        torch.testing.assert_close(block(h, c), h)


def test_one_dit_training_step_on_a_fixed_batch_lowers_the_loss():
    torch.manual_seed(0)
    model = archc.compile(SPECS / "dit.arch").build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    image = torch.rand(16, 1, 8, 8) * 2 - 1
    label = torch.arange(16) % 10

    def loss() -> torch.Tensor:
        torch.manual_seed(1)  # the same times, noise and dropped labels each time
        return model(image, label)["loss"]

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before - 1e-3, (before.item(), after.item())


def test_the_evaluation_grid_is_seeded_and_leaves_the_training_draws_alone():
    from archc.training.image_source import GRID_PER_CLASS, ImageSource, diffusion_spec
    from archc.training.images import make_image_data
    from archc.training.train import TrainConfig

    compiled = archc.compile(SPECS / "dit.arch", {"n_layers": 1, "d_model": 32, "n_heads": 2})
    torch.manual_seed(0)
    model = compiled.build()
    with torch.no_grad():  # a model that does not predict zeros: the grid depends on its weights
        for p in model.parameters():
            p.normal_(0.0, 0.05)
    train_set, val = make_image_data("digits")
    source = ImageSource(train_set, val, diffusion_spec(compiled), TrainConfig(batch_size=256, seed=3))
    torch.manual_seed(1)
    first = source.evaluate(model, "cpu")
    grid = source.grid
    after = torch.rand(3)
    torch.manual_seed(1)
    assert source.evaluate(model, "cpu") == first and torch.equal(source.grid, grid)
    assert torch.equal(torch.rand(3), after)  # the global generator is where it was
    assert grid.shape == (10 * GRID_PER_CLASS, 1, 8, 8)
    assert set(first) == {"val_loss", "sample_accuracy", "sample_frechet"}


def test_the_sampler_calls_the_model_with_its_own_x_t_and_time():
    from archc.runtime.diffusion import denoiser

    model = _build("""
model M(image: Image[B, 1, 2, 2], label: Tokens[B]) {
    noisy, t, target = add_noise(image)
    pred = noisy * 2 + unsqueeze(unsqueeze(unsqueeze(t, 1), 2), 3) + unsqueeze(unsqueeze(unsqueeze(label, 1), 2), 3)
    loss = diffusion_loss(pred, target)
    return pred, loss
}""")
    x_t, time = torch.randn(3, 1, 2, 2), torch.tensor([10.0, 500.0, 999.0])
    label = torch.tensor([1, 2, 3])
    got = denoiser(model, "image", "label")(x_t, time, label)
    torch.testing.assert_close(got, x_t * 2 + (time + label).reshape(3, 1, 1, 1))
    torch.manual_seed(0)
    trained = model(x_t, label)["pred"]  # outside the sampler it draws its own noise again
    assert not torch.allclose(trained, got)


def test_archc_train_learns_the_digits_and_archc_sample_draws_a_grid(tmp_path, capsys):
    from archc.cli import main
    from archc.training.train import TrainConfig, train

    cfg = TrainConfig(batch_size=64, steps=30, eval_every=30, checkpoint_every=30, progress=False, lr=1e-3,
                      warmup=0, out_dir=str(tmp_path / "run"))
    result = train(str(SPECS / "dit.arch"), cfg, {"n_layers": 1, "d_model": 32, "n_heads": 2})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and result.val_loss < rows[0]["val_loss"] - 0.03, (rows[0], result.val_loss)
    assert (tmp_path / "run" / "samples.png").exists() and (tmp_path / "run" / "loss.png").exists()
    # every evaluation writes its grid (10 of each digit at guidance 3, from the run's seed) and scores it
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30]
    for r in evals:
        assert 0 <= r["sample_accuracy"] <= 1 and r["sample_frechet"] > 0
        assert (tmp_path / "run" / "samples" / f"step_{r['step']}.png").is_file()
    assert evals[1]["sample_frechet"] < evals[0]["sample_frechet"]  # 30 steps move samples off pure noise
    grid = tmp_path / "grid.png"
    args = ["sample", str(SPECS / "dit.arch"), "--checkpoint", str(tmp_path / "run"), "--sampler", "ddim",
            "--steps", "5", "--cfg", "3.0", "--label", "7", "--count", "4", "-o", str(grid)]
    assert main(args) == 0
    first = grid.read_bytes()
    assert main(args) == 0 and grid.read_bytes() == first  # a fixed seed gives the same images
    assert "wrote" in capsys.readouterr().out
    from PIL import Image

    assert Image.open(grid).size == (2 * 9 * 4 + 4, 2 * 9 * 4 + 4)
