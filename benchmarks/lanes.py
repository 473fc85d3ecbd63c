"""Training step time of Llama with mHC lanes (specs/mhc.arch, n=4) over the same Llama without lanes.

Both models are compiled from the repository's specs at the same sizes (d_model 256 by default);
one timed step = forward, loss, backward, gradients cleared. The models run in interleaved rounds
(order reversed every other round, each call bracketed by a device sync) so drift in machine load
falls on both alike. Printed: the median step time of each, and their ratio (the mHC paper reports
~6.7% overhead at n=4 with fused kernels; the goal here is <= 1.10x). `--rule` and `--n` swap the
lane rule; `--recompute` turns on the lanes' recompute-in-backward. `--profile` then runs a few more
steps of each under torch.profiler and prints where the extra time goes: each op's self CPU time per
step in both models, largest difference first (a custom autograd Function's own row is the Python
that runs its forward or backward, outside the aten ops it calls).

    python benchmarks/lanes.py                                   # CPU, about a minute
    python benchmarks/lanes.py --threads 1 --profile
    python benchmarks/lanes.py --device cuda --dtype bf16 --batch 8 --seq 1024 --d-model 1024
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import archc  # noqa: E402
from benchmarks.step_time import (  # noqa: E402
    DTYPES,
    auto_threads,
    device_name,
    interleaved_many,
    load_warning,
    setup_device,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--threads", default="auto", help="torch CPU threads, or `auto` (1 on a loaded machine)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--n", type=int, default=4, help="lanes")
    p.add_argument("--rule", default="mhc", choices=("hc_static", "hc_dynamic", "mhc"))
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="then profile both and print the ops that differ most")
    p.add_argument("--profile-rows", type=int, default=25)
    args = p.parse_args(argv)

    threads, note = auto_threads(args.threads, args.device)
    device = setup_device(args.device, threads)
    dtype = DTYPES[args.dtype]
    if note:
        print(note)
    sizes = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": max(1, args.d_model // 64),
             "n_kv_heads": max(1, args.d_model // 128), "d_ff": args.d_model * 8 // 3 // 8 * 8}
    plain = archc.compile(ROOT / "specs" / "llama.arch", sizes)
    widened = archc.compile(ROOT / "specs" / "mhc.arch", {**sizes, "n_lanes": args.n, "lane_rule": args.rule,
                                                          "lane_recompute": args.recompute})
    torch.manual_seed(0)
    models = [c.build(device=device).to(device=device, dtype=dtype) for c in (plain, widened)]
    tokens = torch.randint(0, 256, (args.batch, args.seq), device=device)

    def step(model):
        def run():
            model(tokens=tokens)["loss"].backward()
            model.zero_grad(set_to_none=True)
        return run

    print(f"device: {device_name(device)}, {args.dtype}; d_model {args.d_model}, {args.layers} layers, "
          f"batch {args.batch} x {args.seq} tokens")
    warning = load_warning(device)
    if warning:
        print(warning)
    times = interleaved_many([step(m) for m in models], args.steps, args.warmup, device)
    base, lanes = (statistics.median(t) for t in times)
    extra = widened.num_params() - plain.num_params()
    label = f"{args.rule} n={args.n}" + (" recompute" if args.recompute else "")
    print(f"{'no lanes':<24}{base * 1e3:8.1f} ms/step  ({plain.num_params():,} parameters)")
    print(f"{label:<24}{lanes * 1e3:8.1f} ms/step  (+{extra:,} parameters)")
    print(f"{'ratio':<24}{lanes / base:8.3f}x  (goal <= 1.10x; the mHC paper: 1.067x with fused kernels)")
    if args.profile:
        profile_difference([step(m) for m in models], ("no lanes", label), max(2, args.steps // 3), args.profile_rows)


def profile_difference(fns, names, rounds: int, rows: int) -> None:
    """Self CPU time per step of every op under torch.profiler, for each of `fns`; prints the largest
    differences of the last over the first (calls: extra calls per step)."""
    from torch.profiler import ProfilerActivity, profile

    ms = [collections.Counter() for _ in fns]
    calls = [collections.Counter() for _ in fns]
    for _ in range(rounds):
        for fn, t, c in zip(fns, ms, calls):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            for e in prof.key_averages():
                t[e.key] += e.self_cpu_time_total / 1e3 / rounds
                c[e.key] += e.count / rounds
    base, other = ms[0], ms[-1]
    print(f"\nprofile, {rounds} steps each (profiler overhead included): {names[0]} {sum(base.values()):.1f} ms/step, "
          f"{names[-1]} {sum(other.values()):.1f} ms/step")
    print(f"{'op (self CPU time)':<52}{names[0]:>12}{names[-1]:>14}{'extra':>9}{'calls':>8}")
    for key in sorted(set(base) | set(other), key=lambda k: base[k] - other[k])[:rows]:
        extra_calls = calls[-1][key] - calls[0][key]
        print(f"{key[:50]:<52}{base[key]:12.2f}{other[key]:14.2f}{other[key] - base[key]:9.2f}{extra_calls:+8.0f}")


if __name__ == "__main__":
    main()
