"""Masked language modelling (BERT's objective) for `archc train`: the `DataSource` of a spec that takes
its targets as a `labels: Tokens[B, T]` input of the same shape as its tokens.

Such a spec reads `tokens` (its first `Tokens[B, T]` input), optionally segment ids (any other
`Tokens[B, T]` input: all zeros, one segment) and a padding `Mask[B, T]` (all true: windows have no
padding), and computes its loss against `labels`, where -100 marks a position not to predict (as
specs/bert.arch and transformers' BertForMaskedLM do). The masking is BERT's (Devlin et al. 2018,
§3.1): 15% of positions are chosen; of those 80% become the mask token, 10% a random token and 10%
stay. The mask token is one id past the tokenizer's vocabulary, so the spec's vocabulary is the
tokenizer's plus one. Every draw depends only on (seed, batch index), like the text windows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import attrs
import torch

from archc.training import data as data_mod
from archc.training.config import TrainConfig, TrainError

IGNORE = -100
MASK_FRACTION, REPLACE_MASK, REPLACE_RANDOM = 0.15, 0.8, 0.1


@attrs.frozen
class MaskedInputs:
    tokens: str
    labels: str
    segments: tuple[str, ...]  # filled with zeros
    masks: tuple[str, ...]  # filled with true


def masked_lm_inputs(compiled) -> MaskedInputs | None:
    """The roles of a masked-LM spec's inputs; None when the spec has no `labels` of its tokens' shape."""
    inputs = [n for n in compiled.ir.nodes() if n.op == "input"]
    labels = [n for n in inputs if n.name == "labels" and n.dtype == "long" and len(n.shape) == 2]
    tokens = [n for n in inputs if n.dtype == "long" and len(n.shape) == 2 and n.name != "labels"]
    if not labels or not tokens or tuple(tokens[0].shape) != tuple(labels[0].shape):
        return None
    masks = [n for n in inputs if n.dtype == "bool"]
    other = [n for n in inputs if n not in labels + tokens + masks]
    if other or any(tuple(n.shape) != tuple(labels[0].shape) for n in tokens + masks):
        where = compiled.ir.meta.get("source", "the spec")
        raise TrainError(f"{where}: a masked-LM spec takes Tokens[B, T] tokens (and segment ids), an optional "
                         "Mask[B, T] and `labels: Tokens[B, T]`; got "
                         + ", ".join(f"{n.name} {list(n.shape)}" for n in inputs))
    return MaskedInputs(tokens[0].name, labels[0].name, tuple(n.name for n in tokens[1:]),
                        tuple(n.name for n in masks))


def mask_tokens(tokens: torch.Tensor, mask_id: int, vocab: int, gen: torch.Generator) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """(corrupted tokens, labels): BERT's 15% / 80-10-10 masking; at least one position per row is chosen."""
    chosen = torch.rand(tokens.shape, generator=gen) < MASK_FRACTION
    first = torch.randint(0, tokens.shape[1], (tokens.shape[0],), generator=gen)
    chosen[torch.arange(tokens.shape[0]), first] |= ~chosen.any(dim=1)  # a row with nothing to predict has no loss
    how = torch.rand(tokens.shape, generator=gen)
    random_tokens = torch.randint(0, vocab, tokens.shape, generator=gen)
    corrupted = torch.where(chosen & (how < REPLACE_MASK), mask_id, tokens)
    corrupted = torch.where(chosen & (how >= REPLACE_MASK) & (how < REPLACE_MASK + REPLACE_RANDOM), random_tokens,
                            corrupted)
    return corrupted, torch.where(chosen, tokens, IGNORE)


def _generator(seed: int, index: int, salt: str) -> torch.Generator:
    digest = hashlib.blake2b(f"{salt},{seed},{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


class MaskedTextSource:
    """Windows of a tokenized corpus with BERT's masking, for a spec `masked_lm_inputs` recognises."""

    def __init__(self, dataset: data_mod.Dataset, compiled, config: TrainConfig) -> None:
        self.roles = masked_lm_inputs(compiled)
        self.vocab = dataset.tokenizer.vocab_size
        self.mask_id = self.vocab  # one past the tokenizer's ids
        sizes = [n.attrs["num"] for n in compiled.ir.nodes() if n.op == "embedding"]
        if sizes and max(sizes) < self.vocab + 1:
            raise TrainError(f"the tokenizer has {self.vocab} tokens and the mask token is one more, but the "
                             f"largest embedding has {max(sizes)}; set -D vocab={self.vocab + 1}")
        data_mod.check_val(dataset)
        self.dataset, self.config = dataset, config
        self.batches = data_mod.Batches(dataset.train, config.batch_size, config.seq_len, config.seed)
        self.items_per_batch = config.batch_size * config.seq_len

    @classmethod
    def open(cls, config: TrainConfig, compile_with: Callable[[dict], object], overrides: dict,
             tokenizer_file: Path | None, resume: bool) -> tuple[object, MaskedTextSource]:
        """As TextSource.open, with room for the mask token in the vocabulary."""
        compiled = compile_with(overrides)
        if resume and tokenizer_file is not None and tokenizer_file.exists():
            tokenizer, save = str(tokenizer_file), None
        else:
            tokenizer, save = config.tokenizer, tokenizer_file
        dataset = data_mod.make_dataset(config.data, tokenizer, seed=config.seed, save_tokenizer=save)
        needed = dataset.tokenizer.vocab_size + 1
        if "vocab" in compiled.params and compiled.params["vocab"] != needed and "vocab" not in overrides:
            compiled = compile_with({**overrides, "vocab": needed})
        return compiled, cls(dataset, compiled, config)

    def _inputs(self, tokens: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        corrupted, labels = mask_tokens(tokens, self.mask_id, self.vocab, gen)
        out = {self.roles.tokens: corrupted, self.roles.labels: labels}
        out.update({name: torch.zeros_like(tokens) for name in self.roles.segments})
        out.update({name: torch.ones_like(tokens, dtype=torch.bool) for name in self.roles.masks})
        return out

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return self._inputs(self.batches.get(index), _generator(self.config.seed, index, "train"))

    @torch.no_grad()
    def evaluate(self, model, device) -> dict[str, float]:
        """Masked-token loss and accuracy over held-out windows, masked the same way at every evaluation."""
        was_training = model.training
        model.eval()
        total, correct, count = 0.0, 0, 0
        try:
            windows = data_mod.eval_windows(self.dataset.val, self.config.batch_size, self.config.seq_len,
                                            max_windows=self.config.eval_batches)
            for i, tokens in enumerate(windows):
                inputs = {k: v.to(device) for k, v in self._inputs(tokens, _generator(self.config.seed, i, "val"))
                          .items()}
                logits = model(**inputs)["logits"].float()
                labels = inputs[self.roles.labels]
                chosen = labels != IGNORE
                total += torch.nn.functional.cross_entropy(logits[chosen], labels[chosen], reduction="sum").item()
                correct += int((logits[chosen].argmax(-1) == labels[chosen]).sum())
                count += int(chosen.sum())
        finally:
            model.train(was_training)
        if count == 0:
            raise TrainError("no held-out tokens to evaluate: the validation text is shorter than one window")
        return {"val_loss": total / count, "val_masked_accuracy": correct / count}

    def sample(self, model, device, seed: int) -> str:
        """A held-out window with its masked tokens filled in by the model, as `[guess]`."""
        tokens = next(iter(data_mod.eval_windows(self.dataset.val, 1, self.config.seq_len, max_windows=1)))
        inputs = self._inputs(tokens, _generator(seed, 0, "sample"))
        was_training = model.training
        model.eval()
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in inputs.items()})["logits"][0].float().cpu()
        model.train(was_training)
        decode = self.dataset.tokenizer.decode
        labels = inputs[self.roles.labels][0]
        guesses = logits[:, :self.vocab].argmax(-1)
        pieces = [f"[{decode([int(guesses[t])])}]" if labels[t] != IGNORE else decode([int(tokens[0, t])])
                  for t in range(tokens.shape[1])]
        return "".join(pieces)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
