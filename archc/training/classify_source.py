"""Image classification for `archc train`: the `DataSource` of a spec that takes one `Image[B, C, H, W]`
and one `Tokens[B]` label and does not noise its image (ViT; a diffusion spec has image_source.py).

The data are the built-in digits (8×8, one channel: compile ViT with -D image_size=8 -D channels=1
-D patch=4) or an image folder (`--data DIR`, one subfolder per class). Held-out metrics are the
loss and the accuracy of the `logits` output's argmax.
"""

from __future__ import annotations

import attrs
import torch

from archc.training.config import TrainConfig, TrainError
from archc.training.images import ImageBatches, ImageDataset, make_image_data


@attrs.frozen
class ClassifierInputs:
    image: str
    label: str
    shape: tuple[int, int, int]  # (C, H, W)


def classifier_inputs(compiled) -> ClassifierInputs | None:
    """The image and label inputs of an image classifier spec; None when the spec is not one."""
    inputs = [n for n in compiled.ir.nodes() if n.op == "input"]
    images = [n for n in inputs if n.dtype == "float" and len(n.shape) == 4]
    labels = [n for n in inputs if n.dtype == "long" and len(n.shape) == 1]
    if len(images) != 1 or len(labels) != 1 or len(inputs) != 2:
        return None
    if any(n.op == "add_noise" for n in compiled.ir.nodes()):
        return None
    if "logits" not in [name for name, _ in compiled.ir.outputs]:
        raise TrainError(f"{compiled.ir.meta.get('source', 'the spec')}: an image classifier returns its class "
                         "scores as `logits` (return logits, loss)")
    return ClassifierInputs(images[0].name, labels[0].name, tuple(int(d) for d in images[0].shape[1:]))


class ImageClassSource:
    """Random labelled batches of an image set; held-out loss and accuracy."""

    def __init__(self, train: ImageDataset, val: ImageDataset, roles: ClassifierInputs, config: TrainConfig) -> None:
        if tuple(train.shape) != roles.shape:
            c, h, w = train.shape
            raise TrainError(f"the images are {c}×{h}×{w} (C×H×W) but the spec's `{roles.image}` is "
                             f"{'×'.join(map(str, roles.shape))}; set its size parameters (for ViT on the "
                             f"digits: -D image_size={h} -D channels={c} -D patch=4)")
        self.train, self.val, self.roles, self.config = train, val, roles, config
        self.batches = ImageBatches(train, config.batch_size, config.seed)
        self.items_per_batch = config.batch_size

    @classmethod
    def open(cls, config: TrainConfig, compiled) -> ImageClassSource:
        roles = classifier_inputs(compiled)
        # the text corpus' default stands for "the default data": the digits
        data = "digits" if config.data == attrs.fields(TrainConfig).data.default else config.data
        train, val = make_image_data(data, seed=config.seed)
        width = compiled.ir.node(dict(compiled.ir.outputs)["logits"]).shape[-1]
        if isinstance(width, int) and width < train.num_classes:
            raise TrainError(f"the data has {train.num_classes} classes but the spec's logits have {width}; "
                             f"set its class count (for ViT: -D n_labels={train.num_classes})")
        return cls(train, val, roles, config)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        batch = self.batches.get(index)
        return {self.roles.image: batch["image"], self.roles.label: batch["label"]}

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total, correct = 0.0, 0
        try:
            for start in range(0, len(self.val), self.config.batch_size):
                images = self.val.images[start: start + self.config.batch_size].to(device)
                labels = self.val.labels[start: start + self.config.batch_size].to(device)
                logits = model(**{self.roles.image: images, self.roles.label: labels})["logits"].float()
                total += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
                correct += int((logits.argmax(-1) == labels).sum())
        finally:
            model.train(was_training)
        return {"val_loss": total / len(self.val), "val_accuracy": correct / len(self.val)}

    def sample(self, model, device, seed: int) -> str:
        return ""

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
