"""Diffusion specs in training and sampling: what a compiled spec that noises its own images says about
itself (`DiffusionSpec`), drawing images from it (`generate`, `write_grid`), and `ImageSource`, the
`DataSource` `archc train` uses for such a spec (the digits by default).

A diffusion spec has one `Image[B, C, H, W]` input, one `add_noise(...)` (its objective), a `pred` output
and its `loss`; a conditioned one also has a `Tokens[B]` class label or a `Tokens[B, L]` caption input
(word ids of the digit pairs' vocabulary, archc.training.images), and its `drop_condition(..., null=N)`
names the null label (or the padding id a null caption is made of) that classifier-free guidance pairs
with each condition. Sampling calls the model with the sampler's x_t and time in place of the draws of
`add_noise` (runtime `denoiser`).
"""

from __future__ import annotations

import math
from pathlib import Path

import attrs
import torch

from archc.runtime.diffusion import Objective, denoiser, named_objective
from archc.runtime.samplers import sample
from archc.training.config import TrainConfig, TrainError
from archc.training.image_eval import pair_accuracy, train_classifier
from archc.training.images import (
    CAPTION_LENGTH,
    CAPTION_VOCABULARY,
    ImageBatches,
    ImageDataset,
    load_digits,
    make_image_data,
    pair_caption,
    split_images,
)


@attrs.frozen
class DiffusionSpec:
    image: str  # the Image input's name
    shape: tuple[int, int, int]  # (C, H, W)
    objective: Objective
    label: str | None  # the condition input (a class label, or a caption), if conditioned
    null_label: int | None  # drop_condition's null id (classifier-free guidance), if any
    output: str = "pred"
    caption: bool = False  # the condition is a caption of word ids [B, L], not a class label [B]
    caption_len: int = CAPTION_LENGTH  # the caption's length when the spec fixes it

    def captions(self, prompts: list[str]) -> torch.Tensor:
        """Prompts as the caption input: word ids [N, L], padded (DataError for a word outside the vocabulary)."""
        return torch.tensor([CAPTION_VOCABULARY.encode(p, self.caption_len) for p in prompts], dtype=torch.long)


def diffusion_spec(compiled) -> DiffusionSpec | None:
    """What a compiled spec says about itself as a diffusion model; None when it does not noise an image."""
    nodes = list(compiled.ir.nodes())
    noise = [n for n in nodes if n.op == "add_noise" and n.attrs["index"] == 0]  # one node per value
    if not noise:
        return None
    where = compiled.ir.meta.get("source", "the spec")
    inputs = [n for n in nodes if n.op == "input"]
    images = [n for n in inputs if n.dtype == "float" and len(n.shape) == 4]
    labels = [n for n in inputs if n.dtype == "long" and len(n.shape) in (1, 2)]
    if len(images) != 1 or len(inputs) != len(images) + len(labels) or len(labels) > 1:
        raise TrainError(f"{where}: a diffusion spec takes one Image[B, C, H, W] input and at most one "
                         "Tokens[B] label or Tokens[B, L] caption; got "
                         + ", ".join(f"{n.name} {list(n.shape)}" for n in inputs))
    if len(noise) > 1:
        raise TrainError(f"{where}: a diffusion spec noises its image once (one `add_noise`), found {len(noise)}")
    if "pred" not in [name for name, _ in compiled.ir.outputs]:
        raise TrainError(f"{where}: a diffusion spec returns its prediction as `pred` (return pred, loss)")
    a = noise[0].attrs
    objective = named_objective(a["objective"], a["schedule"], a["steps"], a["sampling"], a["shift"])
    drops = [n for n in nodes if n.op == "drop_condition"]
    caption = bool(labels) and len(labels[0].shape) == 2
    length = labels[0].shape[1] if caption and isinstance(labels[0].shape[1], int) else CAPTION_LENGTH
    return DiffusionSpec(images[0].name, tuple(images[0].shape[1:]), objective,
                         labels[0].name if labels else None, drops[0].attrs["null"] if drops else None,
                         caption=caption, caption_len=length)


def generate(model: torch.nn.Module, spec: DiffusionSpec, labels: torch.Tensor | None, *, count: int | None = None,
             sampler: str | None = None, steps: int = 50, cfg_scale: float = 1.0, seed: int = 0,
             device=None) -> torch.Tensor:
    """Images [N, C, H, W] drawn from the model, one per label (a caption spec: one per caption [N, L] of word
    ids, `DiffusionSpec.captions`), or `count` unconditioned ones, on the CPU. `cfg_scale` != 1 needs the
    spec's null label (a caption's: the all-padding one)."""
    if labels is None and count is None:
        raise ValueError("give labels or a count")
    if cfg_scale != 1.0 and spec.null_label is None:
        raise TrainError("classifier-free guidance needs a null label: the spec has no `drop_condition`")
    n = len(labels) if labels is not None else count
    condition = null = None
    if spec.label is not None:
        if labels is None:
            raise TrainError(f"the spec is conditioned on `{spec.label}`; give labels")
        condition = labels.to(device)
        if spec.null_label is not None and cfg_scale != 1.0:
            null = torch.full_like(condition, spec.null_label)
    was_training = model.training
    model.eval()
    try:
        images = sample(denoiser(model, spec.image, spec.label, spec.output), spec.objective, (n, *spec.shape),
                        sampler=sampler, steps=steps, condition=condition, null_condition=null,
                        cfg_scale=cfg_scale, seed=seed, device=device)
    except ValueError as err:  # a sampler that does not fit the objective, a bad step count
        raise TrainError(str(err)) from None
    finally:
        model.train(was_training)
    return images.float().cpu()


def write_grid(images: torch.Tensor, path: Path, columns: int | None = None, scale: int = 4) -> None:
    """A PNG of images [N, C, H, W] in [-1, 1] (clamped), `columns` to a row, each pixel `scale`² pixels."""
    from PIL import Image

    n, c, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.full((c, rows * (h + 1) + 1, columns * (w + 1) + 1), -1.0)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[:, 1 + r * (h + 1): 1 + r * (h + 1) + h, 1 + col * (w + 1): 1 + col * (w + 1) + w] = image
    pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = pixels[0].numpy() if c == 1 else pixels.permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


# Captions the sample grid of a digit-pairs run asks for: each digit four times on the left and on the right.
PROMPT_PAIRS = tuple((a, (a * 3 + 1 + r) % 10) for r in range(4) for a in range(10))
GRID_PER_CLASS = 10  # images of each class drawn at every evaluation
GRID_STEPS = 50  # DDIM (or Euler, for flow) steps
GRID_CFG = 3.0  # the guidance scale, for a spec with a null label


class ImageSource:
    """Random batches of an image set for a diffusion spec; held-out loss on fixed noise; a sample grid."""

    def __init__(self, train: ImageDataset, val: ImageDataset, spec: DiffusionSpec, config: TrainConfig) -> None:
        if tuple(train.shape) != spec.shape:
            raise TrainError(f"the images are {'×'.join(map(str, train.shape))} (C×H×W) but the spec's "
                             f"`{spec.image}` is {'×'.join(map(str, spec.shape))}; set its size parameters")
        if spec.caption and train.captions is None:
            raise TrainError(f"the spec is conditioned on a caption (`{spec.label}`) but {train.name} has none; "
                             "train it on captioned images (--data digit_pairs)")
        if spec.label is not None and not spec.caption and spec.null_label is not None and \
                train.num_classes > spec.null_label:
            raise TrainError(f"the data has {train.num_classes} classes but the spec's null label is "
                             f"{spec.null_label}; set -D n_classes={train.num_classes}")
        self.train, self.val, self.spec, self.config = train, val, spec, config
        self.batches = ImageBatches(train, config.batch_size, config.seed)
        self.items_per_batch = config.batch_size
        self.grid: torch.Tensor | None = None  # the last sample grid
        self.judge = None  # the digit classifier that scores caption adherence, trained on first use

    @classmethod
    def open(cls, config: TrainConfig, compiled) -> ImageSource:
        spec = diffusion_spec(compiled)
        # the text corpus' default stands for "the default data": the digits (captioned pairs for a caption spec)
        default = "digit_pairs" if spec is not None and spec.caption else "digits"
        data = default if config.data == attrs.fields(TrainConfig).data.default else config.data
        train, val = make_image_data(data, seed=config.seed)
        return cls(train, val, spec, config)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.batches.get(index)
        out = {self.spec.image: batch["image"]}
        if self.spec.label is not None:
            out[self.spec.label] = batch["caption" if self.spec.caption else "label"]
        return out

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        """The loss over the val split in eval mode, with times and noise drawn from a fixed seed; then the
        evaluation grid (`draw_grid`) and its scores."""
        was_training = model.training
        model.eval()
        state = torch.random.get_rng_state()
        torch.manual_seed(self.config.seed)  # the same draws every evaluation (times and noise are CPU-drawn)
        total = 0.0
        try:
            for start in range(0, len(self.val), self.config.batch_size):
                images = self.val.images[start: start + self.config.batch_size]
                inputs = {self.spec.image: images.to(device)}
                if self.spec.label is not None:
                    condition = self.val.captions if self.spec.caption else self.val.labels
                    inputs[self.spec.label] = condition[start: start + self.config.batch_size].to(device)
                total += model(**inputs)["loss"].float().item() * len(images)
            scores = {} if self.spec.caption else self.draw_grid(model, device)  # (captions: at the end, sample)
        finally:
            torch.random.set_rng_state(state)
            model.train(was_training)
        return {"val_loss": total / len(self.val), **scores}

    def draw_grid(self, model, device) -> dict[str, float]:
        """Draw `GRID_PER_CLASS` images of every class (DDIM-50, guidance 3 when the spec has a null label,
        the run's seed: the same noise at every evaluation) as `self.grid`, and score them with the judge
        of image_eval trained on the training split: `sample_accuracy` (the requested label, when the
        spec is conditioned) and `sample_frechet` (to the val images, in the judge's feature space)."""
        from archc.training.image_eval import image_frechet_distance, label_accuracy, train_classifier

        classes = self.train.num_classes
        labels = torch.arange(classes).repeat(GRID_PER_CLASS) if self.spec.label is not None else None
        cfg_scale = GRID_CFG if self.spec.null_label is not None else 1.0
        self.grid = generate(model, self.spec, labels, count=classes * GRID_PER_CLASS, steps=GRID_STEPS,
                             cfg_scale=cfg_scale, seed=self.config.seed, device=device)
        judge = train_classifier(self.train, seed=self.config.seed)  # trained once per process
        scores = {"sample_frechet": image_frechet_distance(judge, self.val.images, self.grid)}
        if labels is not None:
            scores["sample_accuracy"] = label_accuracy(judge, self.grid, labels)
        return scores

    def sample(self, model, device, seed: int) -> str:
        """The sample grid (two rows of every class; for captions, 40 digit pairs), and for captions the
        share of pairs whose two digits the judge reads as captioned."""
        cfg = 3.0 if self.spec.null_label is not None else 1.0
        if self.spec.caption:
            pairs = PROMPT_PAIRS
            prompts = [pair_caption(a, b) for a, b in pairs]
            self.grid = generate(model, self.spec, self.spec.captions(prompts), steps=50, seed=seed, device=device,
                                 cfg_scale=cfg)
            if self.train.name != "digit_pairs":
                return ""
            accuracy = pair_accuracy(self.digit_judge(), self.grid, torch.tensor([10 * a + b for a, b in pairs]))
            return (f"caption adherence: {accuracy:.0%} of {len(pairs)} pairs drawn with both digits as captioned "
                    f"(digit classifier; Euler 50 steps, guidance {cfg:g})")
        labels = torch.arange(self.train.num_classes).repeat(2) if self.spec.label is not None else None
        self.grid = generate(model, self.spec, labels, count=16, steps=50, seed=seed, device=device, cfg_scale=cfg)
        """The last evaluation's grid (drawn now if there was none)."""
        if self.grid is None:
            self.draw_grid(model, device)
        return ""

    def digit_judge(self):
        """The classifier of single digits (train split) that reads each half of a pair."""
        if self.judge is None:
            digits, _ = split_images(load_digits(), seed=self.config.seed)
            self.judge = train_classifier(digits)
        return self.judge

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
