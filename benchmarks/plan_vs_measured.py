"""Predicted vs measured training-step time on this machine: `archc plan --hardware local` against real steps.

Three specs at small sizes, a dense transformer (specs/llama.arch), a mixture of experts
(specs/mixtral.arch, 8 experts, top-2) and a linear mixer (specs/gated_deltanet.arch), each stepped the
way `archc train` steps (archc.training.train: forward, loss, backward, gradient clipping, AdamW from
archc.training.optim with its parameter groups, MoE bias update, zero_grad), fp32, 2 threads by default.

The plan's two inputs are measured in the same rounds as the steps: the matmul peak
(`perf.matmul_peak_flops`) and the elementwise bandwidth (`hardware_probe.elementwise_bandwidth`). Steps and
probe run interleaved, the order rotating every round (benchmarks/step_time.py), so load from other
processes hits predictions and measurements alike; the prediction uses the probes' medians, the measurement
is the median step. The prediction is the plan's lower bound for one device: every op at
max(FLOPs / peak, bytes / bandwidth), backward 2x forward, plus AdamW's memory traffic.

Prints, per spec: parameters, predicted step, measured step, measured / predicted; then the goals
(dense within 30%, the three ranked alike) as measured, met or not.

    python benchmarks/plan_vs_measured.py                           # CPU, 2 threads, 2-4 minutes
    python benchmarks/plan_vs_measured.py --device cuda --batch 16 --seq 1024 --d-model 1024 --threads 0
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import archc  # noqa: E402
from archc.interop.weights import fused_layout  # noqa: E402
from archc.runtime.moe import update_expert_biases  # noqa: E402
from archc.training.hardware_probe import (  # noqa: E402
    TORCH_DTYPES,
    elementwise_bandwidth,
    local_hardware,
    matmul_side,
)
from archc.training.optim import build_optimizer  # noqa: E402
from archc.training.perf import matmul_peak_flops  # noqa: E402
from benchmarks.step_time import (  # noqa: E402
    device_name,
    interleaved_many,
    load_warning,
    setup_device,
)


def specs(d: int, layers: int) -> list[tuple[str, str, dict]]:
    """(label, spec file, overrides): widths as the families' published models scale them."""
    heads = max(1, d // 64)
    ffw = 64 * ((8 * d // 3 + 63) // 64)  # SwiGLU at 8/3 d_model, as benchmarks/step_time.py
    attention = {"d_model": d, "n_layers": layers, "n_heads": heads, "n_kv_heads": max(1, heads // 2)}
    return [
        ("dense (Llama)", "llama.arch", {**attention, "d_ff": ffw}),
        ("MoE (Mixtral 8 x top-2)", "mixtral.arch", {**attention, "d_expert": 7 * d // 2}),  # 3.5 d, as Mixtral
        ("linear mixer (Gated DeltaNet)", "gated_deltanet.arch",
         {"d_model": d, "n_layers": layers, "n_heads": heads, "head_dim": 64, "d_ff": ffw}),
    ]


def train_step(compiled, batch: int, seq: int, device, dtype):
    """One optimizer step exactly as archc.training.train takes it (without its logging)."""
    model = compiled.build(device=device, dtype=dtype)
    optimizer = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name="adamw", lr=1e-3,
                                weight_decay=0.1)
    vocab = compiled.params["vocab"]
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    model.train()

    def step():
        loss = model(tokens=tokens)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        update_expert_biases(model)
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(TORCH_DTYPES), default="fp32")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each: every spec's step and the probe)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=180.0, help="stop after the round that passes this many seconds")
    p.add_argument("--show-plans", action="store_true", help="print each spec's full plan")
    args = p.parse_args()

    device = setup_device(args.device, args.threads)
    dtype = TORCH_DTYPES[args.dtype]
    side = matmul_side(dtype, device)
    peaks: list[float] = []
    bandwidths: list[float] = []

    def probe():
        peaks.append(matmul_peak_flops(dtype, n=side, device=device, seconds=0.3))
        bandwidths.append(elementwise_bandwidth(dtype, device))

    rows = [(label, archc.compile(ROOT / "specs" / spec, **overrides)) for label, spec, overrides in
            specs(args.d_model, args.layers)]
    steps = [train_step(c, args.batch, args.seq, device, dtype) for _label, c in rows]
    print(f"device: {device_name(device)}, {args.dtype}; batch {args.batch} x {args.seq} tokens, "
          f"d_model {args.d_model}, {args.layers} layers")
    warning = load_warning(device)
    if warning:
        print(warning)
    times = interleaved_many([*steps, probe], args.rounds, args.warmup, device, budget_s=args.budget)
    hardware = local_hardware(args.dtype, device, statistics.median(peaks), statistics.median(bandwidths))
    print(f"probe medians over {len(peaks)} rounds: {hardware.note.removeprefix('measured: ')} "
          f"(peak spread {min(peaks) / 1e9:,.0f}-{max(peaks) / 1e9:,.0f} GFLOP/s)")

    print(f"\n{'spec':32s} {'params':>8s} {'predicted':>10s} {'measured':>10s} {'meas/pred':>10s}  "
          f"{'spread (min-max)':>18s}")
    results = []
    for (label, compiled), measured in zip(rows, times):
        plan = compiled.plan(hardware, devices=1, batch=args.batch, seq=args.seq, dtype=args.dtype)
        predicted = plan.best.step_s if plan.best else plan.options[0].step_s
        med = statistics.median(measured)
        results.append((label, predicted, med))
        print(f"{label:32s} {compiled.num_params() / 1e6:7.2f}M {predicted * 1e3:8.1f}ms {med * 1e3:8.1f}ms "
              f"{med / predicted:9.2f}x  {min(measured) * 1e3:7.1f}-{max(measured) * 1e3:.1f}ms")
        if args.show_plans:
            print(plan.text())

    dense_pred, dense_meas = results[0][1], results[0][2]
    error = abs(dense_meas - dense_pred) / dense_meas
    print(f"\ngoal: dense within 30% of measured: {'met' if error <= 0.3 else 'NOT met'} "
          f"(prediction {(dense_pred - dense_meas) / dense_meas:+.0%} of measured)")
    predicted_order = [r[0] for r in sorted(results, key=lambda r: r[1])]
    measured_order = [r[0] for r in sorted(results, key=lambda r: r[2])]
    print(f"goal: same ranking: {'met' if predicted_order == measured_order else 'NOT met'} "
          f"(predicted fastest first: {', '.join(predicted_order)}; measured: {', '.join(measured_order)})")


if __name__ == "__main__":
    main()
