"""archc.runtime.samplers: each step against its formula on hand-made tensors, perfect models, CFG, seeds."""

from __future__ import annotations

import math

import pytest
import torch

from archc.runtime import diffusion as D
from archc.runtime import samplers as S

SHAPE = (3, 2, 4, 4)


@pytest.fixture
def hand():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(3)]


def perfect_ddpm_model(objective, x0):
    """The network that knows x0: predicts exactly the objective's target for any x_t."""
    def model(x, time, condition):
        t = time.long()
        a, s = objective.coefficients(t, x)
        eps = (x - a * x0) / s
        return objective.target(x0, eps, t)
    return model


def perfect_flow_model(x0):
    """The true velocity toward a known x0: on the path x_t = (1 − t)·x0 + t·ε it is ε − x0 = (x_t − x0)/t."""
    def model(x, time, condition):
        t = (time / 1000).reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        return (x - x0) / t
    return model


# --- grids --------------------------------------------------------------------------


def test_grids():
    assert S.ddpm_timesteps(1000, 1000) == list(range(999, -1, -1))
    assert S.ddpm_timesteps(1000, 4) == [999, 666, 333, 0]
    assert S.ddpm_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError, match="between 1 and"):
        S.ddpm_timesteps(100, 101)
    assert S.flow_sigmas(4) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert S.flow_sigmas(2, shift=3.0) == pytest.approx([1.0, 0.75, 0.0])


# --- single steps against their formulas --------------------------------------------


@pytest.mark.parametrize("variance", S.VARIANCES)
def test_ddpm_step_full_grid_is_ho_et_al(hand, variance):
    obj = D.DDPMObjective("eps", "linear")
    x_t, eps, z = hand
    t = 500
    beta, alpha, ab, ab_prev = (obj.betas[t].item(), 1 - obj.betas[t].item(), obj.alphas_cumprod[t].item(),
                                obj.alphas_cumprod[t - 1].item())
    x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    var = beta * (1 - ab_prev) / (1 - ab) if variance == "small" else beta
    expected = (x_t - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha) + math.sqrt(var) * z
    torch.testing.assert_close(S.ddpm_step(obj, x_t, t, t - 1, x0, z, variance), expected)


def test_ddpm_step_respaced_and_last(hand):
    obj = D.DDPMObjective("eps", "cosine")
    x_t, eps, z = hand
    t, t_next = 700, 350
    ab, ab_next = obj.alphas_cumprod[t].item(), obj.alphas_cumprod[t_next].item()
    alpha = ab / ab_next
    beta = 1 - alpha
    x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    expected = (x_t - beta / math.sqrt(1 - ab) * eps) / math.sqrt(alpha) \
        + math.sqrt(beta * (1 - ab_next) / (1 - ab)) * z
    torch.testing.assert_close(S.ddpm_step(obj, x_t, t, t_next, x0, z), expected)
    # the last step, to the data, returns x̂0 and adds no noise
    torch.testing.assert_close(S.ddpm_step(obj, x_t, 0, -1, x0, None), x0)
    with pytest.raises(ValueError, match="earlier"):
        S.ddpm_step(obj, x_t, 3, 5, x0, z)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_is_song_et_al(hand, eta):
    obj = D.DDPMObjective("eps", "linear")
    x_t, eps, z = hand
    t, t_next = 800, 600
    ab, ab_next = obj.alphas_cumprod[t].item(), obj.alphas_cumprod[t_next].item()
    sigma = eta * math.sqrt((1 - ab_next) / (1 - ab)) * math.sqrt(1 - ab / ab_next)
    assert S.ddim_sigma(obj, t, t_next, eta) == pytest.approx(sigma, rel=1e-12)
    x0 = (x_t - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
    expected = math.sqrt(ab_next) * x0 + math.sqrt(1 - ab_next - sigma**2) * eps + sigma * z
    torch.testing.assert_close(S.ddim_step(obj, x_t, t, t_next, x0, eps, eta, z), expected)
    if eta == 1.0:  # η = 1 has DDPM's posterior variance β̃ on the respaced process
        beta = 1 - ab / ab_next
        assert sigma**2 == pytest.approx(beta * (1 - ab_next) / (1 - ab), rel=1e-12)
    if eta == 0.0:  # deterministic: needs no noise at all
        torch.testing.assert_close(S.ddim_step(obj, x_t, t, t_next, x0, eps, 0.0, None), expected)


def test_euler_and_heun_steps(hand):
    x, _, _ = hand

    def velocity(x, sigma):  # a velocity field that changes along the step, so Heun differs from Euler
        return sigma * x + 1.0

    sigma, sigma_next = 0.8, 0.5
    dt = sigma_next - sigma
    v1 = sigma * x + 1
    torch.testing.assert_close(S.euler_step(x, sigma, sigma_next, v1), x + dt * v1)
    x_euler = x + dt * v1
    v2 = sigma_next * x_euler + 1
    torch.testing.assert_close(S.heun_step(velocity, x, sigma, sigma_next), x + dt * (v1 + v2) / 2)
    # into σ = 0 Heun is one Euler step (Karras et al.'s Algorithm 2)
    torch.testing.assert_close(S.heun_step(velocity, x, 0.25, 0.0), x - 0.25 * (0.25 * x + 1))


# --- whole trajectories -------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("steps,shift", [(1, 1.0), (7, 1.0), (10, 3.0)])
def test_perfect_flow_model_integrates_to_x0(sampler, steps, shift):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    obj = D.FlowMatchingObjective(shift=shift)
    out = S.sample(perfect_flow_model(x0), obj, SHAPE, sampler=sampler, steps=steps, seed=4, dtype=torch.float64)
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("prediction", D.PREDICTIONS)
@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_perfect_ddpm_model_recovers_x0(prediction, sampler):
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    obj = D.DDPMObjective(prediction, "linear")
    for steps in (1, 10, 1000):
        out = S.sample(perfect_ddpm_model(obj, x0), obj, SHAPE, sampler=sampler, steps=steps, seed=4,
                       dtype=torch.float64)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-9)


def test_ddim_stays_on_the_noising_path():
    """With a perfect ε-model and η = 0 every DDIM iterate is sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε for the starting ε."""
    obj = D.DDPMObjective("eps", "cosine")
    x0, eps = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = perfect_ddpm_model(obj, x0)
    x, t = obj.noisy(x0, eps, torch.full((3,), 999)), 999
    for t_next in (700, 300, 0):
        time = torch.full((3,), float(t))
        x0_hat, eps_hat = obj.split_prediction(x, time.long(), model(x, time, None))
        x = S.ddim_step(obj, x, t, t_next, x0_hat, eps_hat)
        torch.testing.assert_close(x, obj.noisy(x0, eps, torch.full((3,), t_next)))
        t = t_next


def test_seeds_fix_samples():
    obj_eps, obj_flow = D.DDPMObjective("eps"), D.FlowMatchingObjective()

    def model(x, time, condition):  # any fixed function of its inputs
        return torch.tanh(x * 0.5 + time.reshape(-1, 1, 1, 1) * 1e-3)

    for obj, sampler, eta in [(obj_eps, "ddpm", 0.0), (obj_eps, "ddim", 0.0), (obj_eps, "ddim", 1.0),
                              (obj_flow, "euler", 0.0), (obj_flow, "heun", 0.0)]:
        a = S.sample(model, obj, SHAPE, sampler=sampler, steps=8, eta=eta, seed=11)
        b = S.sample(model, obj, SHAPE, sampler=sampler, steps=8, eta=eta, seed=11)
        c = S.sample(model, obj, SHAPE, sampler=sampler, steps=8, eta=eta, seed=12)
        assert torch.equal(a, b) and not torch.equal(a, c), (sampler, eta)
    # from one starting noise, DDIM with η = 0 ignores the seed; DDPM and DDIM with η > 0 draw from it
    start = torch.randn(SHAPE)
    runs = {seed: [S.sample(model, obj_eps, SHAPE, sampler=s, steps=8, eta=eta, seed=seed, noise=start)
                   for s, eta in (("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0))] for seed in (1, 2)}
    assert torch.equal(runs[1][0], runs[2][0])
    assert not torch.equal(runs[1][1], runs[2][1]) and not torch.equal(runs[1][2], runs[2][2])


# --- classifier-free guidance -------------------------------------------------------


class CountingModel:
    """Predictions that depend non-linearly on the label; records the batch of every call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, time, labels):
        self.batches.append(x.shape[0])
        return torch.sin(x * (labels.reshape(-1, 1, 1, 1) + 1.0)) + time.reshape(-1, 1, 1, 1) * 1e-3


def test_cfg_scale_one_is_the_conditional_prediction():
    x, time = torch.randn(SHAPE), torch.full((3,), 5.0)
    labels, null = torch.tensor([1, 4, 7]), torch.full((3,), 10)
    model = CountingModel()
    conditional, unconditional = model(x, time, labels), model(x, time, null)
    model.batches.clear()
    torch.testing.assert_close(S.guided_prediction(model, x, time, labels, null, 1.0), conditional)
    assert model.batches == [6]  # one forward of the conditional and null halves together
    guided = S.guided_prediction(model, x, time, labels, null, 4.0)
    torch.testing.assert_close(guided, unconditional + 4.0 * (conditional - unconditional))
    with pytest.raises(ValueError, match="needs a null condition"):
        S.guided_prediction(model, x, time, labels, None, 3.0)


def test_cfg_in_the_sampler_and_structured_conditions():
    obj = D.DDPMObjective("eps")
    labels, null = torch.tensor([1, 4, 7]), torch.full((3,), 10)
    model = CountingModel()
    guided = S.sample(model, obj, SHAPE, steps=5, condition=labels, null_condition=null, cfg_scale=1.0, seed=0)
    assert model.batches == [6] * 5
    plain = S.sample(model, obj, SHAPE, steps=5, condition=labels, seed=0)
    torch.testing.assert_close(guided, plain, rtol=1e-5, atol=1e-5)
    strong = S.sample(model, obj, SHAPE, steps=5, condition=labels, null_condition=null, cfg_scale=3.0, seed=0)
    assert not torch.allclose(strong, plain)

    def dict_model(x, time, condition):
        return CountingModel()(x, time, condition["labels"]) * condition["scale"].reshape(-1, 1, 1, 1)

    cond = {"labels": labels, "scale": torch.ones(3)}
    nulls = {"labels": null, "scale": torch.ones(3)}
    torch.testing.assert_close(S.sample(dict_model, obj, SHAPE, steps=3, condition=cond, null_condition=nulls,
                                        seed=0),
                               S.sample(dict_model, obj, SHAPE, steps=3, condition=cond, seed=0),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same structure"):
        S.sample(dict_model, obj, SHAPE, steps=3, condition=cond, null_condition=null, seed=0)


def test_sampler_errors():
    model = CountingModel()
    with pytest.raises(ValueError, match="did you mean 'heun'"):
        S.sample(model, D.FlowMatchingObjective(), SHAPE, sampler="huen")
    with pytest.raises(ValueError, match="flow matching with euler or heun"):
        S.sample(model, D.DDPMObjective(), SHAPE, sampler="euler")
    with pytest.raises(ValueError, match="flow matching with euler or heun"):
        S.sample(model, D.FlowMatchingObjective(), SHAPE, sampler="ddim")
    with pytest.raises(ValueError, match="eta must be"):
        S.sample(model, D.DDPMObjective(), SHAPE, eta=-1.0)
    with pytest.raises(ValueError, match="starting noise has shape"):
        S.sample(model, D.DDPMObjective(), SHAPE, noise=torch.zeros(1, 2))
