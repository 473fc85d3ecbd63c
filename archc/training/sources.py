"""Where a run's batches come from: a `DataSource` hands out dict batches named after the model's inputs.

The training loop (trainer.py) knows nothing of text. It asks the source for global batch `index` (a pure
function of the seed and the index, so a resumed run and every parallel mode see the same data), calls the
model with it by keyword, and minimises what the model returns under `loss`: the objective is the spec's.
How to score held-out data and what to show at the end of a run belong to the objective too, so they live
with the source. `TextSource` is the one `archc train` uses today (next-token windows of a corpus); a source
for another objective (images and noise levels, labels, byte patches) implements the same five methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from archc.training import data as data_mod
from archc.training.config import TrainConfig, TrainError


class DataSource(Protocol):
    items_per_batch: int  # what one global batch holds, for throughput (tokens, for text)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        """Global (micro-)batch `index`, keyed by the model's input names; rows are examples."""

    def evaluate(self, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        """Held-out metrics of the model as it is (at least `val_loss`)."""

    def sample(self, model: torch.nn.Module, device: torch.device, seed: int) -> str:
        """Something to look at after training ("" if nothing)."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None:
        """Refuse (TrainError / DataError) a checkpoint made from other data."""


class TextSource:
    """Next-token windows of a tokenized corpus, for a model with one `Tokens[B, T]` input."""

    def __init__(self, dataset: data_mod.Dataset, compiled, config: TrainConfig) -> None:
        needed = dataset.tokenizer.vocab_size
        for node in compiled.ir.nodes():
            if node.op == "embedding" and node.attrs["num"] < needed:
                raise TrainError(f"the tokenizer has {needed} tokens but the embedding `{node.path}` has "
                                 f"{node.attrs['num']}; set -D vocab={needed}")
        data_mod.check_val(dataset)
        self.dataset, self.config, self.input = dataset, config, token_input(compiled)
        self.max_context = compiled.params.get("max_len")
        self.batches = data_mod.Batches(dataset.train, config.batch_size, config.seq_len, config.seed)
        self.items_per_batch = config.batch_size * config.seq_len

    @staticmethod
    def check(compiled) -> None:
        """Refuse, by name, a spec whose inputs this source cannot feed."""
        token_input(compiled)

    @classmethod
    def open(cls, config: TrainConfig, compile_with: Callable[[dict], object], overrides: dict,
             tokenizer_file: Path | None, resume: bool) -> tuple[object, TextSource]:
        """Load and tokenize the corpus, compile the spec for its vocabulary; returns (compiled, source).

        A BPE tokenizer is trained on a fresh run and written to `tokenizer_file` (None: not written); a
        resumed run reads it back, so it tokenizes exactly as before."""
        compiled = compile_with(overrides)  # compile_with calls `check` before spending time on data
        if resume and tokenizer_file is not None and tokenizer_file.exists():
            tokenizer, save = str(tokenizer_file), None
        else:
            tokenizer, save = config.tokenizer, tokenizer_file
        dataset = data_mod.make_dataset(config.data, tokenizer, seed=config.seed, save_tokenizer=save)
        needed = dataset.tokenizer.vocab_size
        if "vocab" in compiled.params and compiled.params["vocab"] < needed and "vocab" not in overrides:
            compiled = compile_with({**overrides, "vocab": needed})
        return compiled, cls(dataset, compiled, config)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return {self.input: self.batches.get(index)}

    def evaluate(self, model, device) -> dict[str, float]:
        """Validation loss, perplexity and bits per byte (total nats / UTF-8 bytes scored / ln 2: comparable across
        tokenizers); for a model that returns its patch `lengths` (byte patching), their mean and histogram."""
        from archc.training.evaluate import perplexity

        windows = data_mod.eval_windows(self.dataset.val, self.config.batch_size, self.config.seq_len,
                                        max_windows=self.config.eval_batches)
        byte_lengths = torch.tensor(self.dataset.tokenizer.byte_lengths(), device=device)
        scored = {"bytes": 0}
        patches: list[torch.Tensor] = []

        def observe(tokens, out):
            scored["bytes"] += int(byte_lengths[tokens[:, 1:]].sum())
            if "lengths" in out:
                patches.append(out["lengths"][out["lengths"] > 0].cpu())

        result = perplexity(model, windows, device=device, observe=observe)
        metrics = {"val_loss": result.loss, "val_perplexity": result.perplexity,
                   "val_bits_per_byte": result.loss * result.tokens / max(scored["bytes"], 1) / math.log(2)}
        if patches:
            metrics |= patch_length_metrics(torch.cat(patches))
        return metrics

    def sample(self, model, device, seed: int) -> str:
        from archc.training.evaluate import generate

        if not self.config.sample_tokens:
            return ""
        prompt = self.dataset.tokenizer.encode("\n")
        new = generate(model, prompt, self.config.sample_tokens, temperature=0.8, top_k=40,
                       max_context=self.max_context, seed=seed, device=device)[0]
        return self.dataset.tokenizer.decode(new)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)


def patch_length_metrics(lengths: torch.Tensor) -> dict:
    """The mean patch length and the histogram: entry i counts the patches of i bytes (i >= 1; the last entry
    counts the longer ones too)."""
    counts = torch.bincount(lengths.clamp(max=HISTOGRAM_MAX), minlength=HISTOGRAM_MAX + 1)
    return {"val_patch_length_mean": lengths.float().mean().item(), "val_patch_length_histogram": counts.tolist()}


HISTOGRAM_MAX = 32


def token_input(compiled) -> str:
    inputs = [n for n in compiled.ir.nodes() if n.op == "input"]
    if len(inputs) != 1 or inputs[0].dtype != "long":
        raise TrainError("archc train needs a model with exactly one Tokens[B, T] input")
    return inputs[0].name
