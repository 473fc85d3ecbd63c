"""Compile time of `specs/llama.arch` as the number of layers grows.

Times `archc.compile()` alone (spec parsing, lowering, every pass with its IR
verification, and code generation) -- not the torch import and not building
the module. Each point is the median of a few runs after one warmup compile
(which pays for loading the grammar). Prints, per layer count, the median
time, the time per layer, the ratio to the smallest point and the local growth
exponent k in t ~ layers^k between neighbouring points (k = 1 is linear,
k = 2 quadratic), then a per-stage breakdown at the largest point, so the
stage that grows fastest is visible.

    python benchmarks/compile_time.py                 # 8 .. 128 layers, < 60 s
    python benchmarks/compile_time.py --layers 8 64 256 --profile
    python benchmarks/compile_time.py --clock wall    # wall-clock time instead of CPU time

Times are the process's CPU time by default (`time.process_time`): compiling is
single-threaded, so on an idle machine this equals wall time, and on a shared one
it does not count the time other processes held the cores.

`--profile` also runs cProfile on one compile at the largest layer count and
prints the top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import math
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import archc  # noqa: E402

SPEC = str(ROOT / "specs" / "llama.arch")
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def compile_once(n_layers: int, on_stage=None) -> float:
    gc.collect()
    t0 = clock()
    archc.compile(SPEC, n_layers=n_layers, on_stage=on_stage)
    return clock() - t0


def median_time(n_layers: int, repeats: int) -> tuple[float, float]:
    times = [compile_once(n_layers) for _ in range(repeats)]
    return statistics.median(times), min(times)


def stage_breakdown(n_layers: int, repeats: int = 3) -> dict[str, float]:
    """Seconds per stage, median over `repeats` compiles.

    The `on_stage` hook fires after lowering and after each pass, so the gap
    before each call is that stage (its IR verification included); what is left
    after the last pass is code generation.
    """
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        marks: list[tuple[str, float]] = []
        gc.collect()
        t0 = clock()
        archc.compile(SPEC, n_layers=n_layers, on_stage=lambda name, _g: marks.append((name, clock())))
        end = clock()
        prev = t0
        for name, t in marks:
            label = "parse + lower" if name == "lower" else name
            samples.setdefault(label, []).append(t - prev)
            prev = t
        samples.setdefault("codegen", []).append(end - prev)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    ap.add_argument("--repeats", type=int, default=5, help="runs per point (3 for points over 64 layers)")
    ap.add_argument("--profile", action="store_true", help="cProfile one compile at the largest point")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu", help="CPU time (default) or wall time")
    args = ap.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    layers = sorted(set(args.layers))

    t_start = time.perf_counter()
    compile_once(4)  # warmup: grammar load, imports inside the compiler
    print(f"archc.compile('{Path(SPEC).relative_to(ROOT)}', n_layers=N): median {args.clock} time of "
          f"{args.repeats} runs (3 above 64 layers), after one warmup compile\n")
    header = (f"{'layers':>6}  {'median':>9}  {'min':>9}  {'per layer':>10}  {'marginal':>10}  "
              f"{'ratio':>7}  {'linear':>7}  {'growth k':>8}")
    print(header)
    print("-" * len(header))
    results: dict[int, float] = {}
    minima: dict[int, float] = {}
    prev = None
    for n in layers:
        med, best = median_time(n, args.repeats if n <= 64 else min(args.repeats, 3))
        results[n], minima[n] = med, best
        ratio = med / results[layers[0]]
        k = "" if prev is None else f"{math.log(med / results[prev]) / math.log(n / prev):.2f}"
        marginal = "" if prev is None else f"{(med - results[prev]) / (n - prev) * 1e3:.2f}ms"
        print(f"{n:>6}  {med * 1e3:>7.1f}ms  {best * 1e3:>7.1f}ms  {med / n * 1e3:>8.2f}ms  {marginal:>10}  "
              f"{ratio:>6.2f}x  {n / layers[0]:>6.1f}x  {k:>8}")
        prev = n
    print("(marginal: extra time per added layer since the previous point; flat = linear growth)")
    print()
    if 8 in results and 64 in results:
        r, r_min = results[64] / results[8], minima[64] / minima[8]
        verdict = "linear" if min(r, r_min) <= 10 else "SUPERLINEAR"
        print(f"64 vs 8 layers: {results[64] * 1e3:.1f} ms / {results[8] * 1e3:.1f} ms = {r:.2f}x of medians, "
              f"{r_min:.2f}x of minima (linear would be 8.0x) -> {verdict}; 64 layers "
              f"{'under' if results[64] < 1.0 else 'OVER'} 1 s")
    if len(layers) >= 2:
        a, b = layers[-2], layers[-1]
        k = math.log(results[b] / results[a]) / math.log(b / a)
        print(f"growth exponent {a} -> {b} layers: k = {k:.2f} (1 = linear, 2 = quadratic)")

    big = layers[-1]
    small = layers[0]
    print("\nper-stage median seconds (on_stage gaps; each pass includes its IR verify):")
    s_small, s_big = stage_breakdown(small), stage_breakdown(big)
    h2 = f"{'stage':<26}{small:>8}L{big:>10}L{'x':>8}  (linear: {big / small:.0f}x)"
    print(h2)
    print("-" * len(h2))
    for stage in s_big:
        a, b = s_small.get(stage, float("nan")), s_big[stage]
        print(f"{stage:<26}{a * 1e3:>7.1f}ms{b * 1e3:>9.1f}ms{b / a:>8.1f}x")

    if args.profile:
        print(f"\ncProfile of one compile at {big} layers (top 15 by own time):")
        prof = cProfile.Profile()
        prof.enable()
        archc.compile(SPEC, n_layers=big)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).strip_dirs().sort_stats("tottime").print_stats(15)
        print(out.getvalue())
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
