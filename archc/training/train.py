"""`archc train`: train a compiled spec on next-token prediction, on one process.

Design choices:
- Batches are a pure function of (seed, step) (data.Batches), and every
  checkpoint stores model, optimizer, scheduler and RNG states, so a resumed
  run continues bit for bit: same batches, same dropout masks, same updates.
- Model FLOPs come from the compiler's analysis (3 × forward matmul FLOPs per
  step), and MFU divides their rate by the matmul peak measured at start-up
  on this machine — not by a datasheet number.
- A loss that is NaN or infinite stops the run before the optimizer step, so
  the last checkpoint on disk is the last good state.
- `metrics.jsonl` gets one line per step (flushed); a resumed run first drops
  the lines after its checkpoint, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import attrs
import torch

from archc.dsl.diagnostics import SpecError, did_you_mean


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
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        names = [f.name for f in attrs.fields(cls)]
        for key in values:
            if key not in names:
                raise TrainError(f"unknown training option `{key}`" + _hint(key, names))
        return cls(**values)

    def __attrs_post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "steps", "grad_accum", "eval_every", "eval_batches",
                     "checkpoint_every", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


def _hint(name: str, choices) -> str:
    hint = did_you_mean(name, choices)
    return f"; {hint}" if hint else ""


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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


def prepare(compiled, config: TrainConfig):
    """Check that a spec can be trained: it returns a `loss` computed from its token input."""
    names = [name for name, _ in compiled.ir.outputs]
    if "loss" not in names:
        raise TrainError(f"{compiled.ir.meta.get('source', 'the spec')} returns no `loss`: end the model with "
                         "`loss = next_token_loss(logits, tokens)` and `return logits, loss`")
    inputs = [n for n in compiled.ir.nodes() if n.op == "input"]
    if len(inputs) != 1 or inputs[0].dtype != "long":
        raise TrainError("archc train needs a model with exactly one Tokens[B, T] input")
    return inputs[0].name


def train(spec, config: TrainConfig | None = None, overrides: dict[str, Any] | None = None,
          resume: bool = False, on_step: Callable[[dict], None] | None = None, **compile_kw) -> RunResult:
    """Compile `spec` and train it; the API behind `archc train`.

    `on_step(record)` sees each step's metrics after its checkpoint (if any) is written.
    """
    import archc
    from archc.training import checkpoint as ckpt
    from archc.training import data as data_mod
    from archc.training.evaluate import generate, perplexity
    from archc.runtime.moe import load_stats, routers, update_expert_biases
    from archc.training.optim import build_optimizer, lr_lambda
    from archc.training.perf import matmul_peak_flops
    from archc.interop.weights import fused_layout

    config = config or TrainConfig()
    out_dir = Path(config.out_dir)
    overrides = dict(overrides or {})
    device = _device(config.device)
    torch.manual_seed(config.seed)

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_file = out_dir / "tokenizer.json" if config.tokenizer.startswith("bpe:") else None
    if resume and tokenizer_file is not None and tokenizer_file.exists():
        tokenizer = str(tokenizer_file)  # the resumed run must tokenize exactly as before
    else:
        tokenizer = config.tokenizer
    compiled = archc.compile(spec, overrides, **compile_kw)
    prepare(compiled, config)  # fail on the spec before spending time on data
    dataset = data_mod.make_dataset(config.data, tokenizer, seed=config.seed,
                                    save_tokenizer=tokenizer_file if tokenizer is config.tokenizer else None)
    vocab_needed = dataset.tokenizer.vocab_size
    if "vocab" in compiled.params and compiled.params["vocab"] < vocab_needed and "vocab" not in overrides:
        compiled = archc.compile(spec, {**overrides, "vocab": vocab_needed}, **compile_kw)
    input_name = prepare(compiled, config)
    _check_vocab(compiled, vocab_needed)

    model = compiled.build(device=device)
    optimizer = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name=config.optimizer,
                                lr=config.lr, weight_decay=config.weight_decay, muon_lr=config.muon_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(config.schedule, config.steps // 10 if config.warmup is None else config.warmup,
                             config.steps, min_ratio=config.min_lr_ratio))
    batches = data_mod.Batches(dataset.train, config.batch_size, config.seq_len, config.seed)
    meta = {"spec_sha": compiled.ir.meta["sha256"], "params": compiled.params, "config": attrs.asdict(config),
            "tokenizer": str(tokenizer_file) if tokenizer_file else config.tokenizer, "data": config.data,
            "spec": str(spec)}

    start = 0
    metrics_path = out_dir / "metrics.jsonl"
    if resume:
        found = ckpt.latest_checkpoint(out_dir)
        if found is None:
            raise TrainError(f"--resume: no checkpoint in {out_dir}; start without --resume")
        saved = ckpt.load_checkpoint(found, model, optimizer, scheduler,
                                     expect={"spec_sha": meta["spec_sha"], "params": meta["params"]})
        start = saved["step"]
        batches.load_state_dict(saved["batches"])
        _truncate_metrics(metrics_path, start)
    else:
        metrics_path.write_text("")
    (out_dir / "config.json").write_text(json.dumps({**meta, "device": str(device)}, indent=2, default=str) + "\n")

    has_moe = bool(routers(model))
    forward = torch.compile(model) if config.compile else model
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if config.dtype == "bfloat16"
                else contextlib.nullcontext())
    peak = matmul_peak_flops(torch.bfloat16 if config.dtype == "bfloat16" else torch.float32, device=device,
                             seconds=0.5)
    step_flops = 3 * compiled.flops(config.batch_size, config.seq_len) * config.grad_accum
    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum

    def evaluate() -> tuple[float, float]:
        windows = data_mod.eval_windows(dataset.val, config.batch_size, config.seq_len,
                                        max_windows=config.eval_batches)
        with autocast:
            result = perplexity(model, windows, device=device)
        return result.loss, result.perplexity

    initial_ppl = None
    if start == 0:
        _val, initial_ppl = evaluate()
        _log(metrics_path, {"step": 0, "val_loss": _val, "val_perplexity": initial_ppl})
    progress = _progress(config, start)
    loss_value, val = math.nan, None
    tok_s = mfu = 0.0
    model.train()
    for step in range(start, config.steps):
        t0 = time.perf_counter()
        total = 0.0
        for micro in range(config.grad_accum):
            tokens = batches.get(step * config.grad_accum + micro).to(device)
            with autocast:
                loss = forward(**{input_name: tokens})["loss"] / config.grad_accum
            loss.backward()
            total += loss.item()
        if not math.isfinite(total):
            optimizer.zero_grad(set_to_none=True)
            raise TrainError(f"step {step + 1}: the loss is {total}; stopped before updating. The last good "
                             f"checkpoint in {out_dir / 'checkpoints'} is untouched — lower --lr or enable --clip")
        grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip).item() if config.clip
                     else _grad_norm(model))
        optimizer.step()
        update_expert_biases(model)  # aux-free MoE balancing acts after the step (a no-op without it)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        loss_value = total
        tok_s = tokens_per_step / dt
        mfu = step_flops / dt / peak
        record = {"step": step + 1, "loss": loss_value, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                  "tokens_per_second": tok_s, "mfu": mfu, "seconds": dt}
        if has_moe:
            record["moe"] = load_stats(model)
        done = step + 1 == config.steps
        if (step + 1) % config.eval_every == 0 or done:
            val = evaluate()
            record.update(val_loss=val[0], val_perplexity=val[1])
        _log(metrics_path, record)
        progress.update(loss_value, tok_s, mfu, val)
        batches_state = {**batches.state_dict()}
        if (step + 1) % config.checkpoint_every == 0 or done:
            ckpt.save_checkpoint(out_dir, step + 1, model, optimizer, scheduler,
                                 meta={**meta, "step": step + 1, "batches": batches_state}, keep=config.keep)
        if on_step is not None:
            on_step(record)
    progress.close()

    sample = ""
    if config.sample_tokens:
        prompt = dataset.tokenizer.encode("\n")
        max_context = compiled.params.get("max_len")
        new = generate(model, prompt, config.sample_tokens, temperature=0.8, top_k=40,
                       max_context=max_context, seed=config.seed, device=device)[0]
        sample = dataset.tokenizer.decode(new)
        (out_dir / "sample.txt").write_text(sample)
    _plot(metrics_path, out_dir / "loss.png")
    return RunResult(out_dir, config.steps, loss_value, val[0] if val else None, val[1] if val else None,
                     initial_ppl, tok_s, mfu, sample)


def _check_vocab(compiled, needed: int) -> None:
    for node in compiled.ir.nodes():
        if node.op == "embedding" and node.attrs["num"] < needed:
            raise TrainError(f"the tokenizer has {needed} tokens but the embedding `{node.path}` has "
                             f"{node.attrs['num']}; set -D vocab={needed}")


def _grad_norm(model) -> float:
    norms = [p.grad.detach().norm() for p in model.parameters() if p.grad is not None]
    return torch.stack(norms).norm().item() if norms else 0.0


def _log(path: Path, record: dict) -> None:
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step`: the resumed run rewrites the rest."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


class _progress:
    """A tqdm bar with loss, tokens/s and MFU (silent when not wanted)."""

    def __init__(self, config: TrainConfig, start: int) -> None:
        self.bar = None
        if config.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def update(self, loss, tok_s, mfu, val) -> None:
        if self.bar is None:
            return
        post = {"loss": f"{loss:.3f}", "tok/s": f"{tok_s:,.0f}", "mfu": f"{mfu:.0%}"}
        if val:
            post["val_ppl"] = f"{val[1]:.2f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _plot(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    train_rows = [r for r in rows if "loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train loss", lw=1)
    ax.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


__all__ = ["RunResult", "SpecError", "TrainConfig", "TrainError", "train"]
