"""Scoring generated images without looking at them: a small classifier trained on the same data.

Design choices:

- The judge is a two-layer CNN (3×3 convs of 16 and 32 channels with a 2×2
  max pool between them, adaptive average pool to 4×4, a 64-wide feature layer, a linear head),
  trained with AdamW on the training images in a few seconds on a CPU, from a
  fixed seed, always on the CPU so it is the same judge on every machine.
  Trained judges are kept in memory for the process, and on disk as
  safetensors when given a cache folder, keyed by a hash of the images,
  labels and training settings.
- Label accuracy: the fraction of conditional samples the judge assigns to
  the label they were asked for. For digit pairs (8×16) each half is judged
  and a sample counts only when both digits are right.
- Fréchet distance (Heusel et al.'s FID, in this judge's 64-dim feature space
  instead of Inception's): ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^½) with unbiased
  covariances. tr((Σ₁Σ₂)^½) is computed as the trace of the square root of
  the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (same eigenvalues), by symmetric
  eigendecompositions in float64, so it needs no scipy and never goes complex.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import torch
from torch import nn

from archc.training.images import ImageDataset

_JUDGES: dict[str, nn.Module] = {}


class DigitClassifier(nn.Module):
    """conv 3×3 → ReLU → max pool 2 → conv 3×3 → ReLU → avg pool to 4×4 → Linear → ReLU (features) → Linear."""

    def __init__(self, channels: int = 1, num_classes: int = 10, feature_dim: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fit = nn.AdaptiveAvgPool2d(4)  # the identity on 8×8 images; other sizes come to 4×4
        self.fc = nn.Linear(32 * 16, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(self.pool(torch.relu(self.conv1(images)))))
        return torch.relu(self.fc(self.fit(h).flatten(1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(dataset: ImageDataset, *, steps: int = 400, batch_size: int = 128, lr: float = 3e-3,
                     seed: int = 0, cache_dir=None) -> DigitClassifier:
    """A judge for `dataset`'s images, trained on the CPU; returned in eval mode.

    For digit pairs, train it on the single digits of the same split (it judges each half)."""
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "shape": list(dataset.shape),
                "classes": dataset.num_classes}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(dataset.images.numpy().tobytes())
    digest.update(dataset.labels.numpy().tobytes())
    key = digest.hexdigest()[:16]
    if key in _JUDGES:
        return _JUDGES[key]
    with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's RNG untouched
        torch.manual_seed(seed)
        model = DigitClassifier(dataset.shape[0], dataset.num_classes)
    path = Path(cache_dir) / f"judge-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
    else:
        _fit(model, dataset, steps, batch_size, lr, seed)
        if path is not None:
            from safetensors.torch import save_file

            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(model.state_dict(), tmp)
            tmp.replace(path)
    _JUDGES[key] = model.eval()
    return model


def _fit(model: DigitClassifier, dataset: ImageDataset, steps: int, batch_size: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    threads = torch.get_num_threads()
    # ops this small gain nothing from intra-op threads, and on a busy machine spinning threads make
    # training several times slower (measured: 4.5 s vs 17 s for 100 steps on 2 shared cores)
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():  # callers may be scoring under no_grad
            for _ in range(steps):
                index = torch.randint(0, len(dataset), (batch_size,), generator=gen)
                loss = nn.functional.cross_entropy(model(dataset.images[index]), dataset.labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
    finally:
        torch.set_num_threads(threads)


# --- scores -------------------------------------------------------------------------


@torch.no_grad()
def predict_labels(judge: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    return torch.cat([judge(images[i: i + batch_size].float().cpu()).argmax(-1)
                      for i in range(0, images.shape[0], batch_size)])


@torch.no_grad()
def image_features(judge: DigitClassifier, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The judge's penultimate features, float64 [N, feature_dim]."""
    return torch.cat([judge.features(images[i: i + batch_size].float().cpu()).double()
                      for i in range(0, images.shape[0], batch_size)])


def split_pairs(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The left and right halves of side-by-side pairs [N, C, H, 2W]."""
    half = images.shape[-1] // 2
    return images[..., :half], images[..., half:]


def label_accuracy(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of images the judge gives the requested label."""
    return (predict_labels(judge, images) == labels.cpu()).double().mean().item()


def pair_accuracy(judge: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of side-by-side pairs with both digits right; labels are 10·left + right."""
    left, right = split_pairs(images)
    labels = labels.cpu()
    correct = (predict_labels(judge, left) == labels // 10) & (predict_labels(judge, right) == labels % 10)
    return correct.double().mean().item()


def gaussian_frechet_distance(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2·tr((Σ₁Σ₂)^½) between two Gaussians, in float64."""
    mu1, cov1, mu2, cov2 = (x.double() for x in (mu1, cov1, mu2, cov2))
    trace_sqrt = _psd_sqrt(_psd_sqrt(cov1) @ cov2 @ _psd_sqrt(cov1)).trace()
    return ((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_sqrt).item()


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix (round-off negative eigenvalues set to 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets [N, D] (unbiased covariances)."""
    if features_a.shape[0] < 2 or features_b.shape[0] < 2:
        raise ValueError("a Fréchet distance needs at least 2 samples in each set")
    a, b = features_a.double(), features_b.double()
    return gaussian_frechet_distance(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))


def image_frechet_distance(judge: DigitClassifier, real: torch.Tensor, generated: torch.Tensor, *,
                           pairs: bool = False) -> float:
    """Fréchet distance in the judge's feature space; `pairs` are judged half by half, features side by side."""
    def features(images: torch.Tensor) -> torch.Tensor:
        if pairs:
            return torch.cat([image_features(judge, half) for half in split_pairs(images)], dim=1)
        return image_features(judge, images)

    return frechet_distance(features(real), features(generated))


@attrs.frozen
class GuidanceScore:
    cfg_scale: float
    accuracy: float  # of the requested label (both digits for pairs)
    frechet: float  # to the real images, in the judge's feature space


def score_guidance(judge: DigitClassifier, generate: Callable[[torch.Tensor, float], torch.Tensor],
                   labels: torch.Tensor, real: torch.Tensor,
                   scales: Sequence[float] = (1.0, 2.0, 4.0), *, pairs: bool = False) -> list[GuidanceScore]:
    """Generate images for `labels` at each CFG scale (`generate(labels, scale)`) and score them against `real`.

    With `pairs` the images are digit pairs (labels 10·left + right), judged half by half."""
    scores = []
    for scale in scales:
        images = generate(labels, scale).cpu()
        accuracy = (pair_accuracy if pairs else label_accuracy)(judge, images, labels)
        scores.append(GuidanceScore(float(scale), accuracy, image_frechet_distance(judge, real, images, pairs=pairs)))
    return scores
