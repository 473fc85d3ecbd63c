"""Diffusion objectives and the image pieces that DiT / MMDiT modules call.

docs/diffusion.md states every formula with its paper; in short:

- **DDPM objectives** (`DDPMObjective`): x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε at an
  integer step t in 0..T−1 (index t is the paper's step t + 1, as in DiT's code).
  Schedules `linear` (Ho et al.; β from 1e-4 to 0.02 at T = 1000, both ends scaled
  by 1000/T for other T, as DiT does) and `cosine` (Nichol & Dhariwal; DiT's
  `squaredcos_cap_v2`, s = 0.008, β capped at 0.999). The network predicts ε, x0,
  or v = sqrt(ᾱ)·ε − sqrt(1 − ᾱ)·x0 (Salimans & Ho). Schedules are float64, like
  DiT's numpy tables; coefficients are cast to the data's dtype when used.
- **Flow matching, SD3 convention** (`FlowMatchingObjective`): x_t = (1 − t)·x0 + t·ε
  with t in [0, 1] and t = 1 pure noise; the network predicts the velocity
  ε − x0. (Liu et al. write the same straight path the other way round — noise
  at 0, data at 1, velocity data − noise; archc uses only the SD3 one.) Training
  times are uniform or logit-normal, t = sigmoid(m + s·u) with u ~ N(0, 1), then
  optionally shifted, t' = α·t / (1 + (α − 1)·t), toward noise for large images.
- What the network is given as its time: the DDPM step as a float (DiT), and
  1000·t for flow matching (SD3 and diffusers feed σ·1000); `objective.model_time`.
- Classifier-free guidance training drops the condition with probability p to a
  null label (DiT's extra class id) or a null embedding (`drop_condition`).
- Sinusoidal timestep embedding with diffusers' `flip_sin_to_cos` and
  `downscale_freq_shift` (DiT is flip=True, shift=0; diffusers' DiT port uses
  shift=1; SD3 shift=0), DiT's 2-D sin-cos position table (columns in the first
  half of the channels, a quirk of its meshgrid), patchify / unpatchify in DiT's
  token order, and Qwen-Image's MSRoPE position tables.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch

from archc.runtime.rope import apply_interleaved_rope

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")
OBJECTIVES = ("eps", "x0", "v", "flow")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")


def unknown_choice(kind: str, name, choices: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(str(name), choices, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}{hint} (choose from {', '.join(choices)})")


def _home(generator: torch.Generator | None):
    """The device random draws are made on: the generator's own (a CPU generator gives the same draws everywhere)."""
    return generator.device if generator is not None else None


def _as_float(t) -> torch.Tensor:
    """Times as floating point: fp32 unless they already are floating (fp64 stays fp64)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.float()


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] coefficients as [B, 1, ..., 1] in `like`'s dtype, ready to broadcast over a batch."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


# --- noise schedules ----------------------------------------------------------------


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear β_t, float64; for T != 1000 both ends scale by 1000/T (DiT's `get_named_beta_schedule`)."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: β_i = min(1 − f((i+1)/T) / f(i/T), max_beta),
    f(u) = cos²((u+s)/(1+s)·π/2)."""
    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(schedule: str, num_timesteps: int = 1000) -> torch.Tensor:
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be at least 1, got {num_timesteps}")
    if schedule not in SCHEDULES:
        raise unknown_choice("noise schedule", schedule, SCHEDULES)
    betas = linear_betas(num_timesteps) if schedule == "linear" else cosine_betas(num_timesteps)
    if not (betas < 1).all():  # the linear ends scale by 1000/T: β_T = 20/T
        raise ValueError(f"the {schedule} schedule with {num_timesteps} timesteps has a β of 1 or more; "
                         "use at least 20 timesteps")
    return betas


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift t' = α·t / (1 + (α − 1)·t): α > 1 spends more of training (or sampling) near noise."""
    if shift <= 0:
        raise ValueError(f"the time shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def resolution_shift(num_tokens: int, base_num_tokens: int) -> float:
    """SD3's resolution-dependent shift α = sqrt(m / n): m tokens (or pixels) now, n at the base resolution."""
    if num_tokens <= 0 or base_num_tokens <= 0:
        raise ValueError(f"token counts must be positive, got {num_tokens} and {base_num_tokens}")
    return math.sqrt(num_tokens / base_num_tokens)


# --- objectives ---------------------------------------------------------------------


class DDPMObjective:
    """A DDPM forward process and what the network predicts (ε, x0 or v), at integer steps t in 0..T−1."""

    kind = "ddpm"

    def __init__(self, prediction: str = "eps", schedule: str = "linear", num_timesteps: int = 1000) -> None:
        if prediction not in PREDICTIONS:
            raise unknown_choice("prediction", prediction, PREDICTIONS)
        self.prediction, self.schedule, self.num_timesteps = prediction, schedule, num_timesteps
        self.betas = make_betas(schedule, num_timesteps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    def __repr__(self) -> str:
        return (f"DDPMObjective(prediction={self.prediction!r}, schedule={self.schedule!r}, "
                f"num_timesteps={self.num_timesteps})")

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer steps t (float64); a step of −1 stands for the clean data, ᾱ = 1."""
        t = torch.as_tensor(t).long()
        table = self.alphas_cumprod.to(t.device)
        return torch.where(t >= 0, table[t.clamp(min=0)], torch.ones((), dtype=table.dtype, device=t.device))

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) shaped to broadcast over `like` ([B, ...])."""
        alpha_bar = self.alpha_bar(t)
        return _per_sample(alpha_bar.sqrt(), like), _per_sample((1 - alpha_bar).sqrt(), like)

    def sample_timesteps(self, batch: int, *, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """Training steps t ~ U{0..T−1}, long [batch]."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=_home(generator)).to(device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, s = self.coefficients(t, x0)
        return a * noise - s * x0

    def split_prediction(self, x_t: torch.Tensor, t: torch.Tensor,
                         prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's output as (x̂0, ε̂), whichever of ε, x0 or v it predicts."""
        a, s = self.coefficients(t, x_t)
        if self.prediction == "eps":
            return (x_t - s * prediction) / a, prediction
        if self.prediction == "x0":
            return prediction, (x_t - a * prediction) / s
        return a * x_t - s * prediction, s * x_t + a * prediction

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network sees as its time: the step index as a float (DiT feeds the integer step)."""
        return _as_float(t)


class FlowMatchingObjective:
    """Flow matching / rectified flow in the SD3 convention: x_t = (1 − t)·x0 + t·ε, velocity target ε − x0.

    Times are continuous in [0, 1] with t = 1 pure noise; samplers integrate
    from t = 1 down to 0. `time_scale` (1000, as SD3) multiplies t into what the
    network is fed.
    """

    kind = "flow"
    convention = "sd3"
    prediction = "velocity"

    def __init__(self, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0,
                 shift: float = 1.0, time_scale: float = 1000.0) -> None:
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise unknown_choice("timestep sampling", timestep_sampling, TIMESTEP_SAMPLING)
        if logit_std <= 0:
            raise ValueError(f"logit_std must be positive, got {logit_std}")
        if shift <= 0:
            raise ValueError(f"the time shift must be positive, got {shift}")
        self.timestep_sampling, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        self.shift, self.time_scale = shift, time_scale

    def __repr__(self) -> str:
        return (f"FlowMatchingObjective(timestep_sampling={self.timestep_sampling!r}, logit_mean={self.logit_mean}, "
                f"logit_std={self.logit_std}, shift={self.shift}, time_scale={self.time_scale})")

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 − t, t) shaped to broadcast over `like`."""
        t = _per_sample(torch.as_tensor(t), like)
        return 1 - t, t

    def sample_timesteps(self, batch: int, *, generator: torch.Generator | None = None,
                         device=None) -> torch.Tensor:
        """Training times in [0, 1], float32 [batch]: uniform or logit-normal, then shifted if `shift` != 1."""
        if self.timestep_sampling == "uniform":
            t = torch.rand(batch, generator=generator, device=_home(generator))
        else:
            u = torch.randn(batch, generator=generator, device=_home(generator))
            t = torch.sigmoid(self.logit_mean + self.logit_std * u)
        if self.shift != 1.0:
            t = shift_timesteps(t, self.shift)
        return t.to(device)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def split_prediction(self, x_t: torch.Tensor, t: torch.Tensor,
                         prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The predicted velocity as (x̂0, ε̂) = (x_t − t·v̂, x_t + (1 − t)·v̂)."""
        _, t = self.coefficients(t, x_t)
        return x_t - t * prediction, x_t + (1 - t) * prediction

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the network sees as its time: time_scale · t (SD3 feeds 1000·σ)."""
        return _as_float(t) * self.time_scale


Objective = DDPMObjective | FlowMatchingObjective


def make_objective(name: str, *, schedule: str = "linear", num_timesteps: int = 1000, **flow_options) -> Objective:
    """`eps`, `x0` or `v` on a DDPM schedule, or `flow` (SD3 convention; options of FlowMatchingObjective)."""
    if name == "flow":
        return FlowMatchingObjective(**flow_options)
    if name not in PREDICTIONS:
        raise unknown_choice("diffusion objective", name, OBJECTIVES)
    if flow_options:
        raise ValueError(f"{', '.join(sorted(flow_options))} only apply to objective 'flow', not {name!r}")
    return DDPMObjective(name, schedule, num_timesteps)


class Noised(NamedTuple):
    """One training batch put through the forward process."""

    x_t: torch.Tensor  # the network's input
    t: torch.Tensor  # the objective's own time: long steps (DDPM) or float in [0, 1] (flow)
    noise: torch.Tensor  # ε
    x0: torch.Tensor  # the clean data


def add_noise(x0: torch.Tensor, objective: Objective, *, generator: torch.Generator | None = None) -> Noised:
    """Draw a time per sample and Gaussian noise, and noise `x0` ([B, ...]) to x_t.

    With a CPU `generator` the draws are made on the CPU and moved, so a seed
    gives the same batch on any device."""
    t = objective.sample_timesteps(x0.shape[0], generator=generator, device=x0.device)
    home = _home(generator) or x0.device
    noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=home).to(x0.device)
    return Noised(objective.noisy(x0, noise, t), t, noise, x0)


def diffusion_loss(prediction: torch.Tensor, noised: Noised, objective: Objective,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error against the objective's target (ε, x0, v, or ε − x0 for flow), in fp32.

    Each sample's error is averaged over its elements (DiT's `mean_flat`), then
    the batch is averaged, weighted by `weight` ([B]) when one is given."""
    target = objective.target(noised.x0, noised.noise, noised.t)
    if prediction.shape != target.shape:
        raise ValueError(f"the prediction has shape {tuple(prediction.shape)} but the {objective.prediction} "
                         f"target has {tuple(target.shape)}; the network must output one value per input value")
    return mean_flat_loss(prediction, target, weight)


def mean_flat_loss(prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error of `prediction` against `target` ([B, ...]) in fp32: each sample's mean, then the batch's
    (weighted by `weight` [B] when given). The language's `diffusion_loss(pred, target)`."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(f"weight must have one value per sample, shape {tuple(per_sample.shape)}, "
                         f"got {tuple(weight.shape)}")
    return (weight.to(per_sample) * per_sample).mean()


@functools.cache
def named_objective(name: str, schedule: str = "linear", num_timesteps: int = 1000,
                    timestep_sampling: str = "logit_normal", shift: float = 1.0) -> Objective:
    """One objective object per setting, shared by every call (generated code names its objective by value)."""
    if name == "flow":
        return make_objective(name, timestep_sampling=timestep_sampling, shift=shift)
    return make_objective(name, schedule=schedule, num_timesteps=num_timesteps)


_GIVEN_NOISE: contextvars.ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = contextvars.ContextVar(
    "archc_given_noise", default=None)


@contextlib.contextmanager
def given_noise(x_t: torch.Tensor, time: torch.Tensor) -> Iterator[None]:
    """Within it, a model's `add_noise` gives `x_t` and `time` (what the network is fed) instead of drawing
    them, and `x_t` as its target: how a sampler calls a model whose spec noises its own input."""
    token = _GIVEN_NOISE.set((x_t, time))
    try:
        yield
    finally:
        _GIVEN_NOISE.reset(token)


def denoiser(model: torch.nn.Module, image: str, condition: str | None = None,
             output: str = "pred") -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """A compiled model whose spec noises its input `image` as a sampler's `model(x_t, time, condition)`:
    the model's `output` for x_t at `time`, with `condition` as its input of that name."""

    def predict(x_t: torch.Tensor, time: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        inputs = {image: x_t} if condition is None else {image: x_t, condition: cond}
        with given_noise(x_t, time.to(x_t.dtype)):
            return model(**inputs)[output]

    return predict


def noise_for_training(x0: torch.Tensor, objective: Objective) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The language's `noisy, t, target = add_noise(image, ...)`: x_t, the time the network is given
    (`objective.model_time`, float [B]) and the regression target of the objective (under `given_noise`,
    the given x_t and time)."""
    given = _GIVEN_NOISE.get()
    if given is not None:
        x_t, time = given
        return x_t, time, x_t
    noised = add_noise(x0, objective)
    return noised.x_t, objective.model_time(noised.t), objective.target(noised.x0, noised.noise, noised.t)


# --- classifier-free guidance: condition dropout ------------------------------------


def drop_mask(batch: int, p: float, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Which samples lose their condition: bool [batch], each True with probability p."""
    if not 0 <= p <= 1:
        raise ValueError(f"the condition drop probability must be in [0, 1], got {p}")
    return (torch.rand(batch, generator=generator, device=_home(generator)) < p).to(device)


def drop_condition(condition: torch.Tensor, p: float, null, *, generator: torch.Generator | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Replace each sample's condition by `null` with probability p (or where `mask` is True).

    `condition` is [B, ...]: class labels [B] with `null` the extra label id
    (DiT: `num_classes`), or embeddings [B, ...] with `null` a tensor of the
    shape of one sample (an empty-prompt embedding, a learned null vector).
    Call it only while training; sampling passes the null condition itself."""
    if mask is None:
        mask = drop_mask(condition.shape[0], p, generator=generator, device=condition.device)
    null = torch.as_tensor(null, dtype=condition.dtype, device=condition.device)
    if null.dim() > 0 and null.shape != condition.shape[1:]:
        raise ValueError(f"the null condition has shape {tuple(null.shape)} but each sample's condition has "
                         f"{tuple(condition.shape[1:])}")
    return torch.where(mask.reshape(-1, *([1] * (condition.dim() - 1))), null, condition)


# --- embeddings ---------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       scale: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of times t ([B], may be fractional) as float32 [B, dim].

    Frequency i is max_period^(−i / (dim/2 − downscale_freq_shift)); the halves
    are [sin, cos], or [cos, sin] with `flip_sin_to_cos`; an odd `dim` gets a
    zero last channel. The defaults are DiT's; diffusers' `get_timestep_embedding`
    takes the same names (its own defaults are flip=False, shift=1)."""
    if t.dim() != 1:
        raise ValueError(f"timesteps must be one per sample, shape [B]; got {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))
    angles = scale * (t[:, None].float() * frequencies[None, :])
    halves = (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    embedding = torch.cat(halves, dim=-1)
    if dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin, cos] of positions · 10000^(−i/(dim/2)), float64 [M, dim] (MAE / DiT's 1-D table)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    angles = torch.outer(positions.reshape(-1).double(), 1.0 / 10000**omega)
    return torch.cat((angles.sin(), angles.cos()), dim=1)


def sincos_2d_position_embedding(dim: int, grid_size: int | tuple[int, int], *, base_size: float | None = None,
                                 interpolation_scale: float = 1.0) -> torch.Tensor:
    """DiT's fixed 2-D sin-cos table for a grid of patches, float32 [rows · cols, dim].

    Token r·cols + c (row-major, as `patchify` orders patches) gets the 1-D
    table of its column in channels [0, dim/2) and of its row in [dim/2, dim).
    With `base_size` the positions are rescaled as diffusers' PatchEmbed does,
    i / (n / base_size) / interpolation_scale; without it they are 0..n−1 (DiT)."""
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    row_pos = torch.arange(rows, dtype=torch.float32)
    col_pos = torch.arange(cols, dtype=torch.float32)
    if base_size is not None:
        row_pos = row_pos / (rows / base_size) / interpolation_scale
        col_pos = col_pos / (cols / base_size) / interpolation_scale
    table = torch.cat((_sincos_1d(dim // 2, col_pos.repeat(rows)),
                       _sincos_1d(dim // 2, row_pos.repeat_interleave(cols))), dim=1)
    return table.float()


def crop_position_embedding(table: torch.Tensor, max_size: int, rows: int, cols: int) -> torch.Tensor:
    """The centre rows × cols of a [max_size², D] position table (SD3's `pos_embed_max_size` crop)."""
    if rows > max_size or cols > max_size:
        raise ValueError(f"a {rows}×{cols} patch grid does not fit the {max_size}×{max_size} position table")
    top, left = (max_size - rows) // 2, (max_size - cols) // 2
    grid = table.reshape(max_size, max_size, -1)[top: top + rows, left: left + cols]
    return grid.reshape(rows * cols, -1)


# --- patches ------------------------------------------------------------------------


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)·(W/p), p·p·C]: patches row-major, each flattened as (row in patch, col, channel)."""
    if images.dim() != 4:
        raise ValueError(f"patchify takes images [B, C, H, W], got shape {tuple(images.shape)}")
    b, c, h, w = images.shape
    p = patch_size
    if p < 1 or h % p or w % p:
        raise ValueError(f"a {h}×{w} image does not split into {p}×{p} patches; choose a patch size dividing both")
    patches = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return patches.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, channels: int, height: int | None = None,
               width: int | None = None) -> torch.Tensor:
    """The inverse of `patchify`: [B, (H/p)·(W/p), p·p·C] -> [B, C, H, W].

    Without `height`/`width` (in pixels) the patch grid is taken to be square (DiT)."""
    b, n, d = tokens.shape
    p = patch_size
    if d != p * p * channels:
        raise ValueError(f"tokens of width {d} are not {p}×{p} patches of {channels} channels ({p * p * channels})")
    if height is None or width is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"{n} patches do not make a square grid; give the image height and width")
        rows = cols = side
    else:
        if height % p or width % p or (height // p) * (width // p) != n:
            raise ValueError(f"{n} patches of {p}×{p} do not tile a {height}×{width} image")
        rows, cols = height // p, width // p
    grid = tokens.reshape(b, rows, cols, p, p, channels).permute(0, 5, 1, 3, 2, 4)
    return grid.reshape(b, channels, rows * p, cols * p)


def patch_weight_from_conv(weight: torch.Tensor) -> torch.Tensor:
    """A patch-embedding Conv2d weight [D, C, p, p] as the Linear weight [D, p·p·C] that acts on `patchify`'s tokens."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


# --- MSRoPE (Qwen-Image) -----------------------------------------------------------


def msrope_positions(height: int, width: int, text_len: int, *, frames: int = 1, image_index: int = 0,
                     centred: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame, row, column) positions of image and text tokens: long [frames·height·width, 3] and [text_len, 3].

    Image tokens are row-major over (frame, row, column); frames count from
    `image_index`. Centred rows are −(H − H//2) .. H//2 − 1 (columns alike);
    text token k sits at M + k on all three axes, M = max(H//2, W//2) centred or
    max(H, W) not, just past the image on every axis."""
    if centred:
        rows = torch.arange(-(height - height // 2), height // 2)
        cols = torch.arange(-(width - width // 2), width // 2)
        start = max(height // 2, width // 2)
    else:
        rows, cols = torch.arange(height), torch.arange(width)
        start = max(height, width)
    f, r, c = torch.meshgrid(torch.arange(image_index, image_index + frames), rows, cols, indexing="ij")
    image = torch.stack((f, r, c), dim=-1).reshape(-1, 3)
    text = (start + torch.arange(text_len))[:, None].expand(text_len, 3).contiguous()
    return image, text


def msrope_angles(positions: torch.Tensor, axes_dims: Sequence[int] = (16, 56, 56),
                  theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles, float32 [N, sum(axes_dims) / 2]: for each axis a, position_a · θ^(−2i/d_a),
    axes concatenated."""
    if positions.shape[-1] != len(axes_dims):
        raise ValueError(f"positions have {positions.shape[-1]} axes but axes_dims gives {len(axes_dims)}")
    if any(d % 2 for d in axes_dims):
        raise ValueError(f"every MSRoPE axis needs an even width, got {tuple(axes_dims)}")
    angles = []
    for axis, d in enumerate(axes_dims):
        inv_freq = 1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float32) / d)
        angles.append(torch.outer(positions[:, axis].float(), inv_freq))
    return torch.cat(angles, dim=-1)


def joint_msrope_angles(height: int, width: int, text_len: int, *, axes_dims: Sequence[int] = (16, 56, 56),
                        theta: float = 10000.0, centred: bool = True, text_first: bool = True) -> torch.Tensor:
    """Angles for one joint sequence of text and image tokens, text first as Qwen-Image orders them."""
    image, text = msrope_positions(height, width, text_len, centred=centred)
    order = (text, image) if text_first else (image, text)
    return msrope_angles(torch.cat(order), axes_dims, theta)


def apply_msrope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x [..., N, head_dim] by angles [N, head_dim/2].

    The result is laid out de-interleaved (rotated first members, then second
    members; archc.runtime.rope's convention); queries and keys share the layout,
    so attention is exactly that of Qwen-Image's in-place complex rotation."""
    if x.shape[-1] != 2 * angles.shape[-1]:
        raise ValueError(f"head_dim {x.shape[-1]} does not match the MSRoPE axes (sum {2 * angles.shape[-1]})")
    return apply_interleaved_rope(x, angles.cos(), angles.sin())


def msrope_axes(head_dim: int) -> tuple[int, int, int]:
    """Default (frame, row, column) widths for a head: rows and columns 7/32 of it in pairs (rounded down),
    the frame the rest; Qwen-Image's (16, 56, 56) for 128."""
    side = 2 * (7 * head_dim // 32)
    frame = head_dim - 2 * side
    if head_dim % 2 or side < 2 or frame < 2:
        raise ValueError(f"head_dim {head_dim} does not split into three even MSRoPE axes; give the widths "
                         "(rope_axes=[frame, rows, cols], even, summing to head_dim)")
    return frame, side, side


class MSRotaryEmbedding(torch.nn.Module):
    """MSRoPE inside attention: queries and keys [B, H, T, head_dim] of one joint sequence holding an image's
    rows × cols patch tokens (row-major) and T − rows·cols text tokens, text after the image (SD3's order) or
    before it (`text_first`, Qwen-Image's). Positions follow from the shapes: centred image rows and columns,
    text on the diagonal past the image (`msrope_positions`). Angles are cached per (T, device), never saved."""

    def __init__(self, head_dim: int, grid: Sequence[int], axes: Sequence[int] | None = None,
                 theta: float = 10000.0, text_first: bool = False) -> None:
        super().__init__()
        self.axes = tuple(axes) if axes is not None else msrope_axes(head_dim)
        if sum(self.axes) != head_dim or any(d % 2 or d <= 0 for d in self.axes):
            raise ValueError(f"MSRoPE axes {self.axes} must be even and sum to head_dim {head_dim}")
        self.rows, self.cols = grid
        self.theta, self.text_first = theta, text_first
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def angles(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles of a joint sequence of `length` tokens, two [length, head_dim / 2]."""
        key = (length, str(device))
        if key not in self._cache:
            text_len = length - self.rows * self.cols
            if text_len < 0:
                raise ValueError(f"a sequence of {length} tokens is shorter than the {self.rows}×{self.cols} "
                                 "image grid MSRoPE was given")
            angles = joint_msrope_angles(self.rows, self.cols, text_len, axes_dims=self.axes, theta=self.theta,
                                         text_first=self.text_first).to(device)
            self._cache[key] = (angles.cos(), angles.sin())
        return self._cache[key]

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both rotated as `apply_msrope` does (interleaved pairs, laid out de-interleaved)."""
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("MSRoPE rotates the queries and keys of one joint sequence; got lengths "
                             f"{q.shape[-2]} and {k.shape[-2]}")
        cos, sin = self.angles(q.shape[-2], q.device)
        return apply_interleaved_rope(q, cos, sin), apply_interleaved_rope(k, cos, sin)

    def extra_repr(self) -> str:
        order = "text first" if self.text_first else "image first"
        return f"grid={self.rows}×{self.cols}, axes={self.axes}, theta={self.theta}, {order}"
