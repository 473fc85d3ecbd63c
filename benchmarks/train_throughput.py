"""Training throughput: tokens/s and MFU of the generated Llama beside the hand-written `LlamaFast`.

Full training steps (forward + loss + backward + AdamW step + zero_grad) as
`archc train` runs them: fp32 master weights, and for bfloat16 the forward under
`torch.autocast` (the `--dtype bfloat16` of training). Both models are built
at the same config with identical weights (checked on the logits first), and
their steps are interleaved (ABBA) in the same run, so the ratio is measured
under the same machine load. Pairs, weight maps and the step come from
`benchmarks/step_time.py`.

Printed per dtype: median step time, tokens/s, model TFLOP/s and MFU (3 x the
compiler's forward matmul FLOPs per step over the matmul peak measured here
for that dtype — fp32 or bf16 — as training reports it), the throughput ratio
generated / reference (goal >= 1.0) and MFU against its goal (>= 50% on CPU).

CPUs without native bf16 units run bf16 matmuls dozens of times slower than
fp32 (this is measured: the bf16 peak is printed); there the bf16 pair runs at
a smaller config (`--small-16bit`, said in the output) so the run stays short.

    python benchmarks/train_throughput.py                                  # CPU, < 3 minutes
    python benchmarks/train_throughput.py --device cuda --d-model 2048 --layers 16 --vocab 32000 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.step_time import (  # noqa: E402
    DTYPES,
    auto_threads,
    device_name,
    llama_pair,
    load_warning,
    measured_peak,
    setup_device,
    time_pair,
)

GOAL_RATIO = 1.0  # generated tokens/s >= the reference's
GOAL_MFU_CPU = 0.50


def small_config(args, spec: str) -> argparse.Namespace:
    """`args` with the model/batch fields of `spec` ("d_model=128,layers=2,batch=2,seq=128") replaced."""
    out = argparse.Namespace(**vars(args))
    out.heads = out.kv_heads = out.d_ff = 0  # derived from d_model unless given
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in ("d_model", "layers", "heads", "kv_heads", "d_ff", "batch", "seq", "vocab"):
            raise SystemExit(f"--small-16bit-config: unknown field {key!r}")
        setattr(out, key, int(value))
    return out


def run_dtype(args, device, dtype: torch.dtype, peak32: float) -> dict:
    name = "float32" if dtype == torch.float32 else f"{str(dtype).split('.')[-1]} autocast"
    peak, peak_n = (peak32, args._peak32_n) if dtype == torch.float32 else measured_peak(dtype, device)
    cfg, note = args, ""
    if dtype != torch.float32 and device.type == "cpu" and args.small_16bit != "off":
        if args.small_16bit == "always" or peak < 0.25 * peak32:
            cfg = small_config(args, args.small_16bit_config)
            note = (f"   (smaller config: this CPU's {str(dtype).split('.')[-1]} matmul peak is {peak / peak32:.1%} of "
                    f"fp32's, so the fp32 config would take minutes per step)")
    autocast = None if dtype == torch.float32 else dtype
    budget = args.budget / len(args.dtype_list)
    compiled, ref, desc, diff, tg, tr = time_pair(llama_pair, cfg, device, torch.float32, autocast=autocast,
                                                  budget_s=budget)
    flops = 3 * compiled.flops(cfg.batch, cfg.seq)
    tokens = cfg.batch * cfg.seq
    print(f"\n== {name}: {desc}")
    if note:
        print(note)
    print(f"   batch={cfg.batch} seq={cfg.seq} ({tokens:,} tokens/step), fp32 weights, AdamW; "
          f"params={compiled.num_params():,}; max |logits diff| (fp32, before training) = {diff}")
    print(f"   model FLOPs/step = 3 x fwd {flops / 3e9:.2f} GFLOP = {flops / 1e9:.2f} GFLOP; "
          f"measured {str(dtype).split('.')[-1]} matmul peak ({peak_n}^3) {peak / 1e12:.4f} TFLOP/s")
    print("   per-step ms: generated " + " ".join(f"{t * 1e3:.0f}" for t in tg)
          + " | reference " + " ".join(f"{t * 1e3:.0f}" for t in tr))
    mfu_goal = f"(goal >= {GOAL_MFU_CPU:.0%})" if device.type == "cpu" else ""
    header = f"   {'model':<24}{'median':>10}{'min':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
    print(header + f" {mfu_goal}")
    print("   " + "-" * (len(header) - 3))
    mfus = {}
    for label, ts in ((f"generated ({compiled.class_name})", tg), (f"reference ({type(ref).__name__})", tr)):
        med = statistics.median(ts)
        mfus[label.split()[0]] = flops / med / peak
        print(f"   {label:<24}{med * 1e3:>8.1f}ms{min(ts) * 1e3:>8.1f}ms{tokens / med:>12,.0f}"
              f"{flops / med / 1e12:>10.4f}{flops / med / peak:>8.1%}")
    ratio = statistics.median(tr) / statistics.median(tg)
    pair_ratio = statistics.median(b / a for a, b in zip(tg, tr))
    verdict = "OK" if ratio >= GOAL_RATIO else ("~parity (within 5%)" if ratio >= 0.95 else "SLOWER")
    print(f"   throughput generated/reference: {ratio:.3f} (goal >= {GOAL_RATIO:.1f}) -> {verdict}; "
          f"median of per-step pairs {pair_ratio:.3f}, of best steps {min(tr) / min(tg):.3f}")
    spread = max(max(tg) / min(tg), max(tr) / min(tr))
    if spread > 1.5:
        print(f"   WARNING: noisy timings (slowest/fastest step = {spread:.1f}x): trust the per-step pair ratio")
    if max(mfus.values()) > 1.0:
        print(f"   NOTE: MFU above 100%: the measured peak understates the matmul rate the model's own matmuls reach "
              f"in {str(dtype).split('.')[-1]} here (matmul_peak_flops times a @ b with both operands row-major; "
              f"layers multiply by transposed weights, x @ W.T, which some CPU kernels run much faster)")
    return dict(name=name, ratio=ratio, pair_ratio=pair_ratio, mfu_gen=mfus["generated"], mfu_ref=mfus["reference"],
                tok_gen=tokens / statistics.median(tg), tok_ref=tokens / statistics.median(tr))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=0, help="default d_model // 64")
    ap.add_argument("--kv-heads", type=int, default=0, help="default heads // 2")
    ap.add_argument("--d-ff", type=int, default=0, help="default 8/3 d_model rounded up to 64")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated; 16-bit ones run under autocast")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per model (fewer if --budget runs out)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=100.0,
                    help="seconds of timed steps in all, split over the dtypes (at least 3 steps each)")
    ap.add_argument("--small-16bit", default="auto", choices=("auto", "always", "off"),
                    help="on CPU, run 16-bit at --small-16bit-config: auto = when its matmul peak is < 25%% of fp32's")
    ap.add_argument("--small-16bit-config", default="d_model=128,layers=2,batch=4,seq=256")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads; auto: torch's choice, or 1 if other processes keep the CPUs busy")
    args = ap.parse_args(argv)
    args.dtype_list = []
    for key in args.dtypes.split(","):
        if key.strip() not in DTYPES:
            raise SystemExit(f"--dtypes: unknown {key!r}; choose from {', '.join(sorted(DTYPES))}")
        args.dtype_list.append(DTYPES[key.strip()])
    threads, threads_note = auto_threads(args.threads, args.device)
    device = setup_device(args.device, threads)
    t0 = time.perf_counter()
    peak32, args._peak32_n = measured_peak(torch.float32, device)
    print(f"torch {torch.__version__} on {device_name(device)}; measured fp32 matmul peak "
          f"({args._peak32_n}^3): {peak32 / 1e12:.4f} TFLOP/s")
    warn = load_warning(device)
    if threads_note:
        print(threads_note)
    elif warn:
        print(warn)
    results = [run_dtype(args, device, dtype, peak32) for dtype in args.dtype_list]

    print(f"\n== summary ({device_name(device)}; generated Llama vs LlamaFast, measured in this run)")
    header = f"   {'dtype':<18}{'gen tok/s':>11}{'ref tok/s':>11}{'ratio':>8}{'pairs':>8}{'MFU gen':>9}{'MFU ref':>9}"
    print(header)
    print("   " + "-" * (len(header) - 3))
    for r in results:
        print(f"   {r['name']:<18}{r['tok_gen']:>11,.0f}{r['tok_ref']:>11,.0f}{r['ratio']:>8.3f}{r['pair_ratio']:>8.3f}"
              f"{r['mfu_gen']:>9.1%}{r['mfu_ref']:>9.1%}")
    for r in results:
        line = f"   {r['name']}: throughput ratio {r['ratio']:.3f} (goal >= {GOAL_RATIO:.1f}) -> " \
               f"{'MET' if r['ratio'] >= GOAL_RATIO else 'NOT MET'}"
        if device.type == "cpu":
            verdict = "MET" if r["mfu_gen"] >= GOAL_MFU_CPU else "NOT MET"
            if r["mfu_gen"] > 1.0:
                verdict = "not measurable: the measured peak is too low (see NOTE above)"
            line += f"; MFU {r['mfu_gen']:.1%} (goal >= {GOAL_MFU_CPU:.0%}) -> {verdict}"
        print(line)
    again, _ = measured_peak(torch.float32, device, seconds=0.5)
    if abs(again - peak32) > 0.2 * peak32:
        print(f"   NOTE: the fp32 matmul peak measured again at the end is {again / 1e12:.4f} TFLOP/s "
              f"({again / peak32:.2f}x the first): the machine's load changed, so MFU is approximate")
    print(f"\n(benchmark wall time {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
