"""Image data for diffusion training: the handwritten digits, image folders, and captioned digit pairs.

Design choices:

- No downloads. ``digits`` is the UCI handwritten-digits set as scikit-learn
  ships it (1,797 grey 8×8 images, labels 0..9), exported once by
  ``scripts/export_digits.py`` into ``data_files/digits.npz`` (45 KB) inside
  the package, so nothing at run time needs scikit-learn.
- Pixels are float32 in [-1, 1] (the range the samplers' ``clip_x0=1`` keeps):
  grey level g of 0..16 becomes g/8 − 1; 8-bit images become v/127.5 − 1.
- ``digit_pairs`` is a text-conditioned set made from the digits: two digits
  side by side (8×16) with the caption "three and seven", written as word ids
  of a fixed 12-word vocabulary (id 0 is padding, and an all-padding caption is
  the null prompt for classifier-free guidance). Its label is 10·left + right,
  so a classifier that reads each half measures prompt adherence. Pairs are
  drawn after the train/val split of the digits, so no val digit is trained on.
- An image folder has one subfolder per class (sorted names are the labels)
  holding PNG or JPEG files, read with Pillow (which matplotlib already
  needs); greyscale when every image is, RGB otherwise; one size for all
  unless ``size`` resizes them.
- Splits are a seeded shuffle of whole images; ``ImageBatches.get(step)``
  depends only on (seed, step), so resuming needs only the step. A batch is a
  dict of tensors: ``image`` [B, C, H, W], ``label`` [B], and for captioned
  sets ``caption`` [B, L].
"""

from __future__ import annotations

import difflib
import hashlib
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np
import torch

from archc.training.data import DataError

DATA_FILES = Path(__file__).resolve().parent / "data_files"
IMAGE_DATASETS = ("digits", "digit_pairs")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_DATA_HELP = "image data: digits, digit_pairs, or a folder with one subfolder of PNG/JPEG files per class"


class WordVocabulary:
    """A fixed list of words; id 0 is padding. Captions are lower-case words separated by spaces."""

    pad = "<pad>"

    def __init__(self, words: Sequence[str]) -> None:
        self.words = (self.pad, *words)
        self.ids = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str, length: int) -> list[int]:
        """Word ids of `caption`, padded with 0 to `length`."""
        ids = []
        for word in caption.lower().split():
            if word not in self.ids or word == self.pad:
                close = difflib.get_close_matches(word, self.words[1:], n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise DataError(f"the word {word!r} is not in the caption vocabulary{hint} "
                                f"(words: {', '.join(self.words[1:])})")
            ids.append(self.ids[word])
        if len(ids) > length:
            raise DataError(f"caption {caption!r} has {len(ids)} words; captions hold at most {length}")
        return ids + [0] * (length - len(ids))

    def decode(self, ids) -> str:
        return " ".join(self.words[int(i)] for i in ids if int(i) != 0)


CAPTION_VOCABULARY = WordVocabulary((*DIGIT_WORDS, "and"))
CAPTION_LENGTH = 3


def pair_caption(left: int, right: int) -> str:
    return f"{DIGIT_WORDS[left]} and {DIGIT_WORDS[right]}"


@attrs.frozen
class ImageDataset:
    name: str
    images: torch.Tensor  # float32 [N, C, H, W] in [-1, 1]
    labels: torch.Tensor  # long [N]: class ids (digit pairs: 10·left + right)
    classes: tuple[str, ...]  # the name of each class id
    captions: torch.Tensor | None = None  # long [N, L] word ids of CAPTION_VOCABULARY, for captioned sets

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices) -> ImageDataset:
        index = torch.as_tensor(indices, dtype=torch.long)
        captions = None if self.captions is None else self.captions[index]
        return attrs.evolve(self, images=self.images[index], labels=self.labels[index], captions=captions)

    def summary(self) -> str:
        c, h, w = self.shape
        captioned = ", captioned" if self.captions is not None else ""
        return f"{self.name}: {len(self):,} images {c}×{h}×{w}, {self.num_classes} classes{captioned}"


# --- sources ------------------------------------------------------------------------


def load_digits() -> ImageDataset:
    """All 1,797 handwritten digits, [1797, 1, 8, 8], in scikit-learn's order."""
    with np.load(DATA_FILES / "digits.npz") as data:
        images = torch.from_numpy(data["images"].astype(np.float32))[:, None] / 8.0 - 1.0
        labels = torch.from_numpy(data["labels"].astype(np.int64))
    return ImageDataset("digits", images, labels, DIGIT_WORDS)


def load_image_folder(path, *, size: tuple[int, int] | None = None) -> ImageDataset:
    """Images under `path`/<class>/*.png|jpg|jpeg; `size` = (height, width) resizes them all (bicubic)."""
    from PIL import Image, UnidentifiedImageError

    root = Path(path)
    if not root.is_dir():
        raise DataError(f"no such folder {str(path)!r}; {_DATA_HELP}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = [(label, f) for label, name in enumerate(classes) for f in sorted((root / name).iterdir())
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no PNG or JPEG files in subfolders of {str(path)!r}; put each class's images "
                        "in a subfolder named after it")
    pictures = []
    for _, f in files:
        try:
            with Image.open(f) as im:
                im.load()
                pictures.append(im.copy())
        except (OSError, UnidentifiedImageError) as e:
            raise DataError(f"cannot read image {str(f)!r} ({e})") from None
    grey = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im in pictures)
    arrays = []
    for (_, f), im in zip(files, pictures):
        im = im.convert("L" if grey else "RGB")
        if size is not None:
            im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        array = array[None] if grey else array.transpose(2, 0, 1)
        if arrays and array.shape != arrays[0].shape:
            raise DataError(f"{str(f)!r} is {array.shape[1]}×{array.shape[2]} but {str(files[0][1])!r} is "
                            f"{arrays[0].shape[1]}×{arrays[0].shape[2]}; resize them to one size "
                            "(size=(height, width))")
        arrays.append(array)
    labels = torch.tensor([label for label, _ in files], dtype=torch.long)
    return ImageDataset(root.name, torch.from_numpy(np.stack(arrays)), labels, tuple(classes))


def digit_pairs(digits: ImageDataset, count: int, seed: int = 0) -> ImageDataset:
    """`count` captioned pairs of `digits` side by side: images [count, 1, 8, 16], labels 10·left + right."""
    gen = torch.Generator().manual_seed(seed)
    left, right = torch.randint(0, len(digits), (2, count), generator=gen)
    images = torch.cat((digits.images[left], digits.images[right]), dim=-1)
    a, b = digits.labels[left], digits.labels[right]
    captions = torch.tensor([CAPTION_VOCABULARY.encode(pair_caption(i, j), CAPTION_LENGTH)
                             for i, j in zip(a.tolist(), b.tolist())], dtype=torch.long)
    classes = tuple(pair_caption(i, j) for i in range(10) for j in range(10))
    return ImageDataset("digit_pairs", images, 10 * a + b, classes, captions)


def split_images(dataset: ImageDataset, val_fraction: float = 0.1,
                 seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Train and val subsets (each in the original order) from a seeded shuffle of whole images."""
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)
    n_val = min(len(order) - 1, max(1, round(len(order) * val_fraction)))
    return dataset.subset(sorted(order[n_val:])), dataset.subset(sorted(order[:n_val]))


def make_image_data(name="digits", *, val_fraction: float = 0.1, seed: int = 0, size=None,
                    pairs: tuple[int, int] = (8000, 800)) -> tuple[ImageDataset, ImageDataset]:
    """(train, val) of `digits`, `digit_pairs` (`pairs` = how many train and val pairs), or an image folder."""
    name = str(name)
    if name in ("digits", "digit_pairs"):
        train, val = split_images(load_digits(), val_fraction, seed)
        if name == "digits":
            return train, val
        return digit_pairs(train, pairs[0], seed), digit_pairs(val, pairs[1], seed + 1)
    if not Path(name).exists():
        close = difflib.get_close_matches(name, IMAGE_DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"no such image data {name!r}; {hint}{_DATA_HELP}")
    return split_images(load_image_folder(name, size=size), val_fraction, seed)


# --- batches ------------------------------------------------------------------------


class ImageBatches:
    """Random training batches that depend only on (seed, step): dicts of image, label (and caption) tensors."""

    def __init__(self, dataset: ImageDataset, batch_size: int, seed: int = 0) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.step = 0

    def get(self, step: int) -> dict[str, torch.Tensor]:
        digest = hashlib.blake2b(f"{self.seed},{step}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        index = torch.randint(0, len(self.dataset), (self.batch_size,), generator=gen)
        batch = {"image": self.dataset.images[index], "label": self.dataset.labels[index]}
        if self.dataset.captions is not None:
            batch["caption"] = self.dataset.captions[index]
        return batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            batch = self.get(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size, "num_images": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "num_images"):
            if key in state and state[key] != self.state_dict()[key]:
                raise DataError(f"checkpoint has {key}={state[key]} but this run has {self.state_dict()[key]}; "
                                "resume with the same image data and batch size, or start a fresh run")
        self.seed, self.step = int(state["seed"]), int(state["step"])
