"""`archc train --nproc N` (FSDP2 data parallel) and `--diloco ...` (one replica per process), on gloo.

Data parallel (FSDP2): every layer scope of the IR (`layers.{i}`) and then the
whole model are wrapped with `fully_shard` over a 1-D CPU device mesh; each rank
takes its contiguous slice of the same global batch the single-process run
draws (`Batches.get(step)`), so the averaged gradients — and the loss curve —
are those of the single-process run up to float rounding. The logged loss is
the mean over ranks. Checkpoints are written with torch.distributed.checkpoint
(`dcp/step_N/`), so a run saved on N processes can resume on M. Muon works on
the sharded weights (optim.py: gather each matrix's update, orthogonalise it
whole, keep this rank's shard).

DiLoCo: one process per replica; replica r draws batch `k·R + r` where the
single-process run draws batch `k` (so one replica sees exactly the plain run's
data). Inner optimizer and scheduler are local; the outer step is in diloco.py.
Logged loss is replica 0's inner loss; evaluation uses the global parameters.
`--resume` continues from per-replica checkpoints (see "DiLoCo checkpoints").

Fault tolerance (`--fault-tolerant`, ft.py): each DiLoCo replica, or each of
the `--nproc R` data-parallel processes, is its own torchft replica group (one
process, no torch.distributed group between groups); syncs, or every step's
gradient average, go through its Manager. Data parallel under torchft keeps a
whole model per group (no FSDP2: there is no process group to shard over) and
takes the same batch slices as `--nproc R`. Replica 0 logs to metrics.jsonl,
replica r > 0 to replica_r/metrics.jsonl; every replica writes
replica_r/ft_final.json (Manager step, step, hash of the global copy or, in
data parallel, of the parameters), and data-parallel replica 0 saves the final
checkpoint to checkpoints/.

Both modes log the single-process metrics plus `comm_bytes` (bytes this rank
sent during the step, ring-algorithm count; for FSDP2: parameter all-gathers
in forward and backward plus the gradient reduce-scatter, computed from the
parameter count) and, for DiLoCo, `comm_seconds` (time spent waiting on
collectives).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

from archc.training.distributed import ft
from archc.training.distributed.diloco import DiLoCo, DiLoCoConfig, fragment_params, layer_scopes
from archc.training.distributed.ft import FTConfig
from archc.training.distributed.launch import init, spawn, under_torchrun
from archc.training.train import RunResult, TrainConfig, TrainError, _check_vocab, _log, _plot, prepare


def train_distributed(spec, config: TrainConfig | None = None, overrides: dict[str, Any] | None = None, *,
                      nproc: int = 1, diloco: DiLoCoConfig | None = None, resume: bool = False,
                      fault_tolerant: FTConfig | None = None, **compile_kw) -> RunResult:
    """Train on `nproc` gloo processes (spawned here, or the torchrun group when under torchrun).

    With `fault_tolerant`, DiLoCo replicas (or, without `diloco`, `nproc` data-parallel processes) run as
    torchft replica groups (ft.py): all of them supervised here, or only `fault_tolerant.replica_id` when it
    is set (one group per machine or per launch).
    """
    config = config or TrainConfig()
    compile_kw.pop("on_stage", None)  # hooks print from every rank; not carried across processes
    if fault_tolerant is not None:
        return _train_ft(spec, config, overrides, nproc, diloco, resume, fault_tolerant, compile_kw)
    if diloco is not None and not under_torchrun():
        nproc = diloco.replicas
    if under_torchrun():
        rank, world = init()
        if diloco is not None and world != diloco.replicas:
            raise TrainError(f"--diloco replicas={diloco.replicas} but torchrun started {world} processes; "
                             "start one process per replica")
        try:
            result = _worker(rank, world, spec, config, overrides, diloco, resume, compile_kw)
        finally:
            dist.destroy_process_group()
        return result if rank == 0 else None
    if nproc < 1:
        raise TrainError("--nproc must be at least 1")
    if diloco is None and config.batch_size % nproc:
        raise TrainError(f"--batch-size {config.batch_size} does not split over --nproc {nproc}; "
                         "use a multiple of the process count")
    return spawn(_worker, nproc, spec, config, overrides, diloco, resume, compile_kw)


def _train_ft(spec, config, overrides, nproc, diloco, resume, ft_config: FTConfig, compile_kw) -> RunResult | None:
    replicas = diloco.replicas if diloco is not None else nproc
    if replicas < 1:
        raise TrainError("--nproc must be at least 1")
    if diloco is None and config.batch_size % replicas:
        raise TrainError(f"--batch-size {config.batch_size} does not split over --nproc {replicas} replica "
                         "groups; use a multiple of the group count")
    if resume:
        raise TrainError("--fault-tolerant restarts heal from a live peer; --resume is not supported with it")
    try:
        import torchft  # noqa: F401
    except ImportError as err:
        raise TrainError(f"--fault-tolerant needs torchft (pip install torchft==0.2.0): {err}") from None
    if diloco is not None:
        ft.check(diloco)
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise TrainError("--fault-tolerant runs one process per replica group: start each group with "
                         "`archc train ... --fault-tolerant --lighthouse URL --replica-id I` "
                         "(under torchrun: --nproc_per_node 1, one torchrun per group)")
    if ft_config.replica_id is not None:
        if ft_config.lighthouse is None:
            raise TrainError("--replica-id needs --lighthouse URL (the lighthouse all replica groups share)")
        if not 0 <= ft_config.replica_id < replicas:
            raise TrainError(f"--replica-id {ft_config.replica_id}: must be in [0, {replicas})")
        ft.quiet()
        result = _ft_worker(ft_config.replica_id, ft_config.lighthouse, replicas, spec, config, overrides, diloco,
                            ft_config, compile_kw)
        return result if ft_config.replica_id == 0 else None
    return ft.supervise(_ft_worker, replicas, ft_config, replicas, spec, config, overrides, diloco, ft_config,
                        compile_kw)


def _ft_worker(replica: int, lighthouse: str, replicas: int, spec, config, overrides, diloco, ft_config,
               compile_kw) -> RunResult:
    return _worker(replica, replicas, spec, config, overrides, diloco, False, compile_kw,
                   ft_setup=(ft_config, lighthouse))


def _worker(rank: int, world: int, spec, config: TrainConfig, overrides, diloco: DiLoCoConfig | None,
            resume: bool, compile_kw: dict, ft_setup: tuple[FTConfig, str] | None = None) -> RunResult:
    import archc
    from archc.training import data as data_mod
    from archc.training.evaluate import generate, perplexity
    from archc.training.optim import build_optimizer, lr_lambda
    from archc.interop.weights import fused_layout

    lead = rank == 0
    data_ft = diloco is None and ft_setup is not None  # data parallel under torchft: no FSDP2, no torch.distributed
    out_dir = Path(config.out_dir)
    overrides = dict(overrides or {})
    torch.manual_seed(config.seed)
    if config.tokenizer != "byte":
        raise TrainError("distributed training supports --tokenizer byte for now")
    if config.device not in ("auto", "cpu") or config.compile:
        raise TrainError("distributed training runs on the CPU with gloo, without --compile, for now")
    if lead or ft_setup:
        out_dir.mkdir(parents=True, exist_ok=True)
    compiled = archc.compile(spec, overrides, **compile_kw)
    prepare(compiled, config)
    dataset = data_mod.make_dataset(config.data, config.tokenizer, seed=config.seed)
    vocab_needed = dataset.tokenizer.vocab_size
    if "vocab" in compiled.params and compiled.params["vocab"] < vocab_needed and "vocab" not in overrides:
        compiled = archc.compile(spec, {**overrides, "vocab": vocab_needed}, **compile_kw)
    input_name = prepare(compiled, config)
    _check_vocab(compiled, vocab_needed)

    model = compiled.build(device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    outer = None
    per_rank = config.batch_size
    if diloco is None:
        if config.batch_size % world:
            raise TrainError(f"--batch-size {config.batch_size} does not split over {world} processes")
        per_rank = config.batch_size // world
        if not data_ft:
            _shard(model, compiled, world)  # also on 1 process, so DCP checkpoints reshard between N and M
    optimizer = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name=config.optimizer,
                                lr=config.lr, weight_decay=config.weight_decay, muon_lr=config.muon_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, config.steps // 10 if config.warmup is None else config.warmup,
                             config.steps, min_ratio=config.min_lr_ratio))
    manager = comm = None
    clock = {"step": 0}  # the inner step done; travels with the state a healing replica fetches
    if ft_setup is not None:
        manager = ft.make_manager(rank, ft_setup[0], ft_setup[1])
        comm = ft.FTComm(manager)
    if diloco is not None:
        outer = DiLoCo(model, fragment_params(compiled, model, diloco.fragments, diloco.assign), diloco,
                       comm=comm)
    batches = data_mod.Batches(dataset.train, config.batch_size, config.seq_len, config.seed)
    meta = {"spec_sha": compiled.ir.meta["sha256"], "params": compiled.params, "config": attrs.asdict(config),
            "tokenizer": config.tokenizer, "data": config.data, "spec": str(spec), "world": world,
            "mode": "diloco" if diloco is not None else "ft-data-parallel" if data_ft else "fsdp2",
            "diloco": dataclasses.asdict(diloco) if diloco is not None else None}

    start = 0
    metrics_path = out_dir / "metrics.jsonl" if lead else out_dir / f"replica_{rank}" / "metrics.jsonl"
    if manager is not None:
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        ft.register(manager, comm, clock, model, optimizer, scheduler, outer)
        ft.mark_started(out_dir, rank)
        if ft.join(manager, comm, outer, clock, world, ft_setup[0].join_wait):
            start = clock["step"]
            from archc.training.train import _truncate_metrics
            _truncate_metrics(metrics_path, start)
            _log(metrics_path, {"step": start, "event": "healed", "ft_step": manager.current_step()})
        else:
            metrics_path.write_text("")
    elif resume:
        start = (_dcp_load(out_dir, model, optimizer, scheduler) if diloco is None else
                 _diloco_load(out_dir, rank, world, model, _ReplicaState(optimizer, outer), scheduler, meta))
        if lead:
            from archc.training.train import _truncate_metrics
            _truncate_metrics(metrics_path, start)
    elif lead:
        metrics_path.write_text("")
    if lead and manager is None or lead and start == 0:
        (out_dir / "config.json").write_text(json.dumps({**meta, "device": "cpu"}, indent=2, default=str) + "\n")

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * (1 if diloco is None else world)

    def evaluate() -> tuple[float, float]:
        windows = data_mod.eval_windows(dataset.val, config.batch_size, config.seq_len,
                                        max_windows=config.eval_batches)
        ctx = outer.swap_in_global() if outer is not None else contextlib.nullcontext()
        with ctx:
            result = perplexity(model, windows)
        return result.loss, result.perplexity

    collective_eval = diloco is None and not data_ft  # FSDP2: every rank takes part in the forward pass
    initial_ppl = None
    if start == 0:
        if collective_eval or lead:
            val0, initial_ppl = evaluate()
            if lead:
                _log(metrics_path, {"step": 0, "val_loss": val0, "val_perplexity": initial_ppl})
    loss_value, val = math.nan, None
    tok_s = 0.0
    total_bytes = 0
    model.train()
    fsdp_bytes = 3 * (world - 1) * n_params * 4 // world if diloco is None and not data_ft else 0
    for step in range(start, config.steps):
        if manager is not None:
            ft.inject(out_dir, rank, step + 1, "before")
        t0 = time.perf_counter()
        bytes_before = outer.stats.bytes_sent if outer else 0
        wait_before = outer.stats.comm_seconds if outer else 0.0
        step_bytes, comm_seconds, retries = 0, 0.0, -1
        while True:  # once, or under torchft data parallel until the quorum commits the step
            retries += 1
            if data_ft:
                comm.begin(None)
                if clock["step"] != step:
                    raise TrainError(f"replica {rank} healed to step {clock['step']} at step {step + 1}; only a "
                                     "group that (re)starts heals")
            total = 0.0
            for micro in range(config.grad_accum):
                index = step * config.grad_accum + micro
                if diloco is None:
                    tokens = batches.get(index)[rank * per_rank:(rank + 1) * per_rank]
                else:
                    tokens = batches.get(index * world + rank)
                loss = model(**{input_name: tokens})["loss"] / config.grad_accum
                loss.backward()
                total += loss.item()
            if diloco is None and not data_ft and world > 1:
                t = torch.tensor([total])
                dist.all_reduce(t)
                total = t.item() / world
            if not math.isfinite(total):
                raise TrainError(f"step {step + 1}: the loss is {total}; stopped before updating")
            if not data_ft:
                break
            total, committed, sent, waited = ft.average_gradients(comm, list(model.parameters()), total)
            step_bytes, comm_seconds = step_bytes + sent, comm_seconds + waited
            if committed:
                break
            optimizer.zero_grad(set_to_none=True)  # the vote failed (a group died mid-step): run it again
        if config.clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        else:
            grad_norm = 0.0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        clock["step"] = step + 1
        if outer is not None:
            outer.after_inner_step(step + 1)
        if clock["step"] != step + 1:  # healed mid-run from a peer at another point of the schedule
            raise TrainError(f"replica {rank} healed at inner step {clock['step']} during its sync after step "
                             f"{step + 1}; replicas must sync at the same inner steps")
        dt = time.perf_counter() - t0
        step_bytes = (outer.stats.bytes_sent - bytes_before) if outer else step_bytes if data_ft else fsdp_bytes
        total_bytes += step_bytes
        loss_value = total
        tok_s = tokens_per_step / dt
        record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_second": tok_s, "seconds": dt, "comm_bytes": step_bytes,
                  "comm_bytes_total": total_bytes}
        if outer is not None:
            record["comm_seconds"] = outer.stats.comm_seconds - wait_before
        if data_ft:
            record.update(comm_seconds=comm_seconds, retries=retries)
        if manager is not None:
            record.update(ft_step=manager.current_step(), participants=manager.num_participants())
        done = step + 1 == config.steps
        if done and outer is not None:
            outer.finish(step + 1)
        if (step + 1) % config.eval_every == 0 or done:
            if collective_eval or lead:
                val = evaluate()
                record.update(val_loss=val[0], val_perplexity=val[1])
        if lead or manager is not None:
            _log(metrics_path, record)
        if manager is not None:
            ft.inject(out_dir, rank, step + 1, "after")
        if manager is None and ((step + 1) % config.checkpoint_every == 0 or done):
            if diloco is None:
                _dcp_save(out_dir, step + 1, model, optimizer, scheduler)
            else:
                _diloco_save(out_dir, rank, step + 1, model, _ReplicaState(optimizer, outer), scheduler, meta,
                             config.keep)
    sample = ""
    if config.sample_tokens and (collective_eval or lead):
        prompt = dataset.tokenizer.encode("\n")
        ctx = outer.swap_in_global() if outer is not None else contextlib.nullcontext()
        with ctx:
            new = generate(model, prompt, config.sample_tokens, temperature=0.8, top_k=40,
                           max_context=compiled.params.get("max_len"), seed=config.seed)[0]
        sample = dataset.tokenizer.decode(new)
        if lead:
            (out_dir / "sample.txt").write_text(sample)
    if manager is not None:
        final = outer.global_state() if outer is not None else {n: p.detach() for n, p in model.named_parameters()}
        _ft_final(out_dir / f"replica_{rank}" / "ft_final.json", manager, final, clock["step"],
                  outer.stats if outer is not None else None)
        if data_ft and lead:
            from archc.training.checkpoint import save_checkpoint
            save_checkpoint(out_dir, config.steps, model, optimizer, scheduler,
                            meta={**meta, "step": config.steps}, keep=config.keep)
    if lead:
        _plot(metrics_path, out_dir / "loss.png")
        if outer is not None:
            (out_dir / "sync_schedule.json").write_text(json.dumps(outer.stats.schedule) + "\n")
    return RunResult(out_dir, config.steps, loss_value, val[0] if val else None, val[1] if val else None,
                     initial_ppl, tok_s, 0.0, sample)


def _ft_final(path: Path, manager, params: dict[str, torch.Tensor], step: int, stats=None) -> None:
    """What a fault-tolerant run ends with on this replica: the tests compare these across replicas."""
    import hashlib

    digest = hashlib.sha256()
    for name, g in sorted(params.items()):
        digest.update(name.encode() + g.numpy().tobytes())
    path.parent.mkdir(parents=True, exist_ok=True)
    sync = {"syncs": stats.syncs, "schedule": stats.schedule} if stats is not None else {}
    path.write_text(json.dumps({"ft_step": manager.current_step(), "step": step, "global_sha256": digest.hexdigest(),
                                **sync}) + "\n")
    manager.shutdown(wait=False)


def _shard(model: torch.nn.Module, compiled, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))  # an explicit CPU mesh (pytorch#132471)
    for scope in layer_scopes(compiled):
        fully_shard(model.get_submodule(scope), mesh=mesh)
    fully_shard(model, mesh=mesh)


# ------------------------------------------------------------------------------ DiLoCo checkpoints
#
# Each replica writes its own checkpoint (training/checkpoint.py: safetensors + JSON, atomic) under
# diloco/replica_r/checkpoints/step_N: its local model, inner optimizer and scheduler, and the DiLoCo state
# (global copies, outer optimizer states, syncs in flight) — identical on every replica, stored with each so
# one directory is a complete, atomically written replica. The data position is the step (batches are a pure
# function of it). Replicas save at the same steps and meet at a barrier; resume takes the newest step
# every replica has.


class _ReplicaState:
    """Inner optimizer + outer DiLoCo state as one optimizer-like object, so they land in one checkpoint."""

    def __init__(self, inner: torch.optim.Optimizer, outer: DiLoCo) -> None:
        self.inner, self.outer = inner, outer

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.outer.load_state_dict(state["outer"])


def _replica_dir(out_dir: Path, rank: int) -> Path:
    return out_dir / "diloco" / f"replica_{rank}"


def _diloco_save(out_dir: Path, rank: int, step: int, model, state: _ReplicaState, scheduler, meta: dict,
                 keep: int) -> None:
    from archc.training.checkpoint import save_checkpoint

    save_checkpoint(_replica_dir(out_dir, rank), step, model, state, scheduler,
                    meta={**meta, "replica": rank}, keep=keep)
    if dist.is_initialized():
        dist.barrier()


def _diloco_load(out_dir: Path, rank: int, world: int, model, state: _ReplicaState, scheduler, meta: dict) -> int:
    from archc.training.checkpoint import load_checkpoint

    steps = None
    for r in range(world):
        found = {int(p.parent.name.removeprefix("step_"))
                 for p in (_replica_dir(out_dir, r) / "checkpoints").glob("step_*/meta.json")}
        steps = found if steps is None else steps & found
    if not steps:
        raise TrainError(f"--resume: no DiLoCo checkpoint saved by all {world} replicas under "
                         f"{out_dir / 'diloco'}; start without --resume (or with the replica count it was saved with)")
    step = max(steps)
    path = _replica_dir(out_dir, rank) / "checkpoints" / f"step_{step:08d}"
    saved = load_checkpoint(path, model, state, scheduler,
                            expect={"spec_sha": meta["spec_sha"], "params": meta["params"], "world": world,
                                    "diloco": meta["diloco"]})
    return int(saved["step"])


# ------------------------------------------------------------------------------ DCP checkpoints


def _dcp_dir(out_dir: Path, step: int) -> Path:
    return out_dir / "dcp" / f"step_{step:08d}"


def _dcp_save(out_dir: Path, step: int, model, optimizer, scheduler) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    path = _dcp_dir(out_dir, step)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    if dist.get_rank() == 0:
        (path / "trainer.json").write_text(json.dumps({"step": step, "scheduler": scheduler.state_dict()}))
    dist.barrier()


def _dcp_load(out_dir: Path, model, optimizer, scheduler) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    found = sorted((out_dir / "dcp").glob("step_*/trainer.json")) if (out_dir / "dcp").exists() else []
    if not found:
        raise TrainError(f"--resume: no DCP checkpoint in {out_dir / 'dcp'}; start without --resume")
    path = found[-1].parent
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    saved = json.loads(found[-1].read_text())
    scheduler.load_state_dict(saved["scheduler"])
    return int(saved["step"])


__all__ = ["train_distributed"]
