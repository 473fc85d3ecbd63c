"""Samplers for archc's diffusion objectives: DDPM ancestral and DDIM (η) on DDPM schedules, Euler and Heun
for flow matching, any number of steps, with classifier-free guidance.

A model here is any callable `model(x_t, time, condition) -> prediction`: `time`
is `objective.model_time(t)` for the batch ([B]), `condition` whatever the
network takes (labels, embeddings, a dict of tensors, or None), and the
prediction is what the objective trains it to predict (ε, x0, v, or the flow
velocity). Nothing here depends on how the model was built. Put a network in
eval mode before sampling; sampling runs without gradients.

Design choices (formulas in docs/diffusion.md):

- DDPM / DDIM steps go from step t to an earlier step t' of a grid of `steps`
  evenly spaced integers from T−1 down to 0 (rounded, like DiT's respacing),
  then to "step −1", the data (ᾱ = 1). On a sub-grid, DDPM uses the respaced
  process: α = ᾱ_t / ᾱ_t', β = 1 − α, the posterior mean of x_t' given x_t and
  x̂0, and the posterior variance β·(1 − ᾱ_t')/(1 − ᾱ_t) ("small", DDPM's
  β̃) or β ("large"); on the full grid these are Ho et al.'s formulas.
- Flow-matching samplers integrate dx/dσ = v from σ = 1 to 0 on
  linspace(1, 0, steps + 1), optionally shifted (SD3's σ' = α·σ / (1 + (α − 1)·σ)).
  Heun's last step (to σ = 0) is an Euler step, as in Karras et al.'s Algorithm 2.
- Classifier-free guidance: with a null condition, every step runs the model
  once on the batch of conditional and null inputs concatenated, and uses
  u + w·(c − u) (w = 1 gives back the conditional prediction, at the cost of
  the doubled batch; pass no null condition to sample without guidance).
- One seed fixes the initial noise and every step's noise: they are drawn on
  the CPU from a generator seeded once, then moved, so a seed gives the same
  samples on every run.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from archc.runtime.diffusion import (
    DDPMObjective,
    FlowMatchingObjective,
    Objective,
    shift_timesteps,
    unknown_choice,
)

SAMPLERS = ("ddpm", "ddim", "euler", "heun")
VARIANCES = ("small", "large")

Model = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


# --- grids --------------------------------------------------------------------------


def ddpm_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` integer steps from T−1 down to 0, evenly spaced and rounded (DiT's `space_timesteps`)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and the objective's {num_timesteps} timesteps, got {steps}")
    return [int(t) for t in torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().tolist()]


def flow_sigmas(steps: int, shift: float = 1.0) -> list[float]:
    """steps + 1 noise levels from 1 down to 0, evenly spaced, then shifted when `shift` != 1."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift != 1.0:
        sigmas = shift_timesteps(sigmas, shift)
    return sigmas.tolist()


# --- one step of each sampler (hand-checkable) ---------------------------------------


def ddpm_step(objective: DDPMObjective, x_t: torch.Tensor, t: int, t_next: int, x0: torch.Tensor,
              noise: torch.Tensor | None, variance: str = "small") -> torch.Tensor:
    """Ancestral step from step t to t_next < t (−1: the data) given the model's x̂0.

    mean = sqrt(ᾱ')·β/(1 − ᾱ)·x̂0 + sqrt(α)·(1 − ᾱ')/(1 − ᾱ)·x_t with α = ᾱ/ᾱ', β = 1 − α;
    with x̂0 from ε̂ this is (x_t − β/sqrt(1 − ᾱ)·ε̂)/sqrt(α). Noise σ·z is added except on the last step."""
    if variance not in VARIANCES:
        raise unknown_choice("DDPM variance", variance, VARIANCES)
    alpha_bar, alpha_bar_next = _alpha_bars(objective, t, t_next)
    alpha = alpha_bar / alpha_bar_next
    beta = 1 - alpha
    mean = (math.sqrt(alpha_bar_next) * beta / (1 - alpha_bar)) * x0 \
        + (math.sqrt(alpha) * (1 - alpha_bar_next) / (1 - alpha_bar)) * x_t
    if t_next < 0:
        return mean
    var = beta * (1 - alpha_bar_next) / (1 - alpha_bar) if variance == "small" else beta
    return mean + math.sqrt(var) * noise


def ddim_sigma(objective: DDPMObjective, t: int, t_next: int, eta: float) -> float:
    """σ = η·sqrt((1 − ᾱ')/(1 − ᾱ))·sqrt(1 − ᾱ/ᾱ')."""
    alpha_bar, alpha_bar_next = _alpha_bars(objective, t, t_next)
    return eta * math.sqrt((1 - alpha_bar_next) / (1 - alpha_bar)) * math.sqrt(1 - alpha_bar / alpha_bar_next)


def ddim_step(objective: DDPMObjective, x_t: torch.Tensor, t: int, t_next: int, x0: torch.Tensor,
              eps: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t' = sqrt(ᾱ')·x̂0 + sqrt(1 − ᾱ' − σ²)·ε̂ + σ·z (Song et al.); η = 0 draws nothing."""
    _, alpha_bar_next = _alpha_bars(objective, t, t_next)
    sigma = ddim_sigma(objective, t, t_next, eta)
    x = math.sqrt(alpha_bar_next) * x0 + math.sqrt(max(1 - alpha_bar_next - sigma**2, 0.0)) * eps
    return x + sigma * noise if sigma > 0 else x


def euler_step(x: torch.Tensor, sigma: float, sigma_next: float, velocity: torch.Tensor) -> torch.Tensor:
    """x + (σ' − σ)·v: one Euler step of dx/dσ = v (SD3 convention, σ decreasing toward the data)."""
    return x + (sigma_next - sigma) * velocity


def heun_step(velocity_at: Callable[[torch.Tensor, float], torch.Tensor], x: torch.Tensor, sigma: float,
              sigma_next: float) -> torch.Tensor:
    """Heun's step: an Euler step, then the mean of the velocities at both ends (none past σ' = 0)."""
    velocity = velocity_at(x, sigma)
    x_euler = euler_step(x, sigma, sigma_next, velocity)
    if sigma_next == 0:
        return x_euler
    return x + (sigma_next - sigma) * 0.5 * (velocity + velocity_at(x_euler, sigma_next))


def _alpha_bars(objective: DDPMObjective, t: int, t_next: int) -> tuple[float, float]:
    if not -1 <= t_next < t < objective.num_timesteps:
        raise ValueError(f"a step goes from t to an earlier t' >= -1 within {objective.num_timesteps} "
                         f"timesteps; got {t} -> {t_next}")
    return float(objective.alpha_bar(torch.tensor(t))), float(objective.alpha_bar(torch.tensor(t_next)))


# --- guidance -----------------------------------------------------------------------


def _concat(a, b):
    """Two conditions of one structure (tensor, dict, tuple / list of them, or None) joined along the batch."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.cat((a, b))
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        return {k: _concat(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)) and type(a) is type(b) and len(a) == len(b):
        return type(a)(_concat(x, y) for x, y in zip(a, b))
    raise ValueError("the condition and the null condition must have the same structure (a tensor, a dict "
                     f"or a tuple of tensors); got {type(a).__name__} and {type(b).__name__}")


def guided_prediction(model: Model, x: torch.Tensor, time: torch.Tensor, condition, null_condition=None,
                      cfg_scale: float = 1.0) -> torch.Tensor:
    """The model's prediction, guided: u + w·(c − u) from one forward over [conditional; null] inputs."""
    if null_condition is None:
        if cfg_scale != 1.0:
            raise ValueError(f"cfg_scale={cfg_scale} needs a null condition (the dropped label or empty "
                             "prompt the model was trained with)")
        return model(x, time, condition)
    both = model(torch.cat((x, x)), torch.cat((time, time)), _concat(condition, null_condition))
    conditional, unconditional = both.chunk(2)
    return unconditional + cfg_scale * (conditional - unconditional)


# --- the sampling loop --------------------------------------------------------------


@torch.no_grad()
def sample(model: Model, objective: Objective, shape: tuple[int, ...], *, sampler: str | None = None,
           steps: int = 50, condition=None, null_condition=None, cfg_scale: float = 1.0, eta: float = 0.0,
           variance: str = "small", clip_x0: float | None = None, shift: float | None = None, seed: int = 0,
           noise: torch.Tensor | None = None, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Draw samples of `shape` ([B, ...]) from the model.

    sampler: ddpm or ddim (default) for DDPM objectives, euler (default) or heun
    for flow matching. eta: DDIM's η (0 deterministic, 1 like DDPM). variance:
    DDPM's small (β̃) or large (β). clip_x0: clamp x̂0 to ±clip_x0 in DDPM/DDIM
    steps (ε̂ recomputed from it, as DiT does). shift: the flow grid's time shift
    (default: the objective's). noise: the starting x_T (default: drawn from
    `seed`)."""
    flow = isinstance(objective, FlowMatchingObjective)
    sampler = sampler or ("euler" if flow else "ddim")
    if sampler not in SAMPLERS:
        raise unknown_choice("sampler", sampler, SAMPLERS)
    if flow != (sampler in ("euler", "heun")):
        raise ValueError(f"sampler {sampler!r} does not fit {objective!r}; DDPM objectives (eps, x0, v) sample "
                         "with ddpm or ddim, flow matching with euler or heun")
    if eta < 0:
        raise ValueError(f"eta must be at least 0, got {eta}")
    generator = torch.Generator().manual_seed(seed)

    def draw() -> torch.Tensor:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    x = draw() if noise is None else noise.to(device=device, dtype=dtype)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"the starting noise has shape {tuple(x.shape)}, not {tuple(shape)}")

    def predict(x: torch.Tensor, t: float) -> torch.Tensor:
        # times reach the network in fp32 (fp64 when sampling in fp64), never in a 16-bit dtype
        time_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        time = objective.model_time(torch.full((x.shape[0],), t, dtype=time_dtype, device=x.device))
        return guided_prediction(model, x, time, condition, null_condition, cfg_scale)

    if flow:
        sigmas = flow_sigmas(steps, objective.shift if shift is None else shift)
        for sigma, sigma_next in itertools.pairwise(sigmas):
            if sampler == "euler":
                x = euler_step(x, sigma, sigma_next, predict(x, sigma))
            else:
                x = heun_step(predict, x, sigma, sigma_next)
        return x

    grid = ddpm_timesteps(objective.num_timesteps, steps) + [-1]
    for t, t_next in itertools.pairwise(grid):
        t_batch = torch.full((x.shape[0],), t, device=x.device)
        x0, eps = objective.split_prediction(x, t_batch, predict(x, t))
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            a, s = objective.coefficients(t_batch, x)
            eps = (x - a * x0) / s
        if sampler == "ddpm":
            x = ddpm_step(objective, x, t, t_next, x0, draw() if t_next >= 0 else None, variance)
        else:
            sigma = ddim_sigma(objective, t, t_next, eta)
            x = ddim_step(objective, x, t, t_next, x0, eps, eta, draw() if sigma > 0 else None)
    return x
