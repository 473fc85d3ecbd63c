"""Training-step time of the archc-generated Llama vs the hand-written `LlamaFast`.

One step = forward + loss + backward + AdamW step + zero_grad. Both models are
built at the same config and carry identical weights: the reference's
Hugging Face names are mapped to archc's canonical (unfused) names and loaded
with `load_canonical`, and a forward pass checks the logits agree before
anything is timed. Steps are interleaved (ABBA order) so drift in machine load
hits both models alike; every timed step is bracketed by a device sync.

Prints per-step times (median, min), the ratio generated / reference (goal
<= 1.0), tokens/s, and MFU-style ratios: model FLOPs per step
(3 x `compiled.flops(batch, seq)`: forward matmul FLOPs, attention counted in
full although causal, backward = 2x forward) per second, over the measured
matmul peak of this device and dtype (`matmul_peak_flops`).

With `--models llama,gpt2` (the default) the same comparison also runs
for the generated GPT-2 vs the reference `GPT2` (HF Conv1D layout, weights
transposed when mapped; the reference's attention is the explicit-math one,
so this ratio also measures SDPA vs eager attention).

    python benchmarks/step_time.py                                   # CPU, < 90 s
    python benchmarks/step_time.py --device cuda --dtype bf16 --d-model 2048 --layers 16 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import archc  # noqa: E402
from archc.interop.weights import load_canonical  # noqa: E402
from benchmarks._measure import matmul_peak_flops, synchronize  # noqa: E402
from tests.reference_models import GPT2, GPT2Config, LlamaConfig, LlamaFast, next_token_loss  # noqa: E402

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


# ---- weight maps: HF names of the references -> archc canonical names ----------------------------

def llama_hf_to_canonical(hf_state: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {"embed.weight": hf_state["model.embed_tokens.weight"],
           "norm.weight": hf_state["model.norm.weight"]}
    if "lm_head.weight" in hf_state:
        out["head.weight"] = hf_state["lm_head.weight"]
    for i in range(n_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for a, b in (("self_attn.q_proj", "attn.q"), ("self_attn.k_proj", "attn.k"), ("self_attn.v_proj", "attn.v"),
                     ("self_attn.o_proj", "attn.o"), ("mlp.gate_proj", "mlp.gate"), ("mlp.up_proj", "mlp.up"),
                     ("mlp.down_proj", "mlp.down"), ("input_layernorm", "attn_norm"),
                     ("post_attention_layernorm", "mlp_norm")):
            out[f"{ours}{b}.weight"] = hf_state[f"{hf}{a}.weight"]
    return out


def gpt2_hf_to_canonical(hf_state: dict[str, torch.Tensor], n_layers: int, d_model: int) -> dict[str, torch.Tensor]:
    out = {"wte.weight": hf_state["transformer.wte.weight"], "wpe.weight": hf_state["transformer.wpe.weight"],
           "ln_f.weight": hf_state["transformer.ln_f.weight"], "ln_f.bias": hf_state["transformer.ln_f.bias"]}
    for i in range(n_layers):
        hf, ours = f"transformer.h.{i}.", f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            out[f"{ours}{ln}.weight"] = hf_state[f"{hf}{ln}.weight"]
            out[f"{ours}{ln}.bias"] = hf_state[f"{hf}{ln}.bias"]
        # Conv1D stores [in, out]; nn.Linear wants [out, in].
        w = hf_state[f"{hf}attn.c_attn.weight"].t()
        b = hf_state[f"{hf}attn.c_attn.bias"]
        for j, name in enumerate("qkv"):
            out[f"{ours}attn.{name}.weight"] = w[j * d_model:(j + 1) * d_model]
            out[f"{ours}attn.{name}.bias"] = b[j * d_model:(j + 1) * d_model]
        for a, c in (("attn.c_proj", "attn.o"), ("mlp.c_fc", "mlp.fc"), ("mlp.c_proj", "mlp.proj")):
            out[f"{ours}{c}.weight"] = hf_state[f"{hf}{a}.weight"].t()
            out[f"{ours}{c}.bias"] = hf_state[f"{hf}{a}.bias"]
    return out


# ---- building the pairs ----------------------------------------------------------------------------

def llama_pair(args, device, dtype):
    heads = args.heads or max(1, args.d_model // 64)
    kv_heads = args.kv_heads or max(1, heads // 2)
    d_ff = args.d_ff or 64 * ((8 * args.d_model // 3 + 63) // 64)
    compiled = archc.compile(ROOT / "specs" / "llama.arch", d_model=args.d_model, n_layers=args.layers,
                             n_heads=heads, n_kv_heads=kv_heads, d_ff=d_ff, vocab=args.vocab)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=d_ff,
                      num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=kv_heads)
    torch.manual_seed(0)
    ref = LlamaFast(cfg)
    gen = compiled.build()
    load_canonical(gen, compiled, llama_hf_to_canonical(ref.state_dict(), args.layers))
    desc = (f"Llama d_model={args.d_model} layers={args.layers} heads={heads} kv_heads={kv_heads} "
            f"d_ff={d_ff} vocab={args.vocab}")
    return compiled, gen.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype), desc


def gpt2_pair(args, device, dtype):
    heads = args.heads or max(1, args.d_model // 64)
    compiled = archc.compile(ROOT / "specs" / "gpt2.arch", d_model=args.d_model, n_layers=args.layers,
                             n_heads=heads, vocab=args.vocab, max_len=args.seq)
    cfg = GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model, n_layer=args.layers,
                     n_head=heads)
    torch.manual_seed(0)
    ref = GPT2(cfg)
    gen = compiled.build()
    load_canonical(gen, compiled, gpt2_hf_to_canonical(ref.state_dict(), args.layers, args.d_model))
    desc = f"GPT-2 d_model={args.d_model} layers={args.layers} heads={heads} d_ff={4 * args.d_model} vocab={args.vocab}"
    return compiled, gen.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype), desc


# ---- timing (shared with benchmarks/train_throughput.py and benchmarks/moe.py) -------------------

def make_step(model, tokens, generated: bool, lr: float = 1e-4, autocast: torch.dtype | None = None):
    """One full training step: forward (under `autocast` when given) + loss + backward + AdamW + zero_grad."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()

    def context():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(tokens.device.type, dtype=autocast)

    def step():
        with context():
            if generated:
                loss = model(tokens)["loss"]
            else:
                loss = next_token_loss(model(tokens), tokens)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


@torch.no_grad()
def check_same(gen, ref, tokens, dtype) -> str:
    """Max |logits difference| of the two models (same weights); exits on a clear mismatch in fp32."""
    gen.eval(), ref.eval()
    a = gen(tokens)["logits"].float()
    b = ref(tokens).float()
    diff = (a - b).abs().max().item()
    rel = diff / max(b.abs().max().item(), 1e-12)
    if dtype == torch.float32 and diff > 1e-4:
        raise SystemExit(f"generated and reference logits differ by {diff:.3g} in fp32: the weight map is wrong")
    note = "" if rel < 0.05 else "  WARNING: large for this dtype"
    return f"{diff:.2e} ({rel:.1e} of max |logit|){note}"


def interleaved_many(fns, steps: int, warmup: int, device, budget_s: float | None = None,
                     min_steps: int = 3) -> list[list[float]]:
    """Seconds of each call of each of `fns`, run in rounds: forward order, then reversed (ABBA for two).

    Rotating the order spreads drift in machine load over all functions alike; every timed call is
    bracketed by a device sync. With `budget_s`, stops after the round that exceeds it once
    `min_steps` rounds are done (so a loaded machine cannot stretch the run without bound)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    synchronize(device)
    out: list[list[float]] = [[] for _ in fns]
    start = time.perf_counter()
    for i in range(steps):
        order = list(range(len(fns))) if i % 2 == 0 else list(reversed(range(len(fns))))
        for j in order:
            synchronize(device)
            t0 = time.perf_counter()
            fns[j]()
            synchronize(device)
            out[j].append(time.perf_counter() - t0)
        if budget_s is not None and i + 1 >= min_steps and time.perf_counter() - start > budget_s:
            break
    return out


def interleaved(step_a, step_b, steps: int, warmup: int, device) -> tuple[list[float], list[float]]:
    ta, tb = interleaved_many((step_a, step_b), steps, warmup, device)
    return ta, tb


def setup_device(name: str, threads: int = 0) -> torch.device:
    """The torch device for `--device` (exits if CUDA is asked for but missing); TF32 allowed on CUDA."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device available")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def auto_threads(value: str, device) -> tuple[int, str | None]:
    """`--threads auto`: torch's default, or 1 when other processes already load this machine's CPUs.

    With every core busy, a parallel region waits for its slowest thread, and a descheduled one stalls
    each of the hundreds of small ops in a step (MoE steps slowed 10-50x that way here); one thread
    keeps the ratios meaningful. Returns (threads for `setup_device`, a note to print or None)."""
    if value != "auto":
        return int(value), None
    if torch.device(device).type != "cpu" or not hasattr(os, "getloadavg"):
        return 0, None
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if cpus > 1 and load > cpus - 0.5:
        return 1, (f"--threads auto: load average {load:.1f} on {cpus} CPUs before starting, so 1 thread "
                   f"(pass --threads N to override)")
    return 0, None


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def peak_size(device, dtype) -> int:
    """Side of the square matmul whose rate is the peak: large on CUDA; on CPU 1024 (512 for 16-bit
    dtypes, which CPUs without native bf16/fp16 run ~50x slower)."""
    if torch.device(device).type == "cuda":
        return 8192
    return 1024 if dtype == torch.float32 else 512


def measured_peak(dtype, device, seconds: float = 1.0) -> tuple[float, int]:
    n = peak_size(device, dtype)
    return matmul_peak_flops(dtype, n=n, device=device, seconds=seconds), n


def load_warning(device) -> str | None:
    """A warning when other processes compete for this machine's CPUs (timings then drift)."""
    if not hasattr(os, "getloadavg"):
        return None
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    busy = load > cpus + 0.5 if torch.device(device).type == "cpu" else load > cpus
    if busy:
        return (f"WARNING: load average {load:.1f} on {cpus} CPUs: other processes compete for the CPU, so timings "
                f"are noisy (ratios from interleaved steps hold up best; --threads 1 avoids idle-waiting threads)")
    return None


def make_tokens(args, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)


def time_pair(pair_fn, args, device, dtype, autocast: torch.dtype | None = None, budget_s: float | None = None):
    """Build a generated/reference pair with identical weights, check their logits, time interleaved
    training steps. Returns (compiled, ref, desc, logits diff, generated seconds, reference seconds)."""
    compiled, gen, ref, desc = pair_fn(args, device, dtype)
    tokens = make_tokens(args, device)
    diff = check_same(gen, ref, tokens, dtype)
    tg, tr = interleaved_many((make_step(gen, tokens, True, autocast=autocast),
                               make_step(ref, tokens, False, autocast=autocast)),
                              args.steps, args.warmup, device, budget_s=budget_s)
    return compiled, ref, desc, diff, tg, tr


def compare(name, pair_fn, args, device, dtype, peak) -> float:
    compiled, ref, desc, diff, tg, tr = time_pair(pair_fn, args, device, dtype)
    fwd = compiled.flops(args.batch, args.seq)
    train_flops = 3 * fwd
    print(f"\n== {name}: {desc}")
    print(f"   batch={args.batch} seq={args.seq} device={device} dtype={str(dtype).split('.')[-1]}  "
          f"params={compiled.num_params():,}  max |logits diff| before training = {diff}")
    print(f"   model FLOPs/step = 3 x fwd {fwd / 1e9:.2f} GFLOP = {train_flops / 1e9:.2f} GFLOP")
    tokens_per_step = args.batch * args.seq
    print(f"   per-step seconds ({args.steps} interleaved steps after {args.warmup} warmup)")
    print("     generated : " + " ".join(f"{t * 1e3:.1f}" for t in tg) + " ms")
    print("     reference : " + " ".join(f"{t * 1e3:.1f}" for t in tr) + " ms")
    header = f"   {'model':<22}{'median':>10}{'min':>10}{'tokens/s':>12}{'TFLOP/s':>10}{'MFU':>8}"
    print(header)
    print("   " + "-" * (len(header) - 3))
    for label, ts in ((f"generated ({compiled.class_name})", tg), (f"reference ({type(ref).__name__})", tr)):
        med = statistics.median(ts)
        rate = train_flops / med
        print(f"   {label:<22}{med * 1e3:>8.1f}ms{min(ts) * 1e3:>8.1f}ms{tokens_per_step / med:>12,.0f}"
              f"{rate / 1e12:>10.3f}{rate / peak:>7.1%}")
    ratio = statistics.median(tg) / statistics.median(tr)
    # per-pair ratios are robust to slow drift in machine load, minima to bursts of it
    pair_ratio = statistics.median(a / b for a, b in zip(tg, tr))
    min_ratio = min(tg) / min(tr)
    verdict = "OK (<= 1.0)" if ratio <= 1.0 else ("~parity (within 5%)" if ratio <= 1.05 else "SLOWER")
    print(f"   ratio generated/reference: {ratio:.3f} of medians -> {verdict}; "
          f"median of per-step pairs {pair_ratio:.3f}, of minima {min_ratio:.3f}")
    spread = max(max(tg) / min(tg), max(tr) / min(tr))
    if spread > 1.5:
        print(f"   WARNING: noisy timings (slowest/fastest step = {spread:.1f}x): the machine is busy; "
              f"trust the ratio of minima most, or rerun with more --steps")
    return ratio


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=0, help="default d_model // 64")
    ap.add_argument("--kv-heads", type=int, default=0, help="Llama only; default heads // 2")
    ap.add_argument("--d-ff", type=int, default=0, help="Llama only; default 8/3 d_model rounded up to 64")
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--models", default="llama,gpt2",
                    help="comma-separated: llama (vs LlamaFast), gpt2 (vs the eager reference GPT2)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args(argv)
    device = setup_device(args.device, args.threads)
    dtype = DTYPES[args.dtype]
    t0 = time.perf_counter()
    name = device_name(device)
    peak_n = peak_size(device, dtype)
    peak = matmul_peak_flops(dtype, n=peak_n, device=device)
    print(f"torch {torch.__version__} on {name}; measured matmul peak ({peak_n}^3, "
          f"{str(dtype).split('.')[-1]}): {peak / 1e12:.3f} TFLOP/s  (MFU below is against this)")
    pairs = {"llama": ("Llama", llama_pair), "gpt2": ("GPT-2", gpt2_pair)}
    for key in args.models.split(","):
        if key.strip() not in pairs:
            raise SystemExit(f"--models: unknown {key!r}; choose from {', '.join(pairs)}")
    for key in args.models.split(","):
        compare(*pairs[key.strip()], args, device, dtype, peak)
    again = matmul_peak_flops(dtype, n=peak_n, device=device)
    if abs(again - peak) > 0.2 * peak:
        print(f"\nNOTE: the matmul peak measured again at the end is {again / 1e12:.3f} TFLOP/s "
              f"({again / peak:.2f}x the first): the machine's load changed during the run, so MFU is approximate")
    print(f"\n(benchmark wall time {time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
