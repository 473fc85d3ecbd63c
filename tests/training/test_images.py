"""archc.training.images and image_eval: shipped digits, image folders, captioned pairs, batches, the judge,
Fréchet distance, and an end-to-end check of samplers + guidance + judge with an exact denoiser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from archc.runtime import diffusion as D
from archc.runtime import samplers as S
from archc.training import image_eval as E
from archc.training import images as I
from archc.training.data import DataError


@pytest.fixture(scope="module")
def digits():
    return I.make_image_data("digits")


@pytest.fixture(scope="module")
def judge(digits):
    return E.train_classifier(digits[0])


# --- data ---------------------------------------------------------------------------


def test_shipped_digits():
    ds = I.load_digits()
    assert len(ds) == 1797 and ds.shape == (1, 8, 8) and ds.images.dtype == torch.float32
    assert ds.images.min().item() == -1.0 and ds.images.max().item() == 1.0
    assert torch.bincount(ds.labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert ds.labels[:10].tolist() == list(range(10))
    # scikit-learn's first image, a zero: its top row of grey levels is 0 0 5 13 9 1 0 0
    assert ds.images[0, 0, 0].tolist() == [g / 8 - 1 for g in (0, 0, 5, 13, 9, 1, 0, 0)]
    assert ds.classes[3] == "three"


def test_split_is_seeded_and_disjoint(digits):
    train, val = digits
    assert len(train) == 1617 and len(val) == 180
    full = I.load_digits()
    rows = {tuple(x.flatten().tolist()) for x in full.images}
    assert len(rows) > 1700  # nearly all images distinct, so the check below means something
    train_rows = {tuple(x.flatten().tolist()) for x in train.images}
    val_rows = {tuple(x.flatten().tolist()) for x in val.images}
    assert len(val_rows - train_rows) >= len(val_rows) - 5  # duplicates in the source aside
    again = I.make_image_data("digits")
    assert torch.equal(again[1].images, val.images)
    assert not torch.equal(I.make_image_data("digits", seed=1)[1].images, val.images)


def test_digit_pairs_and_captions(digits):
    pairs = I.digit_pairs(digits[0], 50, seed=3)
    assert pairs.shape == (1, 8, 16) and pairs.captions.shape == (50, 3) and pairs.num_classes == 100
    words = I.CAPTION_VOCABULARY
    for i in range(50):
        left, right = divmod(pairs.labels[i].item(), 10)
        assert words.decode(pairs.captions[i]) == f"{I.DIGIT_WORDS[left]} and {I.DIGIT_WORDS[right]}"
        assert pairs.classes[pairs.labels[i]] == words.decode(pairs.captions[i])
        # each half is one of the digits of its label
        for half, digit in zip(E.split_pairs(pairs.images[i]), (left, right)):
            match = (digits[0].images == half).flatten(1).all(1)
            assert match.any() and (digits[0].labels[match] == digit).all()
    assert words.encode("Three and seven", 3) == [4, 11, 8]
    assert words.encode("nine", 3) == [10, 0, 0]
    with pytest.raises(DataError, match="did you mean 'seven'"):
        words.encode("sevn and one", 3)
    with pytest.raises(DataError, match="at most 3"):
        words.encode("one and two and", 3)
    train, val = I.make_image_data("digit_pairs", pairs=(40, 10))
    assert len(train) == 40 and len(val) == 10


def _write_png(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    grey = {f"{c}/{i}.png": rng.integers(0, 256, (6, 4), dtype=np.uint8) for c in ("cat", "ant") for i in range(2)}
    for name, array in grey.items():
        _write_png(tmp_path / "grey" / name, array, "L")
    (tmp_path / "grey" / "ant" / "notes.txt").write_text("not an image")
    ds = I.load_image_folder(tmp_path / "grey")
    assert ds.classes == ("ant", "cat") and ds.shape == (1, 6, 4) and ds.labels.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(ds.images[2, 0].numpy(), grey["cat/0.png"] / 127.5 - 1, atol=1e-6)
    rgb = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    _write_png(tmp_path / "mixed" / "a" / "0.png", rgb, "RGB")
    _write_png(tmp_path / "mixed" / "b" / "0.png", rng.integers(0, 256, (5, 5), dtype=np.uint8), "L")
    mixed = I.load_image_folder(tmp_path / "mixed")
    assert mixed.shape == (3, 5, 5)  # RGB as soon as one image is colour
    np.testing.assert_allclose(mixed.images[0].numpy(), rgb.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    _write_png(tmp_path / "sizes" / "a" / "0.png", rgb, "RGB")
    _write_png(tmp_path / "sizes" / "a" / "1.png", rng.integers(0, 256, (4, 5, 3), dtype=np.uint8), "RGB")
    with pytest.raises(DataError, match=r"resize them to one size \(size=\(height, width\)\)"):
        I.load_image_folder(tmp_path / "sizes")
    assert I.load_image_folder(tmp_path / "sizes", size=(8, 6)).shape == (3, 8, 6)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no PNG or JPEG"):
        I.load_image_folder(tmp_path / "empty")
    train, val = I.make_image_data(tmp_path / "grey", val_fraction=0.25)
    assert len(train) == 3 and len(val) == 1
    with pytest.raises(DataError, match="did you mean 'digits'"):
        I.make_image_data("digitz")


def test_batches_depend_only_on_seed_and_step(digits):
    pairs = I.digit_pairs(digits[0], 100)
    a, b = I.ImageBatches(pairs, 8, seed=2), I.ImageBatches(pairs, 8, seed=2)
    first = a.get(5)
    assert set(first) == {"image", "label", "caption"} and first["image"].shape == (8, 1, 8, 16)
    assert all(torch.equal(first[k], b.get(5)[k]) for k in first)
    assert not torch.equal(first["image"], a.get(6)["image"])
    it = iter(a)
    next(it), next(it)
    resumed = I.ImageBatches(pairs, 8)
    resumed.load_state_dict(a.state_dict())
    assert torch.equal(next(iter(resumed))["label"], a.get(2)["label"])
    with pytest.raises(DataError, match="batch_size"):
        I.ImageBatches(pairs, 4).load_state_dict(a.state_dict())
    assert set(I.ImageBatches(digits[0], 4).get(0)) == {"image", "label"}


# --- the judge ----------------------------------------------------------------------


def test_judge_reads_digits_and_pairs(digits, judge):
    val = digits[1]
    assert E.label_accuracy(judge, val.images, val.labels) > 0.93
    wrong = (val.labels + 1) % 10
    assert E.label_accuracy(judge, val.images, wrong) < 0.1
    pairs = I.digit_pairs(val, 200, seed=1)
    assert E.pair_accuracy(judge, pairs.images, pairs.labels) > 0.85
    swapped = (pairs.labels % 10) * 10 + pairs.labels // 10
    differ = swapped != pairs.labels
    assert E.pair_accuracy(judge, pairs.images[differ], swapped[differ]) < 0.1


def test_judge_is_cached(digits, tmp_path):
    small = digits[0].subset(range(300))
    first = E.train_classifier(small, steps=20, cache_dir=tmp_path)
    assert E.train_classifier(small, steps=20) is first  # in memory
    E._JUDGES.clear()
    again = E.train_classifier(small, steps=20, cache_dir=tmp_path)  # from the safetensors file
    assert again is not first and len(list(tmp_path.glob("judge-*.safetensors"))) == 1
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), again.state_dict().values()))
    E._JUDGES.clear()
    retrained = E.train_classifier(small, steps=20)  # seeded: the same weights again
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), retrained.state_dict().values()))


# --- Fréchet distance ---------------------------------------------------------------


def test_frechet_distance_closed_forms():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    assert abs(E.frechet_distance(a, a)) < 1e-8
    delta = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0, 1.0], dtype=torch.float64)
    # a shift leaves the covariance as it is: the distance is ‖δ‖² = 15.25
    assert E.frechet_distance(a, a + delta) == pytest.approx(15.25, abs=1e-8)
    # diagonal (commuting) covariances: ‖μ₁ − μ₂‖² + Σ (sqrt(a_i) − sqrt(b_i))²
    var1, var2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    mu1, mu2 = torch.zeros(3), torch.tensor([0.0, 1.0, 0.0])
    expected = 1.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert E.gaussian_frechet_distance(mu1, torch.diag(var1), mu2, torch.diag(var2)) == pytest.approx(expected)


def test_frechet_trace_term_matches_eigenvalues_of_the_product():
    gen = torch.Generator().manual_seed(1)
    m1, m2 = (torch.randn(5, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    cov1, cov2 = m1 @ m1.T + 0.1 * torch.eye(5), m2 @ m2.T + 0.1 * torch.eye(5)
    # Σ₁Σ₂ is similar to a PSD matrix: its eigenvalues are real and non-negative, tr sqrt = Σ sqrt(λ)
    trace_sqrt = torch.linalg.eigvals(cov1 @ cov2).real.clamp(min=0).sqrt().sum().item()
    expected = (cov1.trace() + cov2.trace()).item() - 2 * trace_sqrt
    zero = torch.zeros(5, dtype=torch.float64)
    assert E.gaussian_frechet_distance(zero, cov1, zero, cov2) == pytest.approx(expected, rel=1e-9)


# --- end to end: samplers, guidance and the judge ----------------------------------


def exact_denoiser(objective, images, labels, null_label=10):
    """The x0-predictor that is optimal for the empirical data: a posterior-weighted mean of the images
    of the requested class (all images for the null label)."""
    flat = images.flatten(1).double()
    norms = (flat**2).sum(1)[None]

    def model(x, time, condition):
        a, s = objective.coefficients(time.long(), x.double())
        a, s = a.flatten(), s.flatten()
        flat_x = x.flatten(1).double()  # ‖x − a·y‖² = ‖x‖² − 2a x·y + a²‖y‖²
        dist = (flat_x**2).sum(1, keepdim=True) - 2 * a[:, None] * flat_x @ flat.T + a[:, None] ** 2 * norms
        logits = -dist / (2 * s[:, None] ** 2)
        allowed = (labels[None, :] == condition[:, None]) | (condition[:, None] == null_label)
        weights = torch.softmax(logits.masked_fill(~allowed, -torch.inf), dim=-1)
        return (weights @ flat).reshape(x.shape).to(x.dtype)

    return model


def test_exact_denoiser_samples_are_judged_right(digits, judge):
    train, _ = digits
    objective = D.DDPMObjective("x0", "cosine")
    model = exact_denoiser(objective, train.images, train.labels)
    labels = torch.arange(10).repeat(4)

    def generate(requested, scale):
        return S.sample(model, objective, (len(requested), 1, 8, 8), sampler="ddim", steps=20,
                        condition=requested, null_condition=torch.full_like(requested, 10), cfg_scale=scale, seed=0)

    scores = E.score_guidance(judge, generate, labels, train.images, scales=(1.0, 2.0))
    assert [s.cfg_scale for s in scores] == [1.0, 2.0]
    assert all(s.accuracy > 0.95 for s in scores), scores
    unconditional = S.sample(model, objective, (40, 1, 8, 8), steps=20, condition=torch.full_like(labels, 10))
    assert E.label_accuracy(judge, unconditional, labels) < 0.5
    noise = torch.rand(40, 1, 8, 8) * 2 - 1
    assert scores[0].frechet < 0.2 * E.image_frechet_distance(judge, train.images, noise)
