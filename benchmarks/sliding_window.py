"""Forward + backward time of sliding-window attention: the chosen kernel vs the explicit-mask fallback vs full SDPA.

One attention layer's core (q [B, H, T, d], k, v [B, K, T, d], causal, window w)
at T = 1k, 2k, 4k and 8k:

- `auto`: the default, which runs the kernel `resolve` picks on this device:
  the blocked `local` kernel on the CPU, flex_attention (compiled) on CUDA;
- `local`: the blocked kernel, also on CUDA;
- `sdpa_mask`: SDPA with a boolean [T, T] window mask;
- `math`: the explicit-mask reference (`--kernel attention=math`), skipped
  where its [B, H, T, T] scores and their gradients would pass --max-math-gb;
- `sdpa causal`: full causal attention (`is_causal=True`), no window.

One call = forward, sum of the output times a fixed random tensor, backward to
q, k and v; the median of --iters timed calls (one at T >= 4k), after one
warm-up call at the first length (at every length on CUDA, where flex_attention
compiles for each new length). Ratios
are each row's time over auto's, measured in this run; the slope
is the exponent p of time ~ T^p fitted over the lengths (1 = linear).

    python benchmarks/sliding_window.py --threads 1                 # CPU, < 3 minutes
    python benchmarks/sliding_window.py --device cuda --dtype bf16 --lengths 2048 8192 32768
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from archc.kernels import attention  # noqa: E402
from benchmarks._measure import add_device_args, device_and_dtype, print_skipped, time_fn  # noqa: E402
from benchmarks.mixers import slope  # noqa: E402


def call(kernel: str, q, k, v, window: int, sinks: int):
    if kernel == "sdpa causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    fn = getattr(attention, f"attention_{kernel}")
    return fn(q, k, v, causal=True, window=window, sinks=sinks)


def measure(kernel: str, B, H, K, T, d, window, sinks, device, dtype, iters, warmup) -> float:
    g = torch.Generator().manual_seed(T)
    q, k, v = ((torch.randn(B, h, T, d, generator=g)).to(device=device, dtype=dtype).requires_grad_()
               for h in (H, K, K))
    weight = torch.randn(B, H, T, d, generator=g).to(device)

    def step():
        for t in (q, k, v):
            t.grad = None
        (call(kernel, q, k, v, window, sinks).float() * weight).sum().backward()

    return time_fn(step, warmup=warmup, iters=iters, device=device)


def math_bytes(B: int, H: int, T: int) -> int:
    """Rough peak of the reference: scores, probabilities, mask and their gradients, fp32."""
    return 5 * 4 * B * H * T * T


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=3, help="timed calls per cell (one at T >= 4k)")
    p.add_argument("--max-math-gb", type=float, default=4.0)
    args = p.parse_args(argv)
    chosen = device_and_dtype(args)
    if chosen is None:
        return 1
    device, dtype = chosen
    B, H, K, d, w = args.batch, args.heads, args.kv_heads, args.head_dim, args.window
    probe = torch.empty(1, H, min(args.lengths), d, device=device)
    chosen = attention.resolve(probe, probe[:, :K], causal=True, window=w, sinks=args.sinks)
    kernels = ["auto", *(["local"] if chosen != "local" else []), "sdpa_mask", "math", "sdpa causal"]
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device {device} ({torch.get_num_threads()} threads{load}), {args.dtype}, B={B}, H={H}, K={K}, "
          f"head_dim={d}, causal window={w}, sinks={args.sinks}, local block {attention.local_block(w)}; "
          f"forward + backward, median of {args.iters} (1 at T >= 4k); auto chooses `{chosen}` here")
    start = time.perf_counter()
    times: dict[str, dict[int, float]] = {}
    skipped = []
    for kernel in kernels:
        times[kernel] = {}
        for T in args.lengths:
            if kernel == "math" and math_bytes(B, H, T) / 1e9 > args.max_math_gb:
                skipped.append(f"math at T={T}: ~{math_bytes(B, H, T) / 1e9:.0f} GB > --max-math-gb")
                continue
            iters = args.iters if T < 4096 else 1
            times[kernel][T] = measure(kernel, B, H, K, T, d, w, args.sinks, device, dtype, iters,
                                       warmup=int(T == args.lengths[0] or device.type == "cuda"))
    header = f"{'kernel':<14}" + "".join(f"{'T=' + str(t):>18}" for t in args.lengths) + "   slope"
    print(header)
    print("-" * len(header))
    for kernel in kernels:
        cells = []
        for T in args.lengths:
            if T not in times[kernel]:
                cells.append(f"{'skipped':>18}")
                continue
            ratio = times[kernel][T] / times["auto"][T]
            cells.append(f"{times[kernel][T] * 1e3:>9.1f}ms (x{ratio:>4.1f})")
        s = slope(sorted(times[kernel].items()))
        name = f"auto: {chosen}" if kernel == "auto" else kernel
        print(f"{name:<14}" + "".join(cells) + (f"   T^{s:.2f}" if s is not None else "   -"), flush=True)
    print_skipped(skipped)
    print(f"(xN: time over auto's at the same T) total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
