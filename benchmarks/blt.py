"""Training step time of the Byte Latent Transformer (specs/blt.arch) vs the byte-level Llama
(specs/byte_llama.arch) at equal training FLOPs per byte.

Both read the same bytes. One timed step = forward + loss + backward + AdamW step + zero_grad
(benchmarks/step_time.py's `make_step`), the two models in interleaved rounds (order reversed every
other round, each call bracketed by a device sync) so drift in machine load falls on both alike.

FLOPs are the compiled models' own count (`compiled.flops`: forward matmul and attention FLOPs), for
a training step 3 x forward, except the BLT's entropy model, which only runs forward (its entropies
are detached). The BLT's count uses the patches it actually made on this batch (P, the padded patch
count of the batch, from its `lengths` output). An untrained entropy model is about equally unsure of
every byte, so the patching threshold is set to the entropy quantile that gives a mean patch length
of --patch bytes (4.5: the paper's) on this batch. The byte-level Llama is then sized to the BLT's
training FLOPs per byte: its width is given (--llama-d-model), its depth and MLP width solved, and
both figures are printed (they must agree within 10%).

Printed: each model's parameters, FLOPs per byte, median and fastest step, bytes/s, achieved TFLOP/s
and MFU against the measured matmul peak of this device and dtype; the ratio BLT / Llama of median
steps (goal <= 1.2: batching ragged patches must not cost more than the FLOPs it saves).

    python benchmarks/blt.py                                     # CPU, small sizes, about a minute
    python benchmarks/blt.py --device cuda --dtype bf16 --batch 8 --seq 2048 --d-local 512 \\
        --d-global 1536 --global-layers 12 --llama-d-model 1024
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
from archc.runtime.patching import entropy, threshold_for_mean_length  # noqa: E402
from archc.training.stages import train_flops  # noqa: E402
from benchmarks.step_time import (  # noqa: E402
    DTYPES,
    auto_threads,
    device_name,
    interleaved_many,
    load_warning,
    make_step,
    measured_peak,
    setup_device,
)

SPECS = ROOT / "specs"
GOAL = 1.2


def blt_sizes(args) -> dict:
    local_heads, global_heads = max(1, args.d_local // 64), max(1, args.d_global // 128)
    return {"d_local": args.d_local, "local_heads": local_heads, "local_hidden": args.d_local * 8 // 3 // 8 * 8,
            "encoder_layers": args.encoder_layers, "decoder_layers": args.decoder_layers,
            "d_global": args.d_global, "global_heads": global_heads,
            "global_hidden": args.d_global * 8 // 3 // 8 * 8, "global_layers": args.global_layers,
            "window": args.window}


def llama_sizes(d_model: int, layers: int, d_ff: int) -> dict:
    return {"d_model": d_model, "n_layers": layers, "n_heads": max(1, d_model // 64),
            "n_kv_heads": max(1, d_model // 128), "d_ff": d_ff}


def matched_llama(per_byte: float, d_model: int, batch: int, seq: int):
    """byte_llama.arch at width d_model with the fewest layers whose MLP width (a multiple of 64, at most
    4 x d_model) gives training FLOPs per byte closest to `per_byte`. FLOPs are linear in the depth and in
    the MLP width, so three compiled sizes give the solution."""
    def per_byte_of(layers, d_ff):
        compiled = archc.compile(SPECS / "byte_llama.arch", llama_sizes(d_model, layers, d_ff))
        return compiled, 3 * compiled.flops(batch, seq) / (batch * seq)

    one, wider, two = (per_byte_of(layers, d_ff)[1] for layers, d_ff in ((1, 64), (1, 128), (2, 64)))
    per_layer, per_width = two - one, (wider - one) / 64  # a layer at d_ff 64, one more unit of d_ff in a layer
    for layers in range(1, 257):
        d_ff = 64 + round(((per_byte - (one - per_layer)) / layers - per_layer) / per_width / 64) * 64
        if d_ff <= 4 * d_model:
            if d_ff < 64:
                break
            return per_byte_of(layers, d_ff)
    raise SystemExit(f"no byte-level Llama of width {d_model} matches {per_byte / 1e6:.1f} MFLOP per byte: "
                     "change --llama-d-model")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--threads", default="auto", help="torch CPU threads, or `auto` (1 on a loaded machine)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512, help="bytes per row")
    p.add_argument("--d-local", type=int, default=128)
    p.add_argument("--encoder-layers", type=int, default=1)
    p.add_argument("--decoder-layers", type=int, default=2)
    p.add_argument("--d-global", type=int, default=256)
    p.add_argument("--global-layers", type=int, default=4)
    p.add_argument("--window", type=int, default=512, help="the local layers' attention window")
    p.add_argument("--patch", type=float, default=4.5, help="mean patch length the threshold is set for")
    p.add_argument("--llama-d-model", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=None, help="stop timing after this many seconds")
    args = p.parse_args(argv)

    threads, note = auto_threads(args.threads, args.device)
    device = setup_device(args.device, threads)
    dtype = DTYPES[args.dtype]
    if note:
        print(note)
    data = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)

    torch.manual_seed(0)
    # the BLT's entropy model is blt_entropy.arch's EntropyLM (the same weight names): built first, it sets the
    # threshold the BLT is compiled with
    entropy_compiled = archc.compile(SPECS / "blt_entropy.arch")
    entropy_model = entropy_compiled.build(device=device).entropy_model
    with torch.no_grad():
        threshold = threshold_for_mean_length(entropy(entropy_model(data)), args.patch)
    blt_compiled = archc.compile(SPECS / "blt.arch", {**blt_sizes(args), "threshold": threshold})
    blt = blt_compiled.build(device=device)
    blt.entropy_model.load_state_dict(entropy_model.state_dict())
    with torch.no_grad():
        lengths = blt(data)["lengths"]
    patches = int(lengths.shape[1])
    real = lengths[lengths > 0]
    blt_flops = train_flops(blt_compiled, args.batch, args.seq, {"P": patches})
    blt_per_byte = blt_flops / (args.batch * args.seq)
    llama_compiled, llama_per_byte = matched_llama(blt_per_byte, args.llama_d_model, args.batch, args.seq)
    llama = llama_compiled.build(device=device)
    models = [m.to(device=device, dtype=dtype) for m in (blt, llama)]
    flops = [blt_flops, llama_per_byte * args.batch * args.seq]

    print(f"device: {device_name(device)}, {args.dtype}; batch {args.batch} x {args.seq} bytes")
    warning = load_warning(device)
    if warning:
        print(warning)
    peak, n = measured_peak(dtype, device)
    print(f"measured matmul peak ({n}x{n}, {args.dtype}): {peak / 1e12:.3f} TFLOP/s  (MFU below is against this)")
    print(f"BLT: d_local {args.d_local} x ({args.encoder_layers} encoder + {args.decoder_layers} decoder layers), "
          f"d_global {args.d_global} x {args.global_layers} layers; threshold {threshold:.4f}: mean patch "
          f"{real.float().mean().item():.2f} bytes (max {int(real.max())}), {patches} patches per row padded")
    ls = llama_compiled.params
    print(f"byte-level Llama: d_model {ls['d_model']}, {ls['n_layers']} layers, d_ff {ls['d_ff']}")
    mismatch = llama_per_byte / blt_per_byte - 1
    print(f"training FLOPs per byte: BLT {blt_per_byte / 1e6:.2f} M, Llama {llama_per_byte / 1e6:.2f} M "
          f"({mismatch:+.1%})")
    if abs(mismatch) > 0.10:
        raise SystemExit("the two models' FLOPs per byte differ by more than 10%: change --llama-d-model")

    steps = [make_step(m, data, True) for m in models]
    times = interleaved_many(steps, args.steps, args.warmup, device, budget_s=args.budget)
    header = f"{'model':<20}{'params':>14}{'median':>10}{'min':>10}{'bytes/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
    print(header)
    print("-" * len(header))
    for label, compiled, ts, fl in zip(("BLT", "byte-level Llama"), (blt_compiled, llama_compiled), times, flops):
        med = statistics.median(ts)
        print(f"{label:<20}{compiled.num_params():>14,}{med * 1e3:>8.1f}ms{min(ts) * 1e3:>8.1f}ms"
              f"{args.batch * args.seq / med:>12,.0f}{fl / med / 1e12:>10.3f}{fl / med / peak:>7.1%}")
    tb, tl = times
    ratio = statistics.median(tb) / statistics.median(tl)
    pairs = statistics.median(a / b for a, b in zip(tb, tl))
    verdict = f"OK (<= {GOAL})" if ratio <= GOAL else f"over the goal of {GOAL}"
    print(f"ratio BLT / Llama: {ratio:.3f} of medians -> {verdict}; median of per-round pairs {pairs:.3f}, "
          f"of minima {min(tb) / min(tl):.3f} ({len(tb)} rounds)")


if __name__ == "__main__":
    main()
