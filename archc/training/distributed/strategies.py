"""The distributed strategies of the one training loop (strategy.py, trainer.py), on gloo (CPU).

FSDP2 (`--nproc N`): every layer scope of the IR (`layers.{i}`) and then the whole model are wrapped with
`fully_shard` over a 1-D CPU device mesh (also on one process, so DCP checkpoints reshard between N and M);
each rank takes its contiguous slice of the same global batch the single-process run draws, so the averaged
gradients, the loss curve and the expert loads summed for aux-free balancing are those of the
single-process run up to float rounding. The logged loss is the mean over ranks. Checkpoints go through
torch.distributed.checkpoint (dcp.py). Muon works on the sharded weights (optim.py).

DiLoCo (`--diloco`, diloco.py): one process per replica; replica r draws batch `k·R + r` where the
single-process run draws batch `k` (so one replica sees exactly the plain run's data). Inner optimizer and
scheduler are local, and so is aux-free balancing: each replica moves its routers' biases (buffers, which
the outer step does not average) by its own loads, with no collective between syncs. Evaluation and the
sample use the global parameters. Each replica checkpoints its own state (safetensors, below).

Fault tolerance (`--fault-tolerant`, ft.py): each DiLoCo replica, or each of the `--nproc R` data-parallel
processes, is its own torchft replica group; syncs, or every step's gradient average (with the expert
loads), go through its Manager. Data parallel under torchft keeps a whole model per group and takes the
batch slices of `--nproc R`. Replica 0 logs to metrics.jsonl, replica r > 0 to replica_r/metrics.jsonl;
every replica writes replica_r/ft_final.json, and data-parallel replica 0 saves the final checkpoint to
checkpoints/.

All log `comm_bytes` (bytes this rank sent during the step, ring-algorithm count; FSDP2: parameter
all-gathers in forward and backward plus the gradient reduce-scatter, from the parameter count) and
`comm_bytes_total`; DiLoCo and torchft data parallel add `comm_seconds` (time waiting on collectives).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.distributed as dist

from archc.training.checkpoint import load_checkpoint, save_checkpoint
from archc.training.config import TrainError
from archc.training.distributed import dcp, ft
from archc.training.distributed.diloco import DiLoCo, DiLoCoConfig, fragment_params, layer_scopes
from archc.training.strategy import Strategy


class _OnCPU(Strategy):
    def check(self, config) -> None:
        if config.tokenizer != "byte":
            raise TrainError("distributed training supports --tokenizer byte for now")
        if config.device not in ("auto", "cpu") or config.compile:
            raise TrainError("distributed training runs on the CPU with gloo, without --compile, for now")

    def device(self, config) -> torch.device:
        return torch.device("cpu")


class FSDP2(_OnCPU):
    mode = "fsdp2"

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.total_bytes = 0

    @property
    def evaluates(self) -> bool:
        return True  # the forward pass all-gathers the shards: every rank takes part

    def memory(self, config) -> dict[str, int]:
        return {**super().memory(config), "shards": self.world}

    def shard(self, model, compiled) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        n_params = sum(p.numel() for p in model.parameters())
        self.step_bytes = 3 * (self.world - 1) * n_params * 4 // self.world
        mesh = init_device_mesh("cpu", (self.world,))  # an explicit CPU mesh (pytorch#132471)
        for scope in layer_scopes(compiled):
            fully_shard(model.get_submodule(scope), mesh=mesh)
        fully_shard(model, mesh=mesh)

    def synchronize(self, loss, loads):
        # gradients were reduce-scattered in backward; the loss and the expert loads go in one all-reduce
        if self.world > 1:
            buf = torch.cat([torch.tensor([loss]), *(load.float() for load in loads)])
            dist.all_reduce(buf)
            loss, i = buf[0].item() / self.world, 1
            for load in loads:
                load.copy_(buf[i:i + load.numel()])
                i += load.numel()
        return loss, True

    def record(self) -> dict:
        self.total_bytes += self.step_bytes
        return {"comm_bytes": self.step_bytes, "comm_bytes_total": self.total_bytes}

    def save(self, trainer, step) -> None:
        dcp.save(trainer, step)

    def load(self, trainer) -> dict:
        return dcp.load(trainer)


class DiLoCoReplica(_OnCPU):
    mode = "diloco"

    def __init__(self, rank: int, world: int, config: DiLoCoConfig, comm=None) -> None:
        self.rank, self.world, self.config, self.comm = rank, world, config, comm
        self.batches_per_step = world
        self.total_bytes = 0

    def meta(self) -> dict:
        return {"world": self.world, "diloco": dataclasses.asdict(self.config)}

    def attach(self, trainer) -> None:
        self.outer = DiLoCo(trainer.model, fragment_params(trainer.compiled, trainer.model, self.config.fragments,
                                                           self.config.assign), self.config, comm=self.comm)

    def batch(self, source, index):
        return source.batch(index * self.world + self.rank)

    def memory(self, config) -> dict[str, int]:
        return {**super().memory(config), "rows": config.batch_size, "outer_bytes": 8}  # global copy, momentum

    def before_step(self, trainer, step) -> None:
        self.bytes_before, self.wait_before = self.outer.stats.bytes_sent, self.outer.stats.comm_seconds

    def after_step(self, trainer, step, done) -> None:
        self.outer.after_inner_step(step)
        if done:
            self.outer.finish(step)  # consume syncs still in flight

    def record(self) -> dict:
        sent = self.outer.stats.bytes_sent - self.bytes_before
        self.total_bytes += sent
        return {"comm_bytes": sent, "comm_bytes_total": self.total_bytes,
                "comm_seconds": self.outer.stats.comm_seconds - self.wait_before}

    def eval_context(self):
        return self.outer.swap_in_global()

    # Each replica writes its own checkpoint (training/checkpoint.py: safetensors + JSON, atomic) under
    # diloco/replica_r/checkpoints/step_N: its local model, inner optimizer and scheduler, and the DiLoCo
    # state (global copies, outer optimizer states, syncs in flight), identical on every replica, stored with
    # each so one directory is a complete replica. Replicas save at the same steps and meet at a barrier;
    # resume takes the newest step every replica has.

    def replica_dir(self, out_dir: Path, rank: int | None = None) -> Path:
        return out_dir / "diloco" / f"replica_{self.rank if rank is None else rank}"

    def leftovers(self, out_dir) -> list[Path]:
        return [self.replica_dir(out_dir)]

    def save(self, trainer, step) -> None:
        save_checkpoint(self.replica_dir(trainer.out_dir), step, trainer.model, _ReplicaState(trainer, self.outer),
                        trainer.scheduler, meta={**trainer.checkpoint_meta(step), "replica": self.rank},
                        keep=trainer.config.keep)
        if dist.is_initialized():
            dist.barrier()

    def load(self, trainer) -> dict:
        steps = None
        for r in range(self.world):
            found = {int(p.parent.name.removeprefix("step_"))
                     for p in (self.replica_dir(trainer.out_dir, r) / "checkpoints").glob("step_*/meta.json")}
            steps = found if steps is None else steps & found
        if not steps:
            raise TrainError(f"--resume: no DiLoCo checkpoint saved by all {self.world} replicas under "
                             f"{trainer.out_dir / 'diloco'}; start without --resume (or with the replica count it "
                             "was saved with)")
        path = self.replica_dir(trainer.out_dir) / "checkpoints" / f"step_{max(steps):08d}"
        return load_checkpoint(path, trainer.model, _ReplicaState(trainer, self.outer), trainer.scheduler,
                               expect=trainer.resume_expect())

    def finish(self, trainer) -> None:
        if self.lead:
            (trainer.out_dir / "sync_schedule.json").write_text(json.dumps(self.outer.stats.schedule) + "\n")


class _ReplicaState:
    """Inner optimizer + outer DiLoCo state as one optimizer-like object, so they land in one checkpoint."""

    def __init__(self, trainer, outer: DiLoCo) -> None:
        self.inner, self.outer = trainer.optimizer, outer

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.outer.load_state_dict(state["outer"])


class _InReplicaGroup:
    """What the fault-tolerant modes share: every group logs, none keeps per-step checkpoints, a restarted
    group rejoins by healing from a live peer, and the test-only failure injection."""

    group: ft.ReplicaGroup
    outer: DiLoCo | None = None

    @property
    def logs(self) -> bool:
        return True

    def metrics_path(self, out_dir: Path) -> Path:
        return out_dir / ("metrics.jsonl" if self.rank == 0 else f"replica_{self.rank}/metrics.jsonl")

    def rejoin(self, trainer) -> int | None:
        return self.group.rejoin(trainer.metrics, self.outer)

    def memory(self, config) -> dict[str, int]:
        alone = self.group.config.replica_id is not None  # started on its own (its own machine, say)
        return {**super().memory(config), "processes": 1 if alone else self.world}

    def inject(self, trainer, step: int) -> None:
        ft.inject(trainer.out_dir, self.rank, step + 1)

    def save(self, trainer, step) -> None:
        """No per-step checkpoints: a group that dies heals from a live peer."""


class FaultTolerantDataParallel(_InReplicaGroup, _OnCPU):
    mode = "ft-data-parallel"

    def __init__(self, group: ft.ReplicaGroup) -> None:
        self.group, self.rank, self.world = group, group.replica, group.replicas
        self.total_bytes = 0

    def attach(self, trainer) -> None:
        self.group.connect()
        self.group.register(trainer.out_dir, trainer.model, trainer.optimizer, trainer.scheduler)
        self.params = list(trainer.model.parameters())

    def before_step(self, trainer, step) -> None:
        self.inject(trainer, step)
        self.retries, self.step_bytes, self.comm_seconds = -1, 0, 0.0

    def begin_attempt(self, step) -> None:
        self.retries += 1
        self.group.comm.begin(None)  # the quorum: a group that (re)joins heals here, before the forward pass
        if self.group.clock["step"] != step:
            raise TrainError(f"replica {self.rank} healed to step {self.group.clock['step']} at step {step + 1}; "
                             "only a group that (re)starts heals")

    def synchronize(self, loss, loads):
        loss, committed, sent, waited = ft.average_gradients(self.group.comm, self.params, loss, loads)
        self.step_bytes, self.comm_seconds = self.step_bytes + sent, self.comm_seconds + waited
        return loss, committed

    def after_step(self, trainer, step, done) -> None:
        self.group.clock["step"] = step

    def record(self) -> dict:
        self.total_bytes += self.step_bytes
        return {"comm_bytes": self.step_bytes, "comm_bytes_total": self.total_bytes,
                "comm_seconds": self.comm_seconds, "retries": self.retries, **self.group.record()}

    def leftovers(self, out_dir) -> list[Path]:
        return [out_dir] if self.lead else []

    def finish(self, trainer) -> None:
        self.group.finish(trainer.out_dir, {n: p.detach() for n, p in trainer.model.named_parameters()})
        if self.lead:
            save_checkpoint(trainer.out_dir, trainer.config.steps, trainer.model, trainer.optimizer, trainer.scheduler,
                            meta=trainer.checkpoint_meta(trainer.config.steps), keep=trainer.config.keep)


class FaultTolerantDiLoCo(_InReplicaGroup, DiLoCoReplica):
    def __init__(self, group: ft.ReplicaGroup, config: DiLoCoConfig) -> None:
        super().__init__(group.replica, group.replicas, config)
        self.group = group

    def attach(self, trainer) -> None:
        self.comm = self.group.connect()
        super().attach(trainer)
        self.group.register(trainer.out_dir, trainer.model, trainer.optimizer, trainer.scheduler, self.outer)

    def before_step(self, trainer, step) -> None:
        self.inject(trainer, step)
        super().before_step(trainer, step)

    def after_step(self, trainer, step, done) -> None:
        self.group.clock["step"] = step
        super().after_step(trainer, step, done)
        if self.group.clock["step"] != step:  # healed mid-run from a peer at another point of the schedule
            raise TrainError(f"replica {self.rank} healed at inner step {self.group.clock['step']} during its "
                             f"sync after step {step}; replicas must sync at the same inner steps")

    def record(self) -> dict:
        return {**super().record(), **self.group.record()}

    def leftovers(self, out_dir) -> list[Path]:
        return []

    def finish(self, trainer) -> None:
        self.group.finish(trainer.out_dir, self.outer.global_state(), self.outer.stats)
        super().finish(trainer)
