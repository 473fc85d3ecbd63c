"""Baseline vs hyper-connections vs mHC vs Engram memory, at equal steps on the built-in text.

The sweep the alternative-paths post invites: the same small Llama four ways — plain
(specs/llama.arch), its residual stream widened to 4 lanes with dynamic hyper-connections or with
mHC's Sinkhorn-projected mixing (specs/mhc.arch, `-D lane_rule=...`), and with Engram memory at
layers 1 and 3 (specs/engram.arch) — each trained for the same steps on the same batches from
three seeds, so the table shows the noise next to the differences. Run:

    .venv/bin/python examples/lanes_sweep.py    # 4 minutes on two quiet CPU cores, ~20 busy (README: its table)

Validation loss is the mean next-token cross-entropy (nats per byte) on held-out text after the
last step; wall time is the whole run (compile, train, evaluate) on this machine, on one thread.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import attrs
import torch

import archc
from archc.training.train import TrainConfig, train

SPECS = Path(__file__).resolve().parent.parent / "specs"
BASE = dict(n_layers=4, d_model=32, n_heads=2, n_kv_heads=1, d_ff=96)
VARIANTS = {  # name -> (spec, its own parameters)
    "baseline": ("llama.arch", {}),
    "HC (4 lanes, dynamic)": ("mhc.arch", {"lane_rule": "hc_dynamic", "n_lanes": 4}),
    "mHC (4 lanes)": ("mhc.arch", {"lane_rule": "mhc", "n_lanes": 4}),
    "+Engram (layers 1, 3)": ("engram.arch", {"memory_heads": 4, "memory_slots": 1009, "memory_dim": 32}),
}


def main(steps: int = 400, seeds: tuple[int, ...] = (0, 1, 2), out: str = "runs/lanes_sweep",
         base: dict | None = None, batch_size: int = 8, seq_len: int = 32, threads: int | None = 1,
         data: str = "pydoc") -> list[dict]:
    if threads is not None:  # on a shared two-core machine, intra-op threads fight the other processes: 10x slower
        torch.set_num_threads(threads)
    base = dict(BASE if base is None else base)
    config = TrainConfig(data=data, steps=steps, batch_size=batch_size, seq_len=seq_len, eval_every=steps,
                         eval_batches=8, checkpoint_every=steps, sample_tokens=0, progress=False)
    rows = []
    for name, (spec, own) in VARIANTS.items():
        overrides = {**base, **own}
        compiled = archc.compile(SPECS / spec, overrides)
        losses, seconds = [], []
        for seed in seeds:
            run = attrs.evolve(config, seed=seed, out_dir=f"{out}/{name.split()[0].lower()}-{seed}")
            start = time.perf_counter()
            result = train(SPECS / spec, run, overrides, overwrite=True)
            seconds.append(time.perf_counter() - start)
            losses.append(result.val_loss)
        rows.append({"name": name, "params": compiled.num_params(), "active": compiled.active_params(),
                     "val_loss": losses, "seconds": seconds})
        print(_line(rows[-1]), flush=True)
    print(f"\n{len(seeds)} seeds x {steps} steps of {batch_size}x{seq_len} bytes; {_settings(base)}")
    print(_table(rows))
    return rows


def _settings(base: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in base.items())


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _line(row: dict) -> str:
    mean, std = _stats(row["val_loss"])
    return f"{row['name']:24s} val loss {mean:.4f} ± {std:.4f}  ({sum(row['seconds']):.0f} s)"


def _table(rows: list[dict]) -> str:
    """A Markdown table: parameters, validation loss (mean ± std, then per seed) and wall time per run."""
    lines = ["| variant | params (active per token) | val loss, mean ± std | per seed | wall s per run |",
             "|---|---|---|---|---|"]
    for row in rows:
        mean, std = _stats(row["val_loss"])
        per_seed = ", ".join(f"{v:.4f}" for v in row["val_loss"])
        params = f"{row['params']:,}" + (f" ({row['active']:,})" if row["active"] != row["params"] else "")
        lines.append(f"| {row['name']} | {params} | {mean:.4f} ± {std:.4f} | {per_seed} | "
                     f"{statistics.fmean(row['seconds']):.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
