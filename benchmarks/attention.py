"""Forward + backward time of Native Sparse Attention vs full causal SDPA, measured in one run.

At T = 2k, 8k and 32k tokens (B=1, 16 query heads sharing one KV head — the paper's GQA group of
16, which its group-centric selection needs —, head_dim 64, and the paper's NSA sizes: compression
blocks of 32 every 16 tokens with the MLP compressor, top-16 selection blocks of 64 tokens, a
512-token window; RoPE on):

- `nsa/<kernel>`: the NSA core module (`archc.runtime.nsa.NSACore`: RoPE, the compressor, the three
  gated branches) on q, the three branches' keys and values, and gates — the gather path on the CPU,
  and on CUDA also the Triton selection kernel;
- `sdpa`: causal `F.scaled_dot_product_attention` on q, k, v of the same shapes (GQA).

On CUDA the run first prints the relative difference of the Triton and gather outputs.

One call = forward, sum of the output times a fixed random tensor, backward to all inputs (and the
compressor's weights); the median of --iters timed calls after one warm-up at the first length.
A cell is skipped, with the reason printed, when its time predicted from the shorter lengths (as
T^2 for SDPA, T^1.3 for NSA, whose compression branch grows as T²/16) exceeds --max-cell-s, or its
memory estimate exceeds --max-gb. The ratio column is SDPA time / NSA time (> 1: NSA is faster).

    python benchmarks/attention.py --threads 1           # CPU, ~4 minutes (SDPA at 32k alone ~2.5)
    python benchmarks/attention.py --device cuda --dtype bf16 --lengths 2048 8192 32768 65536
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

from archc.kernels.nsa import CHUNK_FLOATS  # noqa: E402
from archc.runtime.nsa import NSACore  # noqa: E402
from benchmarks._measure import add_device_args, device_and_dtype, print_skipped, time_fn  # noqa: E402
from benchmarks.mixers import slope  # noqa: E402

GROWTH = {"sdpa": 2.0, "nsa": 1.3}  # exponents used to predict a skipped cell's time


def make_inputs(B, T, HQ, H, D, device, dtype):
    g = torch.Generator(device="cpu").manual_seed(T)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype).requires_grad_()

    q = rand(B, T, HQ * D)
    kvs = [rand(B, T, H * D) for _ in range(6)]  # k, v of compression, selection, window
    gates = torch.sigmoid(torch.randn(B, T, HQ * 3, generator=g)).to(device=device, dtype=dtype).requires_grad_()
    return q, kvs, gates


def nsa_call(core, q, kvs, gates):
    return core(q, *kvs, gates)


def sdpa_call(q, kvs, HQ, H, D):
    B, T, _ = q.shape
    qh = q.view(B, T, HQ, D).transpose(1, 2)
    kh, vh = (x.view(B, T, H, D).transpose(1, 2) for x in kvs[2:4])
    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)


def estimate_gb(kind: str, B, T, HQ, H, D, top_n, select_block, window, stride) -> float:
    """Rough peak bytes of one forward + backward: inputs, outputs and grads, plus each path's work space."""
    io = 4 * B * T * (HQ * D * 3 + 6 * H * D) * 3
    if kind == "sdpa":  # the CPU kernels tile the scores; the math fallback would hold [B, H, T, T]
        return (io + 4 * B * HQ * T * 64 * 4) / 1e9
    # the gather path: three branch outputs and their gradients, the selection's block tables and their
    # gradients, the window's blocked keys (attention_local), one chunk's work space, the selected blocks
    branches = 4 * B * T * (HQ * D * 6 + H * D * 4 + H * D * 2 * 5)
    return (io + branches + 4 * CHUNK_FLOATS * 4 + 8 * B * T * H * top_n) / 1e9


def check_triton(B, T, HQ, H, D, sizes, device, dtype) -> float:
    """||o_triton - o_gather|| / ||o_gather|| of one NSA core on the same inputs and weights."""
    q, kvs, gates = make_inputs(B, T, HQ, H, D, device, dtype)
    outs = []
    with torch.no_grad():
        for kernel in ("triton", "gather"):
            torch.manual_seed(0)
            core = NSACore(HQ, H, D, **sizes, kernel=kernel).to(device=device, dtype=dtype)
            outs.append(nsa_call(core, q, kvs, gates).float())
    return ((outs[0] - outs[1]).norm() / outs[1].norm()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(p)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--iters", type=int, default=2, help="timed calls per cell (one at T >= 8k)")
    p.add_argument("--max-cell-s", type=float, default=180.0, help="skip a cell predicted to take longer")
    p.add_argument("--max-gb", type=float, default=12.0, help="skip a cell estimated to need more memory")
    args = p.parse_args(argv)
    chosen = device_and_dtype(args)
    if chosen is None:
        return 1
    device, dtype = chosen
    B, HQ, H, D = args.batch, args.heads, args.kv_heads, args.head_dim
    sizes = dict(block=32, stride=16, select_block=64, top_n=16, window=512)
    kernels = ["gather", *(["triton"] if device.type == "cuda" else [])]
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"device {device} ({torch.get_num_threads()} threads{load}), {args.dtype}, B={B}, heads={HQ}, "
          f"kv_heads={H}, head_dim={D}; NSA block 32 / stride 16, top-16 blocks of 64, window 512, MLP compressor")
    print(f"forward + backward, median of {args.iters} (1 at T >= 8k)")
    start = time.perf_counter()
    if "triton" in kernels:
        err = check_triton(B, args.lengths[0], HQ, H, D, sizes, device, dtype)
        print(f"triton vs gather at T={args.lengths[0]}: relative error {err:.2e}")
    rows = {f"nsa/{k}": [] for k in kernels} | {"sdpa": []}
    cells = {name: [] for name in rows}
    skipped = []
    for T in args.lengths:
        q, kvs, gates = make_inputs(B, T, HQ, H, D, device, dtype)
        weight = torch.randn(B, T, HQ * D, device=device)
        iters = 1 if T >= 8192 else args.iters
        for name in rows:
            kind = name.split("/")[0]
            points = rows[name]
            predicted = points[-1][1] * (T / points[-1][0]) ** GROWTH[kind] if points else 0.0
            gb = estimate_gb(kind, B, T, HQ, H, D, sizes["top_n"], sizes["select_block"], sizes["window"],
                             sizes["stride"])
            if predicted > args.max_cell_s or gb > args.max_gb:
                why = (f"predicted {predicted:.0f} s > {args.max_cell_s:.0f} s" if predicted > args.max_cell_s
                       else f"~{gb:.0f} GB > {args.max_gb:.0f} GB")
                skipped.append(f"{name} at T={T}: {why}")
                cells[name].append(None)
                continue
            if kind == "nsa":
                torch.manual_seed(0)
                core = NSACore(HQ, H, D, **sizes, kernel=name.split("/")[1]).to(device=device, dtype=dtype)
                fn = lambda: nsa_call(core, q, kvs, gates)  # noqa: E731
            else:
                fn = lambda: sdpa_call(q, kvs, HQ, H, D).transpose(1, 2).reshape(B, T, HQ * D)  # noqa: E731

            def step(fn=fn):
                for x in (q, gates, *kvs):
                    x.grad = None
                out = fn()
                (out.float() * weight).sum().backward()

            seconds = time_fn(step, warmup=int(T == args.lengths[0]), iters=iters, device=device)
            points.append((T, seconds))
            cells[name].append(seconds)
    width = 12
    header = f"{'kernel':<14}" + "".join(f"{'T=' + str(t):>{width}}" for t in args.lengths) + "   slope"
    print(header)
    print("-" * len(header))
    for name, values in cells.items():
        s = slope(rows[name])
        text = "".join(f"{v * 1e3:>{width - 2}.0f}ms" if v is not None else f"{'skipped':>{width}}" for v in values)
        print(f"{name:<14}{text}" + (f"   T^{s:.2f}" if s is not None else "   -"))
    for name in cells:
        if name == "sdpa":
            continue
        ratios = [f"{s / n:>{width - 1}.2f}x" if s is not None and n is not None else f"{'-':>{width}}"
                  for s, n in zip(cells["sdpa"], cells[name])]
        print(f"{'sdpa/' + name:<14}" + "".join(ratios) + "   (> 1: NSA faster)")
    print_skipped(skipped)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
