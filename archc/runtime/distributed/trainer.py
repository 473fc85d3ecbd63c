"""`archc train --nproc N` (FSDP2 data parallel) and `--diloco ...` (one replica per process), on gloo.

Data parallel (FSDP2): every layer scope of the IR (`layers.{i}`) and then the
whole model are wrapped with `fully_shard` over a 1-D CPU device mesh; each rank
takes its contiguous slice of the same global batch the single-process run
draws (`Batches.get(step)`), so the averaged gradients — and the loss curve —
are those of the single-process run up to float rounding. The logged loss is
the mean over ranks. Checkpoints are written with torch.distributed.checkpoint
(`dcp/step_N/`), so a run saved on N processes can resume on M.

DiLoCo: one process per replica; replica r draws batch `k·R + r` where the
single-process run draws batch `k` (so one replica sees exactly the plain run's
data). Inner optimizer and scheduler are local; the outer step is in diloco.py.
Logged loss is replica 0's inner loss; evaluation uses the global parameters.

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
import time
from pathlib import Path
from typing import Any

import attrs
import torch
import torch.distributed as dist

from archc.runtime.distributed.diloco import DiLoCo, DiLoCoConfig, fragment_params, layer_scopes
from archc.runtime.distributed.launch import init, spawn, under_torchrun
from archc.runtime.train import RunResult, TrainConfig, TrainError, _check_vocab, _log, _plot, prepare


def train_distributed(spec, config: TrainConfig | None = None, overrides: dict[str, Any] | None = None, *,
                      nproc: int = 1, diloco: DiLoCoConfig | None = None, resume: bool = False,
                      **compile_kw) -> RunResult:
    """Train on `nproc` gloo processes (spawned here, or the torchrun group when under torchrun)."""
    config = config or TrainConfig()
    compile_kw.pop("on_stage", None)  # hooks print from every rank; not carried across processes
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


def _worker(rank: int, world: int, spec, config: TrainConfig, overrides, diloco: DiLoCoConfig | None,
            resume: bool, compile_kw: dict) -> RunResult:
    import archc
    from archc.runtime import data as data_mod
    from archc.runtime.evaluate import generate, perplexity
    from archc.runtime.optim import build_optimizer, lr_lambda
    from archc.runtime.weights import fused_layout

    lead = rank == 0
    out_dir = Path(config.out_dir)
    overrides = dict(overrides or {})
    torch.manual_seed(config.seed)
    if config.tokenizer != "byte":
        raise TrainError("distributed training supports --tokenizer byte for now")
    if config.device not in ("auto", "cpu") or config.compile:
        raise TrainError("distributed training runs on the CPU with gloo, without --compile, for now")
    if lead:
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
        _shard(model, compiled, world)  # also on 1 process, so DCP checkpoints reshard between N and M
        if config.optimizer == "muon" and world > 1:
            raise TrainError("Muon on FSDP2-sharded weights is not supported yet; use --optimizer adamw "
                             "or --diloco")
    optimizer = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name=config.optimizer,
                                lr=config.lr, weight_decay=config.weight_decay, muon_lr=config.muon_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, config.steps // 10 if config.warmup is None else config.warmup,
                             config.steps, min_ratio=config.min_lr_ratio))
    if diloco is not None:
        outer = DiLoCo(model, fragment_params(compiled, model, diloco.fragments, diloco.assign), diloco)
    batches = data_mod.Batches(dataset.train, config.batch_size, config.seq_len, config.seed)
    meta = {"spec_sha": compiled.ir.meta["sha256"], "params": compiled.params, "config": attrs.asdict(config),
            "tokenizer": config.tokenizer, "data": config.data, "spec": str(spec), "world": world,
            "mode": "fsdp2" if diloco is None else "diloco",
            "diloco": dataclasses.asdict(diloco) if diloco is not None else None}

    start = 0
    metrics_path = out_dir / "metrics.jsonl"
    if resume:
        if diloco is not None:
            raise TrainError("--resume with --diloco is not supported yet")
        start = _dcp_load(out_dir, model, optimizer, scheduler)
        if lead:
            from archc.runtime.train import _truncate_metrics
            _truncate_metrics(metrics_path, start)
    elif lead:
        metrics_path.write_text("")
    if lead:
        (out_dir / "config.json").write_text(json.dumps({**meta, "device": "cpu"}, indent=2, default=str) + "\n")

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * (1 if diloco is None else world)

    def evaluate() -> tuple[float, float]:
        windows = data_mod.eval_windows(dataset.val, config.batch_size, config.seq_len,
                                        max_windows=config.eval_batches)
        ctx = outer.swap_in_global() if outer is not None else contextlib.nullcontext()
        with ctx:
            result = perplexity(model, windows)
        return result.loss, result.perplexity

    initial_ppl = None
    if start == 0:
        if diloco is None or lead:
            val0, initial_ppl = evaluate()
            if lead:
                _log(metrics_path, {"step": 0, "val_loss": val0, "val_perplexity": initial_ppl})
    loss_value, val = math.nan, None
    tok_s = 0.0
    total_bytes = 0
    model.train()
    fsdp_bytes = 3 * (world - 1) * n_params * 4 // world if diloco is None else 0
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        total = 0.0
        bytes_before = outer.stats.bytes_sent if outer else 0
        wait_before = outer.stats.comm_seconds if outer else 0.0
        for micro in range(config.grad_accum):
            index = step * config.grad_accum + micro
            if diloco is None:
                tokens = batches.get(index)[rank * per_rank:(rank + 1) * per_rank]
            else:
                tokens = batches.get(index * world + rank)
            loss = model(**{input_name: tokens})["loss"] / config.grad_accum
            loss.backward()
            total += loss.item()
        if diloco is None and world > 1:
            t = torch.tensor([total])
            dist.all_reduce(t)
            total = t.item() / world
        if not math.isfinite(total):
            raise TrainError(f"step {step + 1}: the loss is {total}; stopped before updating")
        if config.clip:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            grad_norm = (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()
        else:
            grad_norm = 0.0
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if outer is not None:
            outer.after_inner_step(step + 1)
        dt = time.perf_counter() - t0
        step_bytes = (outer.stats.bytes_sent - bytes_before) if outer else fsdp_bytes
        total_bytes += step_bytes
        loss_value = total
        tok_s = tokens_per_step / dt
        record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_second": tok_s, "seconds": dt, "comm_bytes": step_bytes,
                  "comm_bytes_total": total_bytes}
        if outer is not None:
            record["comm_seconds"] = outer.stats.comm_seconds - wait_before
        done = step + 1 == config.steps
        if done and outer is not None:
            outer.finish(step + 1)
        if (step + 1) % config.eval_every == 0 or done:
            if diloco is None or lead:
                val = evaluate()
                record.update(val_loss=val[0], val_perplexity=val[1])
        if lead:
            _log(metrics_path, record)
        if diloco is None and ((step + 1) % config.checkpoint_every == 0 or done):
            _dcp_save(out_dir, step + 1, model, optimizer, scheduler)
    sample = ""
    if config.sample_tokens and (diloco is None or lead):
        prompt = dataset.tokenizer.encode("\n")
        ctx = outer.swap_in_global() if outer is not None else contextlib.nullcontext()
        with ctx:
            new = generate(model, prompt, config.sample_tokens, temperature=0.8, top_k=40,
                           max_context=compiled.params.get("max_len"), seed=config.seed)[0]
        sample = dataset.tokenizer.decode(new)
        if lead:
            (out_dir / "sample.txt").write_text(sample)
    if lead:
        _plot(metrics_path, out_dir / "loss.png")
        if outer is not None:
            (out_dir / "sync_schedule.json").write_text(json.dumps(outer.stats.schedule) + "\n")
    return RunResult(out_dir, config.steps, loss_value, val[0] if val else None, val[1] if val else None,
                     initial_ppl, tok_s, 0.0, sample)


def _shard(model: torch.nn.Module, compiled, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))  # an explicit CPU mesh (pytorch#132471)
    for scope in layer_scopes(compiled):
        fully_shard(model.get_submodule(scope), mesh=mesh)
    fully_shard(model, mesh=mesh)


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
