"""Training-step time of the DiT generated from specs/dit.arch vs diffusers' `DiTTransformer2DModel` of the
same configuration, with the same weights.

The diffusers model is built at the sizes asked for (learned variance: 2·C output channels, as DiT
trains), its weights drawn at random and saved with `save_pretrained`, and the generated model is
loaded from that directory through the import path (`archc.interop.hf.load_hf`, the DiT weight
map), so both hold identical weights; one forward checks their predictions agree before anything
is timed. One step, for either: draw times and noise for a batch of images (ε objective, linear
schedule), predict, MSE of the ε channels against the noise, backward, AdamW step, gradients cleared
— the generated model does all of it in its own forward (`add_noise` ... `diffusion_loss`), the
diffusers step with archc's runtime objective around the model. Steps are interleaved (ABBA) with a
device sync around each. Prints median step times, the ratio generated / diffusers (goal <= 1.0),
images/s and MFU: 3 × the compiler's forward matmul FLOPs per step over the measured matmul peak.

    python benchmarks/dit.py                                             # CPU, about a minute
    python benchmarks/dit.py --device cuda --dtype bf16 --d-model 768 --layers 12 --batch 64   # DiT-B/2
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from archc.interop.hf import load_hf  # noqa: E402
from archc.runtime.diffusion import add_noise, given_noise, make_objective, mean_flat_loss  # noqa: E402
from benchmarks._measure import matmul_peak_flops  # noqa: E402
from benchmarks.step_time import (  # noqa: E402
    DTYPES,
    auto_threads,
    device_name,
    interleaved_many,
    load_warning,
    peak_size,
    setup_device,
)


def build_pair(args, device, dtype):
    """(compiled, generated model, diffusers model) with the same weights, on `device` in `dtype`."""
    from diffusers import DiTTransformer2DModel

    heads = args.d_model // args.head_dim
    torch.manual_seed(0)
    ref = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=args.head_dim,
                                in_channels=args.channels, out_channels=2 * args.channels, num_layers=args.layers,
                                sample_size=args.image_size, patch_size=args.patch, num_embeds_ada_norm=1000)
    with torch.no_grad():  # adaLN-Zero starts at zero: random weights make the parity check mean something
        for p in ref.parameters():
            p.normal_(0.0, 0.02)
    with tempfile.TemporaryDirectory() as directory:
        ref.save_pretrained(directory)
        compiled, gen = load_hf(ROOT / "specs" / "dit.arch", directory)
    return compiled, gen.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype)


@torch.no_grad()
def check_same(gen, ref, images, labels, dtype) -> str:
    gen.eval(), ref.eval()
    x_t, t = torch.randn_like(images), torch.linspace(0, 999, images.shape[0], device=images.device)
    with given_noise(x_t, t.to(x_t.dtype)):
        out = gen(image=images, label=labels)
    a = torch.cat([out["pred"], out["sigma"]], dim=1).float()
    b = ref(x_t, timestep=t, class_labels=labels).sample.float()
    diff = (a - b).abs().max().item()
    if dtype == torch.float32 and diff > 1e-4:
        raise SystemExit(f"generated and diffusers predictions differ by {diff:.3g} in fp32: the import is wrong")
    return f"{diff:.2e} (of max |prediction| {b.abs().max().item():.2f})"


def make_step(model, images, labels, generated: bool, autocast: torch.dtype | None):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objective = make_objective("eps", schedule="linear")
    channels = images.shape[1]
    model.train()

    def context():
        return torch.autocast(images.device.type, dtype=autocast) if autocast else contextlib.nullcontext()

    def step():
        with context():
            if generated:
                loss = model(image=images, label=labels)["loss"]
            else:
                noised = add_noise(images, objective)
                pred = model(noised.x_t, timestep=objective.model_time(noised.t), class_labels=labels).sample
                loss = mean_flat_loss(pred[:, :channels], objective.target(noised.x0, noised.noise, noised.t))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                   help="bf16 / fp16: fp32 weights under autocast, as `archc train --dtype bfloat16`")
    p.add_argument("--threads", default="auto", help="torch CPU threads, or `auto` (1 on a loaded machine)")
    p.add_argument("--image-size", type=int, default=32, help="latent side (DiT at 256²: 32)")
    p.add_argument("--channels", type=int, default=4)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget", type=float, default=None, help="stop timing after this many seconds")
    args = p.parse_args(argv)

    threads, note = auto_threads(args.threads, args.device)
    device = setup_device(args.device, threads)
    dtype = DTYPES[args.dtype]
    autocast = None if dtype == torch.float32 else dtype
    if note:
        print(note)
    start = time.perf_counter()
    peak_n = peak_size(device, dtype)
    peak = matmul_peak_flops(dtype, n=peak_n, device=device)
    print(f"torch {torch.__version__} on {device_name(device)}; measured matmul peak ({peak_n}^3, {args.dtype}): "
          f"{peak / 1e12:.3f} TFLOP/s (MFU below is against this)")
    compiled, gen, ref = build_pair(args, device, torch.float32)  # fp32 weights; bf16 runs under autocast
    gen, ref = gen.to(device), ref.to(device)
    g = torch.Generator().manual_seed(1)
    images = (torch.rand(args.batch, args.channels, args.image_size, args.image_size, generator=g) * 2 - 1).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(device)
    diff = check_same(gen, ref, images, labels, torch.float32)
    tokens = (args.image_size // args.patch) ** 2
    print(f"DiT d_model {args.d_model}, {args.layers} layers, {args.d_model // args.head_dim} heads, "
          f"{args.image_size}²×{args.channels} latents in {args.patch}×{args.patch} patches ({tokens} tokens), "
          f"learned variance, batch {args.batch}, {args.dtype}; {compiled.num_params():,} parameters; "
          f"max |prediction diff| in fp32 {diff}")
    warning = load_warning(device)
    if warning:
        print(warning)
    times = interleaved_many([make_step(gen, images, labels, True, autocast),
                              make_step(ref, images, labels, False, autocast)],
                             args.steps, args.warmup, device, budget_s=args.budget)
    train_flops = 3 * compiled.flops(args.batch, tokens)
    print(f"model FLOPs/step = 3 x forward {train_flops / 3e9:.2f} GFLOP; {len(times[0])} interleaved steps "
          f"after {args.warmup} warmup")
    print(f"{'model':<32}{'median':>10}{'min':>10}{'images/s':>10}{'MFU':>8}")
    for label, ts in (("generated (specs/dit.arch)", times[0]), ("diffusers DiTTransformer2DModel", times[1])):
        med = statistics.median(ts)
        print(f"{label:<32}{med * 1e3:>8.1f}ms{min(ts) * 1e3:>8.1f}ms{args.batch / med:>10.1f}"
              f"{train_flops / med / peak:>8.1%}")
    ratio = statistics.median(times[0]) / statistics.median(times[1])
    pairs = statistics.median(a / b for a, b in zip(*times))
    verdict = "OK (<= 1.0)" if ratio <= 1.0 else ("~parity (within 5%)" if ratio <= 1.05 else "SLOWER")
    print(f"ratio generated / diffusers: {ratio:.3f} of medians -> {verdict}; median of per-step ratios {pairs:.3f}, "
          f"of minima {min(times[0]) / min(times[1]):.3f}")
    print(f"(benchmark wall time {time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
