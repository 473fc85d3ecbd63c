"""Starting the processes of a distributed run, each running the one training loop with its strategy.

`run(...)` checks the options of a mode, claims the run directory once for the whole run (run_dir.py: in
this process, or in torchrun's rank 0, or per replica group when groups are started on their own), and
starts the processes: `spawn(fn, nproc, *args)` runs `fn(rank, world, *args)` in `nproc` processes
(torch.multiprocessing, spawn start method) after `init_process_group("gloo")` on 127.0.0.1 with a free
port, rank 0's return value coming back through a file; under torchrun (RANK / WORLD_SIZE / MASTER_ADDR in
the environment) `init()` uses its env:// rendezvous instead and nothing is spawned; fault-tolerant replica
groups are started and restarted by ft.supervise.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from archc.training.config import RunResult, TrainConfig, TrainError
from archc.training.run_dir import claim


def under_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int | None = None, world: int | None = None, port: int | None = None) -> tuple[int, int]:
    """Join (or create) the default gloo process group; returns (rank, world)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if rank is None:  # torchrun
        dist.init_process_group("gloo", init_method="env://")
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size()


def _entry(rank: int, world: int, port: int, result_file: str, threads: int, fn: Callable, args: tuple) -> None:
    torch.set_num_threads(threads)
    init(rank, world, port)
    try:
        out = fn(rank, world, *args)
        # Every rank is done with its collectives before any tears the group down: a rank that destroyed
        # its gloo group while a peer's last message was still in flight aborted ("terminate called").
        dist.barrier()
        if rank == 0:
            Path(result_file).write_bytes(pickle.dumps(("ok", out)))
    except BaseException as err:
        if rank == 0 or not Path(result_file).exists():
            Path(result_file + f".{rank}").write_bytes(pickle.dumps(("error", err, traceback.format_exc())))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, *args: Any, threads: int | None = None) -> Any:
    """Run fn(rank, world, *args) on nproc gloo processes; returns rank 0's result.

    `fn` must be importable (module level) since processes are started with `spawn`.
    """
    import torch.multiprocessing as mp

    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pkl")
        try:
            mp.start_processes(_entry, args=(nproc, free_port(), result_file, threads, fn, args), nprocs=nproc,
                               join=True, start_method="spawn")
        except mp.ProcessRaisedException as err:
            for r in range(nproc):
                f = Path(result_file + f".{r}")
                if f.exists():
                    _, original, _tb = pickle.loads(f.read_bytes())
                    raise original from err
            raise
        return pickle.loads(Path(result_file).read_bytes())[1]


# ------------------------------------------------------------------------------------------ a distributed run


def run(spec, config: TrainConfig, overrides: dict | None, *, nproc: int | None, diloco, fault_tolerant,
        resume: bool, overwrite: bool, compile_kw: dict) -> RunResult | None:
    """Train on `nproc` gloo processes (spawned here, or the torchrun group when under torchrun), on DiLoCo
    replicas, or on torchft replica groups; returns rank 0's result (None in other torchrun ranks and in
    replica groups other than 0 started on their own)."""
    compile_kw = {k: v for k, v in compile_kw.items() if k != "on_stage"}  # hooks would print from every rank
    args = (spec, config, overrides, diloco, compile_kw)
    out_dir = Path(config.out_dir)
    if fault_tolerant is not None:
        return _run_ft(nproc, fault_tolerant, resume, overwrite, *args)
    if under_torchrun():
        lead = os.environ["RANK"] == "0"
        with claim(out_dir, resume=resume, overwrite=overwrite) if lead else contextlib.nullcontext():
            rank, world = init()
            try:
                if diloco is not None and world != diloco.replicas:
                    raise TrainError(f"--diloco replicas={diloco.replicas} but torchrun started {world} processes; "
                                     "start one process per replica")
                _check_split(config, world, diloco)
                result = _worker(rank, world, resume, *args)
            finally:
                dist.destroy_process_group()
        return result if rank == 0 else None
    nproc = diloco.replicas if diloco is not None else nproc or 1
    if nproc < 1:
        raise TrainError("--nproc must be at least 1")
    _check_split(config, nproc, diloco)
    with claim(out_dir, resume=resume, overwrite=overwrite):
        return spawn(_worker, nproc, resume, *args)


def _check_split(config: TrainConfig, world: int, diloco, what: str = "") -> None:
    if diloco is None and config.batch_size % world:
        raise TrainError(f"--batch-size {config.batch_size} does not split over --nproc {world}{what}; "
                         f"use a multiple of the {'group' if what else 'process'} count")


def _worker(rank: int, world: int, resume: bool, spec, config, overrides, diloco, compile_kw) -> RunResult:
    from archc.training.distributed.strategies import FSDP2, DiLoCoReplica
    from archc.training.trainer import Trainer

    strategy = DiLoCoReplica(rank, world, diloco) if diloco is not None else FSDP2(rank, world)
    return Trainer(spec, config, strategy, overrides, resume=resume, compile_kw=compile_kw).run()


def _run_ft(nproc, ft_config, resume: bool, overwrite: bool, spec, config, overrides, diloco, compile_kw):
    from archc.training.distributed import ft

    replicas = diloco.replicas if diloco is not None else nproc or 1
    if replicas < 1:
        raise TrainError("--nproc must be at least 1")
    _check_split(config, replicas, diloco, " replica groups")
    if resume and ft_config.replica_id is None:
        raise TrainError("--fault-tolerant restarts a dead replica group itself, which heals from a live peer; "
                         "--resume is only for a group started on its own (--replica-id) and restarted by its "
                         "scheduler")
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
    args = (replicas, spec, config, overrides, diloco, ft_config, compile_kw)
    out_dir = Path(config.out_dir)
    replica = ft_config.replica_id
    if replica is None:
        with claim(out_dir, resume=False, overwrite=overwrite):
            return ft.supervise(_ft_worker, replicas, ft_config, *args)
    if ft_config.lighthouse is None:
        raise TrainError("--replica-id needs --lighthouse URL (the lighthouse all replica groups share)")
    if not 0 <= replica < replicas:
        raise TrainError(f"--replica-id {replica}: must be in [0, {replicas})")
    ft.quiet()
    # a group started on its own owns OUT (group 0) or OUT/replica_I: groups may share one directory.
    # --resume lets a restarted group back into it; it heals from a live peer (it keeps no checkpoints)
    with claim(out_dir / f"replica_{replica}" if replica else out_dir, resume=resume, overwrite=overwrite):
        result = _ft_worker(replica, ft_config.lighthouse, *args)
    return result if replica == 0 else None


def _ft_worker(replica: int, lighthouse: str, replicas: int, spec, config, overrides, diloco, ft_config,
               compile_kw) -> RunResult:
    from archc.training.distributed import ft
    from archc.training.distributed.strategies import FaultTolerantDataParallel, FaultTolerantDiLoCo
    from archc.training.trainer import Trainer

    group = ft.ReplicaGroup(replica, replicas, ft_config, lighthouse)
    strategy = FaultTolerantDiLoCo(group, diloco) if diloco is not None else FaultTolerantDataParallel(group)
    return Trainer(spec, config, strategy, overrides, compile_kw=compile_kw).run()
