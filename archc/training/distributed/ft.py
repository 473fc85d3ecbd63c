"""Fault-tolerant replica groups on torchft: DiLoCo (`archc train --diloco ... --fault-tolerant`) and plain
data parallelism (`archc train --nproc R --fault-tolerant`).

torchft (github.com/pytorch/torchft) makes a replica group the failure domain: a lighthouse
forms a quorum of live groups for every sync, each group runs a Manager, and a
group that (re)joins behind the others heals by fetching a live peer's state
over HTTP. archc writes only the glue:

- **One process per replica group.** On one machine `supervise` starts a
  lighthouse in this process (`torchft._torchft.LighthouseServer`, min 1
  replica, so the others keep going when one dies), starts R replica
  processes, and restarts one that is killed (up to `max_restarts` times; a
  Python error is reported instead, since a restart would repeat it), the way
  torchelastic or a cluster scheduler would. Across machines every group is
  started on its own (`--lighthouse URL --replica-id I`) and restarts are the
  scheduler's job.
- **Every sync is one Manager step**: `start_quorum()` (use_async_quorum=False,
  as torchft requires for DiLoCo: healing completes before the outer gradient
  is computed), `manager.allreduce` of the outer gradient, `should_commit()`
  before the outer optimizer steps (diloco.py drops a sync whose vote fails).
  The outer gradient is summed with a weight appended (1, or 0 for a group
  that just healed and so holds a copy of its donor's progress), and divided by
  the summed weight: the mean over groups that really trained.
- **The state a joining group receives** (`register`): model (local copy),
  inner optimizer and scheduler, DiLoCo global copies and outer optimizer
  states and the inner step counter, plus which fragment's quorum the donor
  has open. A restarted group asks for a quorum as soon as it starts (`join`);
  once healed it finishes that open sync with the others and continues from
  the donor's inner step, so no step runs twice on the same replica and every
  sync is committed once (the Manager step counts commits).
- **Data parallel** (no --diloco): every step is one Manager step. Each group
  computes gradients on its slice of the global batch, `average_gradients`
  sums them (with the loss and the MoE expert loads) in one flat fp32 buffer
  through `manager.allreduce` — one DDP bucket — and divides by the number of
  groups in the quorum (the loads stay sums: aux-free balancing needs the
  counts over all groups); the
  optimizer steps only if `should_commit()`, else the step is run again in a
  new quorum (no step is lost or counted twice). A group that joins heals to
  its donor's state at the start of the donor's next step (use_async_quorum=
  False applies it before the forward pass) and runs that step with it. While
  a group is down its slice of the batch is not trained on.
- At a fresh start every group waits (up to `join_wait` seconds) until all R
  groups are in the first quorum, so a slow starter does not begin by healing.

FP4 outer gradients are not available here: the Manager's all_reduce averages in
fp32 (its own quantisation is FP8 and needs a GPU).

Failure injection for tests: ARCHC_FT_INJECT='{"kill": [replica, step],
"hold": [replica, step, other]}' SIGKILLs `replica` after inner step `step` in
its first life (when it is about to start the next one), and makes `replica` wait before inner step `step` until
`other` has been restarted and is asking to join (torchft's tests inject
failures and barriers the same way).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from archc.training.config import TrainError
from archc.training.distributed.diloco import DiLoCoConfig, DiLoCoError

INJECT_ENV = "ARCHC_FT_INJECT"
ATTEMPT_ENV = "ARCHC_FT_ATTEMPT"


@dataclass
class FTConfig:
    lighthouse: str | None = None  # http://host:port; None: start one in this process
    replica_id: int | None = None  # run only this replica group here (multi-machine); None: supervise all
    max_restarts: int = 3  # per replica group, when this process supervises them
    heartbeat_timeout_ms: int = 2000  # in-process lighthouse: a group silent this long is out of the quorum
    join_wait: float = 60.0  # seconds a fresh start waits for all groups in its first quorum
    timeout: float = 60.0  # seconds for one collective / commit / state transfer
    connect_timeout: float = 60.0  # seconds to reach the lighthouse before giving up with an error
    quorum_timeout: float = 600.0  # seconds to wait for a quorum (others may be H inner steps away)


def check(config: DiLoCoConfig) -> None:
    """What the fault-tolerant outer step supports: no FP4, and an overlap that ends before the next sync
    starts (so a donor never holds a sync in flight while another group heals from it)."""
    if config.fp4:
        raise DiLoCoError("--fault-tolerant: fp4 is not available (torchft's all_reduce averages in fp32); "
                          "drop fp4=")
    H = config.inner_steps
    offsets = sorted({((p + 1) * H // config.fragments) % H for p in range(config.fragments)})
    gaps = [(b - a) for a, b in zip(offsets, offsets[1:] + [offsets[0] + H])]
    if config.tau and config.tau >= min(gaps):
        raise DiLoCoError(f"--fault-tolerant: tau={config.tau} must be below the {min(gaps)} inner steps "
                          "between two fragment syncs")


# ------------------------------------------------------------------------------------ the Manager


class FTComm:
    """diloco.py's communication seam over a torchft Manager (one per replica group)."""

    def __init__(self, manager) -> None:
        self.manager = manager
        self.open = False  # a quorum is open for the next sync (a joining group's first one)
        self.healed = False  # set by the state loader: this group now holds a copy of its donor
        self.syncing: int | None = None  # the fragment whose quorum is open; travels with the state

    def begin(self, fragment: int | None) -> float:
        self.syncing = fragment
        if not self.open:
            self.manager.start_quorum()
        self.open = False
        weight = 0.0 if self.healed else 1.0
        self.healed = False
        return weight

    def average(self, delta: torch.Tensor, weight: float):
        from torch.distributed import ReduceOp

        buf = torch.cat([delta * weight, torch.tensor([weight])])
        work = self.manager.allreduce(buf, reduce_op=ReduceOp.SUM)
        W = self.manager.num_participants()
        return _Averaged(work, buf), 2 * (W - 1) * buf.numel() * 4 // max(W, 1)

    def commit(self) -> bool:
        self.syncing = None
        return self.manager.should_commit()


def average_gradients(comm: FTComm, params: list[torch.nn.Parameter], loss: float,
                      loads: list[torch.Tensor] = ()) -> tuple[float, bool, int, float]:
    """Data parallel: average this group's gradients and loss over the quorum, sum the expert `loads` (in
    place), and vote on the step.

    Returns (mean loss, committed, bytes sent, seconds spent in the all-reduce and the vote). The averaged
    gradients replace `.grad` (and the summed loads the local ones) only when the step is committed.
    """
    grads = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()) for p in params]
    t0 = time.perf_counter()
    handle, sent = comm.average(torch.cat([*grads, *(load.float() for load in loads), torch.tensor([loss])]), 1.0)
    mean = handle.wait()
    committed = comm.commit()
    seconds = time.perf_counter() - t0
    if committed:
        i = 0
        for p in params:
            p.grad = mean[i:i + p.numel()].view_as(p).clone()
            i += p.numel()
        for load in loads:  # counts are integers: the mean times the groups that sent them is their exact sum
            load.copy_(torch.round(mean[i:i + load.numel()] * handle.total))
            i += load.numel()
    return mean[-1].item(), committed, sent, seconds


class _Averaged:
    def __init__(self, work, buf: torch.Tensor) -> None:
        self.work, self.buf = work, buf

    def wait(self) -> torch.Tensor:
        self.work.wait()  # errors are reported to the Manager; its commit vote then fails
        self.total = self.buf[-1].item()  # the summed weights: the groups that really trained
        return self.buf[:-1] / self.total if self.total > 0 else torch.zeros_like(self.buf[:-1])


def make_manager(replica_id: int, config: FTConfig, lighthouse: str):
    """A Manager for a one-process replica group, with its own TCPStore.

    The other groups reach this store to build the cross-group gloo group, so it is advertised as this
    machine's host name when the groups run on several machines (`replica_id` set), else as 127.0.0.1.
    """
    import socket

    import torch.distributed as dist
    from torchft import Manager, ProcessGroupGloo

    host = socket.gethostname() if config.replica_id is not None else "127.0.0.1"
    store = dist.TCPStore(host_name=host, port=0, is_master=True, wait_for_workers=False)
    manager = Manager(pg=ProcessGroupGloo(timeout=timedelta(seconds=config.timeout)), load_state_dict=None,
                      state_dict=None, min_replica_size=1, use_async_quorum=False,
                      timeout=timedelta(seconds=config.timeout),
                      quorum_timeout=timedelta(seconds=config.quorum_timeout),
                      connect_timeout=timedelta(seconds=config.connect_timeout),
                      rank=0, world_size=1, store_addr=host, store_port=store.port,
                      lighthouse_addr=lighthouse, replica_id=f"replica_{replica_id}", init_sync=False)
    manager._archc_store = store  # keep the store alive as long as the Manager
    return manager


def register(manager, comm: FTComm, clock: dict, model, optimizer, scheduler, outer=None) -> None:
    """What a healing group fetches from a live peer (copies, so the donor may keep training);
    `outer` is None in data parallel."""
    import copy

    def save() -> dict:
        return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "inner": copy.deepcopy(optimizer.state_dict()), "scheduler": scheduler.state_dict(),
                "outer": outer.state_dict() if outer is not None else None, "step": clock["step"],
                "syncing": comm.syncing}

    def load(state: dict) -> None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["inner"])
        scheduler.load_state_dict(state["scheduler"])
        if outer is not None:
            outer.load_state_dict(state["outer"])
        clock["step"] = state["step"]
        comm.syncing = state["syncing"]
        comm.healed = True

    manager.register_state_dict_fn("archc", load, save)


def join(manager, comm: FTComm, outer, clock: dict, replicas: int, join_wait: float) -> bool:
    """The first quorum of this group; returns whether it healed from a peer.

    A fresh job (every group at step 0) waits for all groups, then commits the
    join as step 1. A group that starts behind heals, then finishes the sync
    its donor has open (if any) with the others; in data parallel (`outer` is
    None) it runs the donor's next step with it in the quorum it healed in.
    """
    deadline = time.monotonic() + join_wait
    while True:
        manager.start_quorum()
        if comm.healed or manager.num_participants() >= replicas or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    healed = comm.healed
    if healed and outer is None:
        comm.open, comm.healed = True, False
    elif healed and comm.syncing is not None:
        comm.open = True
        outer.after_inner_step(clock["step"], first=comm.syncing)
    else:
        comm.healed = False
        comm.syncing = None
        manager.should_commit()
    return healed


class ReplicaGroup:
    """This process as one torchft replica group: its Manager, the comm seam the outer step or the gradient
    average goes through, and the inner-step clock that travels with the state a healing peer fetches."""

    def __init__(self, replica: int, replicas: int, config: FTConfig, lighthouse: str) -> None:
        self.replica, self.replicas, self.config, self.lighthouse = replica, replicas, config, lighthouse
        self.clock = {"step": 0}  # inner steps done
        self.manager = self.comm = None

    def connect(self) -> FTComm:
        try:
            self.manager = make_manager(self.replica, self.config, self.lighthouse)
        except RuntimeError as err:  # torchft's only word for an address nothing answers at
            if "failed to connect" not in str(err):
                raise
            reason = str(err).rpartition(": ")[2]
            raise TrainError(f"--lighthouse {self.lighthouse}: no torchft lighthouse answered within "
                             f"{self.config.connect_timeout:g} s ({reason}); start it first (torchft_lighthouse "
                             "--bind [::]:29510 --min_replicas 1) or check the address") from None
        self.comm = FTComm(self.manager)
        return self.comm

    def register(self, out_dir: Path, model, optimizer, scheduler, outer=None) -> None:
        register(self.manager, self.comm, self.clock, model, optimizer, scheduler, outer)
        mark_started(out_dir, self.replica)

    def rejoin(self, metrics, outer=None) -> int | None:
        """Join the first quorum; after healing from a peer, the step to continue from (else None)."""
        if not join(self.manager, self.comm, outer, self.clock, self.replicas, self.config.join_wait):
            return None
        start = self.clock["step"]
        metrics.resume(start)
        metrics.append({"step": start, "event": "healed", "ft_step": self.manager.current_step()})
        return start

    def record(self) -> dict:
        return {"ft_step": self.manager.current_step(), "participants": self.manager.num_participants()}

    def finish(self, out_dir: Path, params: dict[str, torch.Tensor], stats=None) -> None:
        """Write replica_r/ft_final.json (Manager step, step, hash of the final (global) parameters: the tests
        compare them across groups) and leave the quorum."""
        import hashlib

        digest = hashlib.sha256()
        for name, g in sorted(params.items()):
            digest.update(name.encode() + g.numpy().tobytes())
        path = out_dir / f"replica_{self.replica}" / "ft_final.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        sync = {"syncs": stats.syncs, "schedule": stats.schedule} if stats is not None else {}
        path.write_text(json.dumps({"ft_step": self.manager.current_step(), "step": self.clock["step"],
                                    "global_sha256": digest.hexdigest(), **sync}) + "\n")
        self.manager.shutdown(wait=False)


# ------------------------------------------------------------------------------------ failure injection


def attempt() -> int:
    return int(os.environ.get(ATTEMPT_ENV, "0"))


def _marker(out_dir: Path, replica: int, life: int) -> Path:
    return out_dir / ".ft" / f"replica_{replica}.attempt_{life}"


def mark_started(out_dir: Path, replica: int) -> None:
    path = _marker(out_dir, replica, attempt())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))


def inject(out_dir: Path, replica: int, step: int) -> None:
    """Test-only failures from ARCHC_FT_INJECT (see the module docstring) before inner step `step` (1-based);
    a no-op without it."""
    spec = os.environ.get(INJECT_ENV)
    if not spec:
        return
    plan = json.loads(spec)
    if plan.get("kill") == [replica, step - 1] and attempt() == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    hold = plan.get("hold")
    if hold and hold[:2] == [replica, step]:
        deadline = time.monotonic() + 120
        while not _marker(out_dir, hold[2], 1).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"ARCHC_FT_INJECT hold: replica {hold[2]} was not restarted")
            time.sleep(0.05)


# ------------------------------------------------------------------------------------ the supervisor


def quiet() -> None:
    """torchft's Rust side logs every quorum and commit at INFO; keep warnings unless RUST_LOG says otherwise
    (an empty RUST_LOG, as some environments export, counts as unset)."""
    if not os.environ.get("RUST_LOG"):
        os.environ["RUST_LOG"] = "warn"


def start_lighthouse(config: FTConfig):
    from torchft._torchft import LighthouseServer

    return LighthouseServer(bind="127.0.0.1:0", min_replicas=1, heartbeat_timeout_ms=config.heartbeat_timeout_ms)


def _entry(replica: int, life: int, result_file: str, threads: int, fn: Callable, args: tuple) -> None:
    os.environ[ATTEMPT_ENV] = str(life)
    torch.set_num_threads(threads)
    try:
        out = fn(replica, *args)
        if replica == 0:
            Path(result_file).write_bytes(pickle.dumps(("ok", out)))
    except BaseException as err:
        import traceback

        Path(f"{result_file}.{replica}").write_bytes(pickle.dumps(("error", err, traceback.format_exc())))
        raise


def supervise(fn: Callable, replicas: int, config: FTConfig, *args: Any) -> Any:
    """Run fn(replica_id, lighthouse_url, *args) in one process per replica group, restarting a group that
    is killed (dies without a Python error) up to config.max_restarts times; returns replica 0's result."""
    quiet()
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // replicas)
    lighthouse = start_lighthouse(config) if config.lighthouse is None else None
    url = config.lighthouse or lighthouse.address()
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pkl")

        def start(replica: int, life: int):
            proc = ctx.Process(target=_entry, args=(replica, life, result_file, threads, fn, (url, *args)),
                               name=f"archc-replica-{replica}")
            proc.start()
            return proc

        procs = {r: start(r, 0) for r in range(replicas)}
        lives = {r: 0 for r in range(replicas)}
        try:
            while procs:
                for r, proc in list(procs.items()):
                    proc.join(timeout=0.1)
                    if proc.exitcode is None:
                        continue
                    del procs[r]
                    if proc.exitcode == 0:
                        continue
                    failed = Path(f"{result_file}.{r}")
                    if failed.exists():  # a Python error (bad option, timeout): restarting would repeat it
                        raise pickle.loads(failed.read_bytes())[1]
                    if lives[r] >= config.max_restarts:
                        raise RuntimeError(f"replica group {r} died (exit code {proc.exitcode}) "
                                           f"{lives[r] + 1} times; gave up")
                    lives[r] += 1
                    procs[r] = start(r, lives[r])
        finally:
            for proc in procs.values():
                proc.kill()
                proc.join()
            if lighthouse is not None:
                lighthouse.shutdown()
        return pickle.loads(Path(result_file).read_bytes())[1]


__all__ = ["FTComm", "FTConfig", "ReplicaGroup", "average_gradients", "check", "join", "make_manager", "quiet",
           "register", "supervise"]
