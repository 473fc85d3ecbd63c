"""What a training mode changes in the one training loop: the `Strategy` object trainer.py calls.

The loop (trainer.py) is the same in every mode. A strategy supplies only what differs:

- which part of each global batch this process trains on (`batch`),
- what the processes agree on after the backward pass (`synchronize`: gradients, the loss, and the expert
  loads that aux-free MoE balancing sums over data-parallel ranks),
- the outer step after the optimizer's (`after_step`: DiLoCo),
- where and in which format it checkpoints (`save` / `load`: safetensors, or torch.distributed.checkpoint),
- which processes evaluate and log, and what each adds to a step's metrics (`record`).

`SingleProcess` is the plain case; FSDP2, DiLoCo / Streaming DiLoCo and the fault-tolerant (torchft) modes
are in distributed/strategies.py. Everything else (the bias update, router statistics, the NaN guard,
evaluation, metrics, checkpoint cadence) is the loop's and so runs in every mode.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from archc.training import checkpoint as ckpt
from archc.training.config import TrainError

if TYPE_CHECKING:
    from archc.training.config import TrainConfig
    from archc.training.sources import DataSource


class Strategy:
    """The hooks of the training loop, each doing what one process alone would do.

    Hooks that take `trainer` get the running trainer.Trainer (its model, optimizer, scheduler, source,
    metrics, out_dir, checkpoint_meta()); it is not imported here, as the loop imports its strategies."""

    mode = "single"  # recorded in config.json and checkpoints
    rank, world = 0, 1
    batches_per_step = 1  # global batches one step of all processes trains on (DiLoCo replicas: one each)

    @property
    def lead(self) -> bool:
        """Writes config.json, the plot, the sample; logs to OUT/metrics.jsonl."""
        return self.rank == 0

    @property
    def logs(self) -> bool:
        return self.lead

    @property
    def evaluates(self) -> bool:
        """Runs evaluation and sampling (all processes where the forward pass is collective)."""
        return self.lead

    def check(self, config: TrainConfig) -> None:
        """Refuse options this mode cannot honour."""

    def device(self, config: TrainConfig) -> torch.device:
        if config.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TrainError(f"--device {config.device}: CUDA is not available here (torch {torch.__version__}, "
                             f"CUDA build {torch.version.cuda or 'none'}); use --device cpu or auto")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise TrainError(f"--device {config.device}: this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        return device

    def metrics_path(self, out_dir: Path) -> Path:
        return out_dir / "metrics.jsonl"

    def memory(self, config: TrainConfig) -> dict[str, int]:
        """How this mode divides a run's memory (memory.py): this process's `rows` of each micro-batch, the
        `shards` its model state is split into, the `processes` of the run sharing this machine, and
        `outer_bytes` of extra state per parameter."""
        rows = config.batch_size // self.world if self.world > 1 else config.batch_size
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))  # torchrun says; spawned: all here
        return {"rows": rows, "shards": 1, "processes": processes, "outer_bytes": 0}

    def meta(self) -> dict:
        """What checkpoints of this mode record beyond the loop's meta (and a resume must match)."""
        return {}

    def shard(self, model: torch.nn.Module, compiled) -> None:
        """Distribute the model before the optimizer is built."""

    def attach(self, trainer) -> None:
        """Set up what needs the model, optimizer and scheduler (an outer loop, a torchft Manager)."""

    def rejoin(self, trainer) -> int | None:
        """The step a restarted process continues from after fetching a live peer's state (None: no peer)."""
        return None

    def before_step(self, trainer, step: int) -> None:
        """Before (0-based) step `step`, once."""

    def begin_attempt(self, step: int) -> None:
        """Before each try of step `step` (a fault-tolerant step whose commit vote fails is tried again)."""

    def batch(self, source: DataSource, index: int) -> dict[str, torch.Tensor]:
        """This process's rows of global micro-batch `index`: a contiguous slice, the same batch the
        single-process run draws, so data-parallel modes average to its gradient."""
        batch = source.batch(index)
        if self.world == 1:
            return batch
        rows = next(iter(batch.values())).shape[0] // self.world
        return {k: v[self.rank * rows:(self.rank + 1) * rows] for k, v in batch.items()}

    def synchronize(self, loss: float, loads: list[torch.Tensor]) -> tuple[float, bool]:
        """After backward: make gradients, the loss and the expert `loads` (summed in place) those of the
        global batch; returns (loss, whether the step may be applied)."""
        return loss, True

    def after_step(self, trainer, step: int, done: bool) -> None:
        """After optimizer step `step` (1-based); `done` after the last one."""

    def record(self) -> dict:
        """What this mode adds to the step's metrics line."""
        return {}

    def eval_context(self):
        """Held around evaluation and sampling (DiLoCo: the global parameters)."""
        return contextlib.nullcontext()

    def peak_flops(self, config: TrainConfig, device: torch.device) -> float | None:
        """The matmul peak MFU divides by, or None where MFU is not reported."""
        return None

    def leftovers(self, out_dir: Path) -> list[Path]:
        """Directories of safetensors checkpoints this process writes (crashed saves are swept at start)."""
        return []

    def save(self, trainer, step: int) -> None:
        raise NotImplementedError

    def load(self, trainer) -> dict:
        """Restore the newest checkpoint; returns its meta (with "step")."""
        raise NotImplementedError

    def finish(self, trainer) -> None:
        """After the last step, evaluation and the sample."""


class SingleProcess(Strategy):
    """One process on one device: safetensors checkpoints with RNG state, and MFU."""

    def peak_flops(self, config, device) -> float:
        from archc.training.perf import matmul_peak_flops

        return matmul_peak_flops(torch.bfloat16 if config.dtype == "bfloat16" else torch.float32, device=device,
                                 seconds=0.5)

    def leftovers(self, out_dir: Path) -> list[Path]:
        return [out_dir]

    def save(self, trainer, step) -> None:
        ckpt.save_checkpoint(trainer.out_dir, step, trainer.model, trainer.optimizer, trainer.scheduler,
                             meta=trainer.checkpoint_meta(step), keep=trainer.config.keep)

    def load(self, trainer) -> dict:
        if not any((trainer.out_dir / "checkpoints").glob("step_*")):
            raise TrainError(f"--resume: no checkpoint in {trainer.out_dir}; start without --resume")
        return ckpt.load_checkpoint(trainer.out_dir, trainer.model, trainer.optimizer, trainer.scheduler,
                                    expect=trainer.resume_expect())
