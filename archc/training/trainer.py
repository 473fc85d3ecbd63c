"""The training loop, one for every mode: `Trainer` (setup / train_step / evaluate / save / load / finish).

Design choices:
- The objective is the spec's: the loop minimises what the generated module returns under `loss`, on the
  batches a data source hands out by index (sources.py). Nothing here knows it is training on text.
- Batches are a pure function of (seed, index), and every checkpoint stores model, optimizer and scheduler
  states (and, on one process, RNG states), so a resumed run continues bit for bit.
- What differs between one process, FSDP2, DiLoCo and the fault-tolerant modes is the strategy's
  (strategy.py): the batch slice, the reduction after backward, the outer step, the checkpoint format.
  Everything else runs in every mode, in particular the MoE hooks: after each optimizer step every
  aux-free router's bias moves toward the mean expert load, with the loads summed over data-parallel ranks
  by the strategy (so N processes balance exactly as one), and router statistics are logged.
- `--init-from DIR` starts from a Hugging Face checkpoint: its config.json supplies the spec parameters -D
  does not set, and its weights are loaded (interop.hf.load_hf_into) right after the model is built, before
  the strategy shards it and the optimizer is made, so every mode starts from them. A resumed run takes its
  weights from its own checkpoint instead.
- Before the data is read or anything allocated, the run's memory (weights, gradients, optimizer state,
  activations: memory.py) is compared with what this machine has free, and refused if it cannot fit.
- A loss that is NaN or infinite stops the run before the optimizer step, so the last checkpoint on disk
  is the last good state.
- Model FLOPs come from the compiler's analysis (3 × forward matmul FLOPs per step); MFU divides their rate
  by the matmul peak measured at start-up on this machine, not by a datasheet number.
- `metrics.jsonl` gets one line per step (run_dir.MetricsLog); a resumed run first drops the lines after
  its checkpoint, atomically, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch

from archc.runtime.moe import load_stats, routers, update_expert_biases
from archc.training.checkpoint import remove_leftovers
from archc.training.classify_source import ImageClassSource
from archc.training.config import RunResult, TrainConfig, TrainError, check_resumable
from archc.training.image_source import ImageSource, write_grid
from archc.training.masked_source import MaskedTextSource
from archc.training.memory import check_training_memory
from archc.training.run_dir import MetricsLog, write_atomic
from archc.training.sources import TextSource, source_kind
from archc.training.strategy import Strategy


class Trainer:
    """Train a spec with one strategy; `run()` is setup, the steps, and finish."""

    def __init__(self, spec, config: TrainConfig, strategy: Strategy, overrides: dict[str, Any] | None = None, *,
                 resume: bool = False, on_step: Callable[[dict], None] | None = None,
                 compile_kw: dict | None = None, prepare: Callable[[Any, torch.nn.Module], None] | None = None) -> None:
        self.spec, self.config, self.strategy = spec, config, strategy
        self.prepare = prepare  # (compiled, model) -> None: after the model is built, before the optimizer sees it
        self.overrides, self.compile_kw = dict(overrides or {}), dict(compile_kw or {})
        self.resume, self.on_step = resume, on_step
        self.out_dir = Path(config.out_dir)
        self.val: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Compile, load the data, build the model, optimizer and scheduler, and let the strategy attach."""
        import archc
        from archc.interop.weights import fused_layout
        from archc.training.optim import build_optimizer, lr_lambda

        cfg, s = self.config, self.strategy
        s.check(cfg)
        self.device = s.device(cfg)
        torch.manual_seed(cfg.seed)
        if cfg.init_from is not None:  # the checkpoint's config.json sets the spec parameters -D does not
            self.overrides = {**_init_overrides(self.spec, cfg), **self.overrides}

        def compile_with(overrides: dict):
            compiled = archc.compile(self.spec, overrides, **self.compile_kw)
            if "loss" not in [name for name, _ in compiled.ir.outputs]:
                raise TrainError(f"{compiled.ir.meta.get('source', 'the spec')} returns no `loss`: end the model "
                                 "with `loss = next_token_loss(logits, tokens)` and `return logits, loss`")
            source_kind(compiled)  # a spec no source can feed is refused by name before any estimate
            if cfg.memory_check:  # before the data is read and anything is allocated
                check_training_memory(compiled, cfg, self.device, **s.memory(cfg))
            return compiled

        tokenizer_file = self.out_dir / "tokenizer.json" if cfg.tokenizer.startswith("bpe:") else None
        first = compile_with(self.overrides)
        kind = source_kind(first)
        if kind in ("diffusion", "classify"):  # image data
            tokenizer_file = None
            opened = ImageSource if kind == "diffusion" else ImageClassSource
            self.compiled, self.source = first, opened.open(cfg, first)
        else:
            def compile_text(overrides: dict):
                return first if overrides == self.overrides else compile_with(overrides)

            opened = MaskedTextSource if kind == "masked" else TextSource
            self.compiled, self.source = opened.open(cfg, compile_text, self.overrides, tokenizer_file, self.resume)
        self.model = self.compiled.build(device=self.device, check_memory=cfg.memory_check)
        if cfg.init_from is not None and not self.resume:  # a resumed run takes its weights from its checkpoint
            from archc.interop.hf import load_hf_into

            load_hf_into(self.compiled, self.model, cfg.init_from, cfg.init_map)
        if self.prepare is not None:  # weights from an earlier stage (stages.py), loaded and frozen
            self.prepare(self.compiled, self.model)
        _compress_memory_ids(self.model, self.source)
        if cfg.memory_device is not None:
            _keep_memory_on(self.model, cfg.memory_device, self.device, s.mode)
        s.shard(self.model, self.compiled)
        self.optimizer = build_optimizer(self.model, self.compiled.param_roles(), fused_layout(self.compiled),
                                         name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                         muon_lr=cfg.muon_lr)
        warmup = cfg.steps // 10 if cfg.warmup is None else cfg.warmup
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(cfg.schedule, warmup, cfg.steps, min_ratio=cfg.min_lr_ratio))
        s.attach(self)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                         else contextlib.nullcontext())
        self.loads = [r.load for _name, r in routers(self.model) if r.balance == "aux_free"]
        self.has_moe = bool(routers(self.model))
        self.meta = {"spec_sha": self.compiled.ir.meta["sha256"], "params": self.compiled.params,
                     "config": attrs.asdict(cfg), "tokenizer": str(tokenizer_file) if tokenizer_file else cfg.tokenizer,
                     "data": cfg.data, "spec": str(self.spec), "mode": s.mode, "world": s.world, **s.meta()}
        self.metrics = MetricsLog(s.metrics_path(self.out_dir))
        for run_dir in s.leftovers(self.out_dir):
            remove_leftovers(run_dir)
        self.peak = s.peak_flops(cfg, self.device)
        self.step_flops = 3 * self.compiled.flops(cfg.batch_size, cfg.seq_len) * cfg.grad_accum

    def checkpoint_meta(self, step: int) -> dict:
        return {**self.meta, "step": step, "batches": self.source.state_dict()}

    def resume_expect(self) -> dict:
        """What a checkpoint must match to be resumed: the spec, its parameters, and the mode's own keys."""
        return {"spec_sha": self.meta["spec_sha"], "params": self.meta["params"],
                **{key: self.meta[key] for key in self.strategy.meta()}}

    # ------------------------------------------------------------------------------------------- a step

    def train_step(self, step: int) -> dict:
        """Run (0-based) step `step`; returns its metrics line."""
        cfg, s = self.config, self.strategy
        t0 = time.perf_counter()
        while True:  # once, unless a fault-tolerant quorum fails to commit the step
            s.begin_attempt(step)
            for load in self.loads:
                load.zero_()
            loss = 0.0
            for micro in range(cfg.grad_accum):
                batch = s.batch(self.source, step * cfg.grad_accum + micro)
                with self.autocast:
                    out = self.forward(**{k: v.to(self.device) for k, v in batch.items()})["loss"] / cfg.grad_accum
                out.backward()
                loss += out.item()
            loss, committed = s.synchronize(loss, self.loads)
            if committed:
                break
            self.optimizer.zero_grad(set_to_none=True)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainError(f"step {step + 1}: the loss is {loss}; stopped before updating. The last good "
                             f"checkpoint in {self.out_dir} is untouched; lower --lr or enable --clip")
        grad_norm = _grad_norm([p for p in self.model.parameters() if p.grad is not None], cfg.clip)
        self.optimizer.step()
        update_expert_biases(self.model)  # aux-free MoE balancing on the summed loads (a no-op without it)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.after_step(self, step + 1, step + 1 == cfg.steps)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        record = {"step": step + 1, "loss": loss, "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_second": self.source.items_per_batch * cfg.grad_accum * s.batches_per_step / dt}
        if self.peak:
            record["mfu"] = self.step_flops / dt / self.peak
        record["seconds"] = dt
        if self.has_moe:
            record["moe"] = load_stats(self.model)  # this process's rows
        return {**record, **s.record()}

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """The source's validation metrics; an image source's sample grid is written as samples/step_N.png (a
        caption spec draws its grid of prompts once, at the end: see ImageSource.sample)."""
        with self.strategy.eval_context(), self.autocast:
            self.val = self.source.evaluate(self.model, self.device)
        if step is not None and self.strategy.lead and isinstance(self.source, ImageSource) \
                and self.source.grid is not None:
            write_grid(self.source.grid, self.out_dir / "samples" / f"step_{step}.png")
        return self.val

    def save(self, step: int) -> None:
        self.strategy.save(self, step)

    def load(self) -> int:
        """Restore the newest checkpoint of this run (refusing changed options); returns its step."""
        saved = self.strategy.load(self)
        check_resumable(saved.get("config") or {}, self.config, self.out_dir)
        if "batches" in saved:
            self.source.load_state_dict(saved["batches"])
        return int(saved["step"])

    # ------------------------------------------------------------------------------------------- the run

    def run(self) -> RunResult:
        self.setup()
        cfg, s = self.config, self.strategy
        start = s.rejoin(self)
        if start is None:
            start = self.load() if self.resume else 0
            if start > cfg.steps:
                raise TrainError(f"--resume: the newest checkpoint in {self.out_dir} is at step {start}, beyond "
                                 f"--steps {cfg.steps}; pass --steps above {start} to train further")
            if s.logs and self.resume:
                self.metrics.resume(start)
            elif s.logs:
                self.metrics.fresh()
            if s.lead:
                write_atomic(self.out_dir / "config.json",
                             json.dumps({**self.meta, "device": str(self.device)}, indent=2, default=str) + "\n")
        initial = None
        if start == 0 and s.evaluates:
            initial = self.evaluate(0).get("val_perplexity")
            if s.logs:
                self.metrics.append({"step": 0, **self.val})
        progress = _Progress(cfg, start, enabled=cfg.progress and s.lead)
        record: dict = {}
        self.model.train()
        for step in range(start, cfg.steps):
            s.before_step(self, step)
            record = self.train_step(step)
            done = step + 1 == cfg.steps
            if s.evaluates and ((step + 1) % cfg.eval_every == 0 or done):
                record.update(self.evaluate(step + 1))
            if s.logs:
                self.metrics.append(record)
            progress.update(record)
            if (step + 1) % cfg.checkpoint_every == 0 or done:
                self.save(step + 1)
            if self.on_step is not None:
                self.on_step(record)
        progress.close()
        if not record and s.logs:  # resumed at the last step (killed while finishing): report what it logged
            record = next((r for r in reversed(self.metrics.records()) if "loss" in r), {})
        if not self.val and s.evaluates:
            self.evaluate()
        return self.finish(record, initial)

    def finish(self, last: dict, initial: float | None) -> RunResult:
        """The sample, the mode's last words (final checkpoints, fault-tolerance summaries), the plot."""
        s = self.strategy
        sample = ""
        if s.evaluates:
            with s.eval_context():
                sample = self.source.sample(self.model, self.device, self.config.seed)
        if s.lead and isinstance(self.source, ImageSource) and self.source.grid is not None:
            write_grid(self.source.grid, self.out_dir / "samples.png")
        elif s.lead and self.config.sample_tokens:
            write_atomic(self.out_dir / "sample.txt", sample)
        s.finish(self)
        if s.lead:
            _plot(self.metrics.records(), self.out_dir / "loss.png")
        return RunResult(self.out_dir, self.config.steps, last.get("loss", math.nan), self.val.get("val_loss"),
                         self.val.get("val_perplexity"), initial, last.get("tokens_per_second", 0.0),
                         last.get("mfu", 0.0), sample)


def _init_overrides(spec, config: TrainConfig) -> dict[str, Any]:
    """The spec parameters --init-from's config.json gives (through --init-map, or its model_type's map)."""
    from archc.interop.hf import hf_overrides, read_config

    return hf_overrides(config.init_map, read_config(config.init_from), spec)


def _compress_memory_ids(model: torch.nn.Module, source) -> None:
    """`engram(..., compress=true)`: hash through the tokenizer's compression map (ids whose text differs only
    in case, accents or spacing share one; archc.runtime.engram.compression_table). Ids past the tokenizer's
    vocabulary (an embedding larger than it) keep ids of their own. A checkpoint carries the map."""
    from archc.runtime.engram import Engram, compression_table

    memories = [m for m in model.modules() if isinstance(m, Engram) and m.compress]
    if not memories:
        return
    tokenizer = getattr(getattr(source, "dataset", None), "tokenizer", None)
    if tokenizer is None:
        raise TrainError("engram(..., compress=true) hashes through a tokenizer's compression map; this run has "
                         "no tokenizer (train it on text, or drop compress=true)")
    table, count = compression_table(tokenizer.decode, tokenizer.vocab_size)
    for m in memories:
        if m.vocab_size < tokenizer.vocab_size:
            raise TrainError(f"engram(..., vocab={m.vocab_size}) is smaller than the tokenizer's "
                             f"{tokenizer.vocab_size} ids; give it the model's vocabulary")
        unused = torch.arange(count, count + m.vocab_size - tokenizer.vocab_size)
        m.use_compression(torch.cat((table, unused)).to(m.compression.device))


def _keep_memory_on(model: torch.nn.Module, where: str, device: torch.device, mode: str) -> None:
    """--memory-device: the Engram tables stay on `where` (host memory), their rows gathered when the model is
    called (archc.runtime.engram.keep_memory_on)."""
    from archc.runtime.engram import Engram, keep_memory_on

    if not any(isinstance(m, Engram) for m in model.modules()):
        raise TrainError(f"--memory-device {where}: the spec has no Engram memory (`engram(...)`) to place")
    if mode != "single":
        raise TrainError(f"--memory-device {where} trains on one process only (this run is {mode}): memory tables "
                         "update row by row and are not sharded")
    keep_memory_on(model, where, device)


def _grad_norm(params: list[torch.nn.Parameter], clip: float) -> float:
    """The global gradient norm (before clipping to `clip`, if set); whole even when the gradients are sharded."""
    if not params:
        return 0.0
    if clip:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).item()


class _Progress:
    """A tqdm bar with loss, tokens/s, MFU and validation perplexity (silent when not wanted)."""

    def __init__(self, config: TrainConfig, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, record: dict) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{record['loss']:.3f}", "tok/s": f"{record['tokens_per_second']:,.0f}"}
        if "mfu" in record:
            post["mfu"] = f"{record['mfu']:.0%}"
        if "val_perplexity" in record:
            post["val_ppl"] = f"{record['val_perplexity']:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", lw=1)
    ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)  # replaces a link at `png` rather than writing through it
