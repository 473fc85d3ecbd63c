"""One MoE layer, forward + backward: grouped GEMMs vs the per-expert loop, and vs a dense SwiGLU MLP.

Compiles a one-layer spec, `y = experts(x, n=E, top_k=k, hidden=H)`, twice: with the
`fuse_experts` pass (the default: stacked expert weights, three grouped GEMMs for
all experts) and without it (`disable=("fuse_experts",)`: a Python loop over
per-expert SwiGLU modules). Both carry the same weights (moved through the
canonical names) and a forward pass checks they agree before anything is timed,
so they route every token alike. A third module is a dense SwiGLU MLP with
hidden = k·H: the same active FLOPs per token as the experts.

Experts are fine-grained as E grows (DeepSeekMoE's segmentation): top_k grows
with E and H shrinks so k·H stays `--active`. One timed step = forward, the
router's auxiliary loss, backward (w.r.t. the input too), gradients cleared;
the three modules run in interleaved rounds (order reversed every other round)
and each call is bracketed by a device sync.

Printed per size: median step times, the fused speed-up over the loop (goal:
>= 2x at 64 experts) and the MoE layer's FLOP rate over the dense MLP's (goal:
>= 70%), FLOPs being 3 x the compiler's forward matmul FLOPs (the router's
included for the MoE layer), and the fraction of the measured matmul peak.
`--profile` adds the top ops of one fused step per size (where the time goes).

    python benchmarks/moe.py                                               # CPU, < 90 s
    python benchmarks/moe.py --device cuda --dtype bfloat16 --d-model 2048 --batch 8 --seq 2048 --active 4096
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

import archc  # noqa: E402
from archc.interop.weights import load_canonical, to_canonical  # noqa: E402
from archc.runtime.moe import moe_aux_loss  # noqa: E402
from benchmarks.step_time import (  # noqa: E402
    DTYPES,
    auto_threads,
    device_name,
    interleaved_many,
    load_warning,
    measured_peak,
    setup_device,
)

MOE_SPEC = """\
param d_model: int = 256
param n_experts: int = 8
param top_k: int = 2
param d_expert: int = 512

model MoELayer(x: Tensor[B, T, d_model]) {
    y = experts(x, n=n_experts, top_k=top_k, hidden=d_expert) as moe
    return y
}
"""

DENSE_SPEC = """\
param d_model: int = 256
param d_ff: int = 1024

model DenseMLP(x: Tensor[B, T, d_model]) {
    y = swiglu(x, hidden=d_ff) as mlp
    return y
}
"""

GOAL_SPEEDUP, GOAL_SPEEDUP_AT = 2.0, 64  # fused >= 2x faster than the loop at 64 experts
GOAL_RATE = 0.70  # the MoE layer's FLOP rate >= 70% of the dense MLP's


def parse_sizes(text: str, active: int) -> list[tuple[int, int, int]]:
    """"8:2,64:8" -> [(experts, top_k, hidden)] with hidden = active // top_k."""
    sizes = []
    for item in text.split(","):
        try:
            e, k = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--experts: want E:top_k pairs like 8:2,64:8, got {item!r}") from None
        if active % k or not 1 <= k <= e:
            raise SystemExit(f"--experts {item}: top_k must divide --active {active} and be at most E")
        sizes.append((e, k, active // k))
    return sizes


def layer_step(model, x: torch.Tensor, grad: torch.Tensor):
    """Forward, the routers' aux loss (none for the dense MLP), backward to weights and input."""
    params = list(model.parameters())

    def step():
        x.grad = None
        for p in params:
            p.grad = None
        y = model(x)["y"]
        aux = moe_aux_loss(model)
        if isinstance(aux, torch.Tensor):
            torch.autograd.backward([y, aux], [grad, None])
        else:
            y.backward(grad)

    return step


def build_size(args, e: int, k: int, h: int, device, dtype):
    """Fused and loop MoE layers with the same weights, and the dense MLP of the same active FLOPs."""
    params = dict(d_model=args.d_model, n_experts=e, top_k=k, d_expert=h)
    fused_c = archc.compile(MOE_SPEC, params, name="moe_layer.arch")
    loop_c = archc.compile(MOE_SPEC, params, name="moe_layer.arch", disable=("fuse_experts",))
    dense_c = archc.compile(DENSE_SPEC, dict(d_model=args.d_model, d_ff=k * h), name="dense_mlp.arch")
    torch.manual_seed(0)
    fused = fused_c.build()
    loop = loop_c.build()
    load_canonical(loop, loop_c, to_canonical(fused_c, fused.state_dict()))
    dense = dense_c.build()
    for m in (fused, loop, dense):
        m.to(device=device, dtype=dtype).train()
    return (fused_c, fused), (loop_c, loop), (dense_c, dense)


@torch.no_grad()
def check_same(fused, loop, x) -> float:
    a, b = fused(x)["y"].float(), loop(x)["y"].float()
    diff = (a - b).abs().max().item()
    rel = diff / max(b.abs().max().item(), 1e-12)
    if x.dtype == torch.float32 and rel > 1e-4:
        raise SystemExit(f"fused and loop MoE layers differ by {diff:.3g} ({rel:.1e} relative) in fp32")
    return rel


def profile_step(step, device, rows: int = 8) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--active", type=int, default=1024,
                    help="k·H, the active expert hidden width per token (= the dense MLP's hidden)")
    ap.add_argument("--experts", default="8:2,64:8,256:32", help="E:top_k sizes; hidden = active // top_k")
    ap.add_argument("--steps", type=int, default=8, help="timed rounds per size (fewer if --budget runs out)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--budget", type=float, default=45.0,
                    help="seconds of timed rounds in all, split over the sizes (at least 3 rounds each)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--threads", default="auto",
                    help="torch CPU threads; auto: torch's choice, or 1 if other processes keep the CPUs busy")
    ap.add_argument("--profile", action="store_true", help="print the top ops of one fused step per size")
    args = ap.parse_args(argv)
    threads, threads_note = auto_threads(args.threads, args.device)
    device = setup_device(args.device, threads)
    dtype = DTYPES[args.dtype]
    sizes = parse_sizes(args.experts, args.active)
    t_start = time.perf_counter()

    peak, peak_n = measured_peak(dtype, device)
    dt_name = str(dtype).split(".")[-1]
    print(f"torch {torch.__version__} on {device_name(device)}; measured matmul peak ({peak_n}^3, {dt_name}): "
          f"{peak / 1e12:.3f} TFLOP/s")
    if device.type == "cpu" and dtype != torch.float32:
        print("NOTE: 16-bit matmuls on a CPU without native bf16/fp16 units are emulated and slow; "
              "--dtype bfloat16 is meant for CUDA")
    warn = load_warning(device)
    if threads_note:
        print(threads_note)
    elif warn:
        print(warn)
    n_tok = args.batch * args.seq
    print(f"MoE layer: d_model={args.d_model}, {n_tok:,} tokens (batch {args.batch} x seq {args.seq}), "
          f"active expert width k·H = {args.active}, {dt_name}; one step = forward + aux loss + backward")

    rows = []
    for e, k, h in sizes:
        (fused_c, fused), (loop_c, loop), (dense_c, dense) = build_size(args, e, k, h, device, dtype)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(args.batch, args.seq, args.d_model, generator=g).to(device=device, dtype=dtype)
        grad = torch.randn(x.shape, generator=g).to(device=device, dtype=dtype)
        rel = check_same(fused, loop, x)
        x.requires_grad_(True)
        moe_flops = 3 * fused_c.flops(args.batch, args.seq)
        dense_flops = 3 * dense_c.flops(args.batch, args.seq)
        router_share = 2 * n_tok * args.d_model * e / (moe_flops / 3)
        steps = [layer_step(m, x, grad) for m in (fused, loop, dense)]
        tf, tl, td = interleaved_many(steps, args.steps, args.warmup, device, budget_s=args.budget / len(sizes))
        load = fused.moe.router.stats.get("max_over_mean_load", float("nan"))
        print(f"\n== {e} experts, top-{k}, hidden {h} (k·H = {k * h}); params {fused_c.num_params():,} "
              f"({fused_c.active_params():,} active); dense MLP hidden {k * h}, params {dense_c.num_params():,}")
        print(f"   step FLOPs = 3 x fwd: MoE {moe_flops / 1e9:.2f} GFLOP (router {router_share:.1%}), "
              f"dense {dense_flops / 1e9:.2f} GFLOP; max/mean expert load {load:.2f}; "
              f"fused vs loop output diff {rel:.1e} (relative)")
        print(f"   {'variant':<24}{'median':>10}{'min':>10}{'TFLOP/s':>10}{'of peak':>9}   steps (ms)")
        for label, ts, fl in (("fused (grouped GEMM)", tf, moe_flops), ("loop (per expert)", tl, moe_flops),
                              (f"dense SwiGLU ({k * h})", td, dense_flops)):
            med = statistics.median(ts)
            print(f"   {label:<24}{med * 1e3:>8.1f}ms{min(ts) * 1e3:>8.1f}ms{fl / med / 1e12:>10.4f}"
                  f"{fl / med / peak:>9.1%}   " + " ".join(f"{t * 1e3:.0f}" for t in ts))
        speedup = statistics.median(tl) / statistics.median(tf)
        pair_speedup = statistics.median(b / a for a, b in zip(tf, tl))
        rate = (moe_flops / statistics.median(tf)) / (dense_flops / statistics.median(td))
        pair_rate = statistics.median((moe_flops / a) / (dense_flops / b) for a, b in zip(tf, td))
        goal = f" (goal >= {GOAL_SPEEDUP:.0f}x at {GOAL_SPEEDUP_AT} experts)" if e == GOAL_SPEEDUP_AT else ""
        print(f"   fused speed-up over loop: {speedup:.2f}x{goal}; median of per-round pairs {pair_speedup:.2f}x")
        print(f"   MoE FLOP rate / dense MLP's: {rate:.1%} (goal >= {GOAL_RATE:.0%}); "
              f"median of per-round pairs {pair_rate:.1%}")
        rates = ((tf, moe_flops), (tl, moe_flops), (td, dense_flops))
        if max(fl / statistics.median(ts) / peak for ts, fl in rates) > 1:
            print("   NOTE: above 100% of peak: the peak measured at the start understates the matmul rate reached "
                  "here (the machine's load changed, or this dtype's kernels favour the layers' x @ W.T layout)")
        spread = max(max(t) / min(t) for t in (tf, tl, td))
        if spread > 1.5:
            print(f"   WARNING: noisy timings (slowest/fastest step = {spread:.1f}x): trust the per-round ratios")
        if args.profile:
            print("   top ops of one fused step:")
            print("\n".join("   " + line for line in profile_step(steps[0], device).splitlines()))
        rows.append((e, k, h, statistics.median(tf), statistics.median(tl), statistics.median(td), speedup, rate,
                     moe_flops / statistics.median(tf) / peak))
        del fused, loop, dense, steps, x, grad
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n== summary ({dt_name}, {device_name(device)}; ratios measured in this run)")
    header = (f"   {'experts':>7}{'top_k':>6}{'hidden':>7}{'fused':>10}{'loop':>10}{'dense':>10}"
              f"{'fused/loop':>12}{'MoE/dense':>11}{'MoE of peak':>13}")
    print(header)
    print("   " + "-" * (len(header) - 3))
    for e, k, h, tf, tl, td, speedup, rate, of_peak in rows:
        print(f"   {e:>7}{k:>6}{h:>7}{tf * 1e3:>8.1f}ms{tl * 1e3:>8.1f}ms{td * 1e3:>8.1f}ms"
              f"{speedup:>11.2f}x{rate:>11.1%}{of_peak:>13.1%}")
    for e, *_times, speedup, _rate, _of_peak in rows:
        if e == GOAL_SPEEDUP_AT:
            print(f"   goal fused >= {GOAL_SPEEDUP:.0f}x loop at {e} experts: {speedup:.2f}x -> "
                  f"{'MET' if speedup >= GOAL_SPEEDUP else 'NOT MET'}")
    worst = min(rows, key=lambda r: r[7])
    print(f"   goal MoE >= {GOAL_RATE:.0%} of the dense MLP's FLOP rate: lowest {worst[7]:.1%} at {worst[0]} experts "
          f"-> {'MET' if worst[7] >= GOAL_RATE else 'NOT MET'}")
    again, _ = measured_peak(dtype, device)
    print(f"   matmul peak: {peak / 1e12:.3f} TFLOP/s at the start, {again / 1e12:.3f} at the end")
    if abs(again - peak) > 0.2 * peak:
        print("   NOTE: the peak moved by more than 20% during the run: the machine's load changed")
    print(f"\n(benchmark wall time {time.perf_counter() - t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
