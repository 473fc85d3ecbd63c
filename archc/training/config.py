"""What a training run depends on (`TrainConfig`, saved as config.json beside its checkpoints), what it
returns (`RunResult`), and the error it stops with (`TrainError`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from archc.dsl.diagnostics import did_you_mean


class TrainError(Exception):
    """A run that cannot start or continue, with what to do about it."""


@attrs.define
class TrainConfig:
    """Everything a run depends on; saved as config.json beside its checkpoints."""

    data: str = "pydoc"  # pydoc | stdlib | reasoning | a path (.txt, dir, .jsonl, .bin, .npy)
    tokenizer: str = "byte"  # byte | bpe:N
    batch_size: int = 8
    seq_len: int = 256
    steps: int = 400
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest)
    lr: float = 3e-3
    muon_lr: float | None = None  # default: lr (Muon's update RMS is matched to AdamW's)
    weight_decay: float = 0.1
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup: int | None = None  # default: a tenth of the steps
    min_lr_ratio: float = 0.1
    clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    compile: bool = False  # torch.compile the model
    device: str = "auto"
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 16
    checkpoint_every: int = 100
    keep: int = 2
    sample_tokens: int = 200
    out_dir: str = "runs/default"
    log_every: int = 1
    progress: bool = True

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = [f.name for f in attrs.fields(cls)]
        for key in values:
            if key not in names:
                raise TrainError(f"unknown training option `{key}`" + hint(key, names))
        return cls(**values)

    def __attrs_post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


# The options that shape the optimisation itself: a resumed run must keep them (changing one would make the
# resumed half a different run than its config.json says). The others (steps, evaluation, checkpointing,
# logging, device, compile) may change on --resume.
SHAPES_THE_RUN = ("data", "tokenizer", "batch_size", "seq_len", "grad_accum", "optimizer", "lr", "muon_lr",
                  "weight_decay", "schedule", "warmup", "min_lr_ratio", "clip", "dtype", "seed")


def check_resumable(saved: dict[str, Any], config: TrainConfig, where: Path) -> None:
    """Refuse a --resume that changes an option in SHAPES_THE_RUN, naming each flag and both values."""
    now = attrs.asdict(config)
    changed = [f"--{k.replace('_', '-')} {now[k]!r} (the run has {saved[k]!r})"
               for k in SHAPES_THE_RUN if k in saved and saved[k] != now[k]]
    if changed:
        raise TrainError(f"--resume: {'; '.join(changed)}: a resumed run keeps the options that shape its "
                         f"optimisation (checkpoint in {where}); drop the flag, or start a new run with "
                         "another --out-dir or --overwrite")


@attrs.define
class RunResult:
    out_dir: Path
    steps: int
    final_loss: float
    val_loss: float | None
    val_perplexity: float | None
    initial_val_perplexity: float | None
    tokens_per_second: float
    mfu: float
    sample: str


def hint(name: str, choices) -> str:
    found = did_you_mean(name, choices)
    return f"; {found}" if found else ""
