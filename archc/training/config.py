"""What a training run depends on (`TrainConfig`, saved as config.json beside its checkpoints), what it
returns (`RunResult`), and the error it stops with (`TrainError`)."""

from __future__ import annotations

import math
import re
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
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval_every: int = 100
    eval_batches: int = 16
    checkpoint_every: int = 100
    keep: int = 2
    sample_tokens: int = 200
    out_dir: str = "runs/default"
    log_every: int = 1
    progress: bool = True
    init_from: str | None = None  # a Hugging Face model directory whose weights the model starts from
    init_map: str | None = None  # its weight map: a built-in model_type or a map file (.py, it runs)
    memory_check: bool = True  # refuse a run whose estimated memory exceeds what this machine has free
    # staged training (a spec whose patcher reads another model: the BLT's entropy model): a finished first stage
    # to take that model from, and the first stage's steps (default: --steps)
    entropy_checkpoint: str | None = None
    entropy_steps: int | None = None
    memory_device: str | None = None  # keep Engram tables here (cpu: host memory), rows gathered before the layers

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        names = [f.name for f in attrs.fields(cls)]
        for key in values:
            if key not in names:
                raise TrainError(f"unknown training option `{key}`" + hint(key, names))
        return cls(**values)

    def __attrs_post_init__(self) -> None:
        """Refuse values the trainer would misread (a negative clip that flips gradients, a dtype it does not
        implement, a NaN learning rate), naming the flag and what it accepts."""
        for name in ("batch_size", "steps", "grad_accum", "eval_every", "eval_batches", "checkpoint_every",
                     "keep", "log_every"):
            _at_least(self, name, 1)
        _at_least(self, "seq_len", 2, "(a window is read up to its last token and scored from its second)")
        _at_least(self, "sample_tokens", 0)
        if self.warmup is not None:
            _at_least(self, "warmup", 0)
        if self.entropy_steps is not None:
            _at_least(self, "entropy_steps", 1)
        _number(self, "lr", low=0.0, low_open=True)
        if self.muon_lr is not None:
            _number(self, "muon_lr", low=0.0, low_open=True)
        _number(self, "weight_decay", low=0.0)
        _number(self, "min_lr_ratio", low=0.0, high=1.0)
        _number(self, "clip", low=0.0, why="(0 turns clipping off)")
        _choice(self, "dtype", DTYPES)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise TrainError(f"--seed {self.seed!r}: expected an integer in [0, 2**63)")
        if not isinstance(self.device, str) or not DEVICE.fullmatch(self.device):
            raise TrainError(f"--device {self.device!r}: expected auto, cpu, cuda or cuda:N")
        where = self.memory_device
        if where is not None and not (isinstance(where, str) and DEVICE.fullmatch(where) and where != "auto"):
            raise TrainError(f"--memory-device {self.memory_device!r}: expected cpu, cuda or cuda:N")
        if self.init_map is not None and self.init_from is None:
            raise TrainError("--init-map goes with --init-from DIR (the checkpoint it maps)")


DTYPES = ("float32", "bfloat16")  # what the trainer implements: fp32 weights, optionally bf16 autocast
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _at_least(config: TrainConfig, name: str, low: int, why: str = "") -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainError(f"{_flag(name)} {value!r}: expected an integer of at least {low}" + (f" {why}" if why else ""))


def _number(config: TrainConfig, name: str, low: float, high: float = math.inf, low_open: bool = False,
            why: str = "") -> None:
    value = getattr(config, name)
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        most = f" and at most {high:g}" if high < math.inf else ""
        bounds = f"{'above' if low_open else 'at least'} {low:g}{most}"
        raise TrainError(f"{_flag(name)} {value!r}: expected a finite number {bounds}" + (f" {why}" if why else ""))


def _choice(config: TrainConfig, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(config, name)
    if value not in choices:
        raise TrainError(f"{_flag(name)} {value!r}: expected one of {', '.join(choices)}" + hint(str(value), choices))


# The options that shape the optimisation itself: a resumed run must keep them (changing one would make the
# resumed half a different run than its config.json says). The others (steps, evaluation, checkpointing,
# logging, device, compile) may change on --resume.
SHAPES_THE_RUN = ("data", "tokenizer", "batch_size", "seq_len", "grad_accum", "optimizer", "lr", "muon_lr",
                  "weight_decay", "schedule", "warmup", "min_lr_ratio", "clip", "dtype", "seed", "init_from",
                  "init_map", "entropy_checkpoint")


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
