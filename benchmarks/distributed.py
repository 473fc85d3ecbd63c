"""Data parallel vs DiLoCo vs Streaming DiLoCo at the same model and token budget (2 gloo processes, CPU).

    python benchmarks/distributed.py [--steps 200] [--out runs/bench_distributed]

Prints final validation loss (of the global parameters, for DiLoCo), bytes sent
per training token (all ranks, ring-algorithm count: see trainer.py), the peak
bytes one rank sends in one step/sync, and wall time. Data parallel is FSDP2
(parameter all-gathers + gradient reduce-scatter every step); DiLoCo is H = 50
with the default outer Nesterov SGD (0.7, 0.9); Streaming DiLoCo is H = 50,
2 strided fragments, overlap τ = 2 (α = 0.5), E3M0 outer gradients. Each run
sees global batch 8 × 64 tokens per step (DiLoCo: 4 per replica).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = dict(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)


def main() -> None:
    from archc.runtime.distributed.diloco import parse_diloco
    from archc.runtime.distributed.trainer import train_distributed
    from archc.runtime.train import TrainConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/bench_distributed")
    parser.add_argument("--spec", default=str(Path(__file__).resolve().parent.parent / "specs" / "llama.arch"))
    args = parser.parse_args()
    runs = [("data-parallel (FSDP2)", 8, None),
            ("DiLoCo H=50", 4, "replicas=2,inner_steps=50"),
            ("Streaming DiLoCo H=50 fp4 tau=2", 4, "replicas=2,inner_steps=50,streaming=2,tau=2,fp4=e3m0")]
    rows = []
    for name, batch, diloco in runs:
        out = Path(args.out) / name.split(" ")[0].lower().replace("-", "_")
        config = TrainConfig(data="pydoc", batch_size=batch, seq_len=64, steps=args.steps, lr=3e-3,
                             eval_every=args.steps, eval_batches=16, checkpoint_every=10 ** 9, sample_tokens=0,
                             progress=False, out_dir=str(out))
        t0 = time.perf_counter()
        result = train_distributed(args.spec, config, MODEL, nproc=2,
                                   diloco=parse_diloco(diloco) if diloco else None)
        seconds = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "comm_bytes" in m]
        tokens = sum(1 for _ in steps) * 8 * 64
        total = 2 * sum(m["comm_bytes"] for m in steps)  # both ranks send the same amount
        rows.append((name, result.val_loss, total / tokens, max(m["comm_bytes"] for m in steps), seconds))
    base_loss, base_bytes = rows[0][1], rows[0][2]
    print(f"{'mode':34s} {'val loss':>9s} {'vs DP':>7s} {'bytes/token':>12s} {'fewer':>7s} "
          f"{'peak B/sync':>12s} {'wall s':>7s}")
    for name, loss, per_token, peak, seconds in rows:
        print(f"{name:34s} {loss:9.4f} {loss / base_loss - 1:+7.1%} {per_token:12.1f} "
              f"{base_bytes / per_token:6.0f}x {peak:12,d} {seconds:7.1f}")


if __name__ == "__main__":
    main()
