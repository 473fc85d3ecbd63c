"""Data parallel vs DiLoCo vs Streaming DiLoCo at the same model and token budget (2 gloo processes, CPU).

    python benchmarks/distributed.py [--steps 600] [--outer 0.8,0.3] [--out runs/bench_distributed]

Prints final validation loss (of the global parameters, for DiLoCo), bytes sent
per training token (all ranks, ring-algorithm count: see trainer.py), the peak
bytes one rank sends in one step/sync, and wall time; then the issue's goals
(DiLoCo within 3% of data-parallel loss with >= 50x fewer bytes; Streaming
DiLoCo's peak bytes per sync about 1/fragments of DiLoCo's) as measured.

Data parallel is FSDP2 (parameter all-gathers + gradient reduce-scatter every
step). DiLoCo is H = 50, once with the paper's outer Nesterov SGD (lr 0.7,
momentum 0.9) and once with `--outer LR,MOMENTUM` (default 0.8, 0.3: the best
of a small sweep on this model, see below); Streaming DiLoCo is H = 50, 2
strided fragments, overlap tau = 2 (alpha = 0.5), E3M0 outer gradients, with
the `--outer` setting. Every run sees global batch 8 x 64 tokens per step
(DiLoCo: 4 per replica), the same inner AdamW (lr 3e-3, cosine, 10% warmup).

Why two outer settings: the paper's 0.7 / 0.9 was tuned for hundreds of outer
steps (H = 500 over ~64k steps from a pretrained model); here the run has
steps / 50 outer steps from scratch, and the momentum's amplification
(lr / (1 - momentum) = 7) overshoots. 0.8 / 0.3 was the best of a sweep at 600
steps over (lr, momentum) in (0.7, 0.9), (0.7, 0.5), (0.8, 0.3), (0.9, 0.2),
(1, 0.5), (1, 0) (= parameter averaging), (1.3, 0), and inner lr 2e-3 / 5e-3;
rerun with `--outer` to check another.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

MODEL = dict(n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128)


def main() -> None:
    from archc.training.distributed.diloco import parse_diloco
    from archc.training.train import TrainConfig, train

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--outer", default="0.8,0.3", help="outer lr,momentum of the tuned DiLoCo runs")
    parser.add_argument("--out", default="runs/bench_distributed")
    parser.add_argument("--spec", default=str(Path(__file__).resolve().parent.parent / "specs" / "llama.arch"))
    args = parser.parse_args()
    lr, momentum = (float(x) for x in args.outer.split(","))
    tuned = f"outer_lr={lr},outer_momentum={momentum}"
    runs = [("data-parallel (FSDP2)", "dp", 8, None),
            ("DiLoCo H=50 outer 0.7/0.9", "diloco_paper", 4, "replicas=2,inner_steps=50"),
            (f"DiLoCo H=50 outer {lr:g}/{momentum:g}", "diloco", 4, f"replicas=2,inner_steps=50,{tuned}"),
            (f"Streaming H=50 fp4 tau=2 {lr:g}/{momentum:g}", "streaming", 4,
             f"replicas=2,inner_steps=50,streaming=2,tau=2,fp4=e3m0,{tuned}")]
    rows = {}
    for name, key, batch, diloco in runs:
        out = Path(args.out) / key
        config = TrainConfig(data="pydoc", batch_size=batch, seq_len=64, steps=args.steps, lr=3e-3,
                             eval_every=args.steps, eval_batches=16, checkpoint_every=10 ** 9, sample_tokens=0,
                             progress=False, out_dir=str(out))
        t0 = time.perf_counter()
        result = train(args.spec, config, MODEL, nproc=2, overwrite=True,
                       diloco=parse_diloco(diloco) if diloco else None)
        seconds = time.perf_counter() - t0
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "comm_bytes" in m]
        tokens = len(steps) * 8 * 64
        total = 2 * sum(m["comm_bytes"] for m in steps)  # both ranks send the same amount
        rows[key] = (name, result.val_loss, total / tokens, max(m["comm_bytes"] for m in steps), seconds)
    base_loss, base_bytes = rows["dp"][1], rows["dp"][2]
    print(f"{'mode':38s} {'val loss':>9s} {'vs DP':>7s} {'bytes/token':>12s} {'fewer':>7s} "
          f"{'peak B/sync':>12s} {'wall s':>7s}")
    for name, loss, per_token, peak, seconds in rows.values():
        print(f"{name:38s} {loss:9.4f} {loss / base_loss - 1:+7.1%} {per_token:12.1f} "
              f"{base_bytes / per_token:6.0f}x {peak:12,d} {seconds:7.1f}")
    best = min(("diloco_paper", "diloco"), key=lambda k: rows[k][1])
    gap, fewer = rows[best][1] / base_loss - 1, base_bytes / rows[best][2]
    print(f"goal DiLoCo within 3% of DP with >= 50x fewer bytes: {'met' if gap <= 0.03 and fewer >= 50 else 'NOT met'}"
          f" (best: {rows[best][0]}, {gap:+.1%}, {fewer:.0f}x fewer bytes)")
    share = rows["streaming"][3] / rows["diloco"][3]
    print(f"Streaming peak bytes per sync / DiLoCo's: {share:.3f} (2 fragments: 1/2 of the values, "
          f"fp4: ~1/8 of the bytes each -> ~{1 / 16:.3f})")


if __name__ == "__main__":
    main()
