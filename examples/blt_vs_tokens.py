"""BLT vs a byte-level Llama vs a BPE Llama, at equal training FLOPs on the same built-in text.

The comparison the BLT paper makes, at toy scale: the Byte Latent Transformer (specs/blt.arch, with its
entropy model specs/blt_entropy.arch), the byte-level Llama baseline (specs/byte_llama.arch) and a Llama
over a BPE tokenizer trained on the same corpus (specs/llama.arch, `bpe:N`), each trained on the same
built-in text with the same batch shape (batch x seq_len tokens: bytes for the two byte models, BPE tokens
for the Llama, which so reads more bytes per step) for the number of steps that spends one training-FLOP
budget: the byte-level Llama's steps x its FLOPs per step. Run:

    .venv/bin/python examples/blt_vs_tokens.py    # 2.5 minutes on two busy CPU cores (README: its table)

Training FLOPs are the compiled models' own count (`compiled.flops`, forward; a training step is 3 x that).
The BLT's count includes its entropy model: stage 1 trains it (3 x forward per step, counted against the
budget), stage 2 runs it forward only (1 x, it is frozen), and the rest of the BLT's count uses the padded
patch count P of its training batches. P depends on the trained entropy model, so after stage 1 the patching
threshold is set to the entropy quantile that gives a mean patch length of `patch` bytes on training batches
(`archc.runtime.patching.threshold_for_mean_length`), P is measured on those batches, and the BLT's steps are
what is left of the budget divided by its FLOPs per step (`archc.training.stages.train_flops`). Validation
bits per byte (total nats / UTF-8 bytes scored / ln 2) is comparable across tokenizers; wall time is the whole
run (data, compile, train, evaluate) on one thread.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import attrs
import torch

import archc
from archc.runtime.patching import entropy, threshold_for_mean_length
from archc.training import data as data_mod
from archc.training import stages
from archc.training.train import TrainConfig, train

SPECS = Path(__file__).resolve().parent.parent / "specs"
BYTE_LLAMA = dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=172)
BPE_LLAMA = dict(d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=172)
BLT = {"d_local": 32, "local_heads": 2, "local_hidden": 96, "encoder_layers": 1, "decoder_layers": 1,
       "d_global": 128, "global_heads": 4, "global_hidden": 344, "global_layers": 3,
       "blt_entropy.e_dim": 32, "blt_entropy.e_layers": 1, "blt_entropy.e_heads": 2, "blt_entropy.e_hidden": 96}


def main(steps: int = 1000, entropy_steps: int = 250, patch: float = 4.0, bpe_vocab: int = 1024,
         batch_size: int = 8, seq_len: int = 128, out: str = "runs/blt_vs_tokens", byte_llama: dict | None = None,
         bpe_llama: dict | None = None, blt: dict | None = None, threads: int | None = 1,
         data: str = "pydoc") -> list[dict]:
    """Train the three models; `steps` is the byte-level Llama's, and sets the FLOP budget of all three."""
    if threads is not None:  # on a shared two-core machine, intra-op threads fight the other processes
        torch.set_num_threads(threads)
    byte_llama = dict(BYTE_LLAMA if byte_llama is None else byte_llama)
    bpe_llama = dict(BPE_LLAMA if bpe_llama is None else bpe_llama)
    blt = dict(BLT if blt is None else blt)
    batch, seq = batch_size, seq_len
    config = TrainConfig(data=data, batch_size=batch, seq_len=seq, eval_batches=8, sample_tokens=0, progress=False)

    def run(name, spec, overrides, run_steps, **options):
        metrics: dict = {}
        run_config = attrs.evolve(config, steps=run_steps, eval_every=run_steps, checkpoint_every=run_steps,
                                  out_dir=f"{out}/{name}", **options)
        train(SPECS / spec, run_config, overrides, on_step=metrics.update, overwrite=True)
        return metrics

    rows = []
    # the byte-level Llama sets the budget
    start = time.perf_counter()
    compiled = archc.compile(SPECS / "byte_llama.arch", byte_llama)
    budget = stages.train_flops(compiled, batch, seq) * steps
    metrics = run("byte_llama", "byte_llama.arch", byte_llama, steps)
    rows.append(_row("byte-level Llama", compiled, steps, budget, metrics, batch * seq * steps, start))
    print(_line(rows[-1]), flush=True)

    # the BPE Llama: a BPE token is several bytes, so the same FLOPs buy more bytes
    start = time.perf_counter()
    dataset = data_mod.make_dataset(data, f"bpe:{bpe_vocab}", seed=config.seed)
    bytes_per_token = _bytes_per_token(dataset)
    bpe_llama = {**bpe_llama, "vocab": dataset.vocab_size}
    compiled = archc.compile(SPECS / "llama.arch", bpe_llama)
    per_step = stages.train_flops(compiled, batch, seq)
    bpe_steps = max(1, round(budget / per_step))
    metrics = run("bpe_llama", "llama.arch", bpe_llama, bpe_steps, tokenizer=f"bpe:{bpe_vocab}")
    rows.append(_row(f"BPE Llama (bpe:{bpe_vocab})", compiled, bpe_steps, per_step * bpe_steps, metrics,
                     round(batch * seq * bpe_steps * bytes_per_token), start))
    print(_line(rows[-1]), flush=True)

    # the BLT: stage 1 trains the entropy model, then the threshold and the patch count P set its steps
    start = time.perf_counter()
    compiled = archc.compile(SPECS / "blt.arch", blt)
    stage = stages.first_stage(compiled)
    entropy_compiled = archc.compile(stage.spec, stage.overrides)
    entropy_flops = stages.train_flops(entropy_compiled, batch, seq) * entropy_steps
    run("blt_entropy", stage.spec.name, stage.overrides, entropy_steps)
    weights = Path(out) / "blt_entropy"
    windows = torch.cat([data_mod.Batches(data_mod.make_dataset(data, "byte", seed=config.seed).train, batch, seq,
                                          config.seed).get(i) for i in range(4)])
    model = compiled.build(check_memory=False)
    stages.load_frozen(stage, weights)(compiled, model)
    with torch.no_grad():
        threshold = threshold_for_mean_length(entropy(model.get_submodule(stage.path)(windows)), patch)
    blt = {**blt, "threshold": threshold}
    compiled = archc.compile(SPECS / "blt.arch", blt)
    model = compiled.build(check_memory=False)
    stages.load_frozen(stage, weights)(compiled, model)
    with torch.no_grad():
        patches = [int(model(part)["lengths"].shape[1]) for part in windows.split(batch)]
    per_step = stages.train_flops(compiled, batch, seq, {"P": round(sum(patches) / len(patches))})
    blt_steps = math.floor((budget - entropy_flops) / per_step)
    if blt_steps < 1:
        raise SystemExit(f"the entropy model's {entropy_steps} steps leave less than one BLT step of the budget: "
                         "give fewer entropy_steps or more steps")
    metrics = run("blt", "blt.arch", blt, blt_steps, entropy_checkpoint=str(weights))
    rows.append(_row("BLT", compiled, f"{entropy_steps}+{blt_steps}", entropy_flops + per_step * blt_steps,
                     metrics, batch * seq * blt_steps, start))
    print(_line(rows[-1]), flush=True)

    print(f"\n{data}, batches of {batch} x {seq} tokens (bytes; BPE tokens for the BPE Llama, "
          f"{bytes_per_token:.2f} bytes each); budget {budget / 1e12:.3f} TFLOP = the byte-level Llama's "
          f"{steps} steps x 3 x its forward FLOPs; the BPE Llama's steps spend the same; the BLT's count its "
          f"entropy model ({entropy_steps} steps of stage 1, 3 x forward; 1 x forward in stage 2, frozen) and "
          f"the patch count of its training batches (threshold {threshold:.3f} nats: mean patch {patch} bytes "
          f"there, {sum(patches) / len(patches):.0f} patches per row padded)")
    print(_table(rows))
    return rows


def _bytes_per_token(dataset) -> float:
    lengths = torch.tensor(dataset.tokenizer.byte_lengths())
    return float(lengths[torch.as_tensor(dataset.train[:200_000])].float().mean())


def _row(name, compiled, steps, flops, metrics, trained_bytes, start) -> dict:
    return {"name": name, "params": compiled.num_params(), "steps": steps, "flops": flops,
            "bytes": trained_bytes, "bpb": metrics["val_bits_per_byte"],
            "patch": metrics.get("val_patch_length_mean"), "seconds": time.perf_counter() - start}


def _line(row: dict) -> str:
    return f"{row['name']:24s} val bits per byte {row['bpb']:.4f}  ({row['seconds']:.0f} s)"


def _table(rows: list[dict]) -> str:
    """A Markdown table: parameters, steps, training FLOPs and bytes, validation bits per byte, mean patch, time."""
    lines = ["| model | params | steps | training TFLOP | bytes trained | val bits per byte | mean patch (bytes) "
             "| wall s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        patch = "—" if row["patch"] is None else f"{row['patch']:.2f}"
        lines.append(f"| {row['name']} | {row['params']:,} | {row['steps']} | {row['flops'] / 1e12:.3f} | "
                     f"{row['bytes']:,} | {row['bpb']:.4f} | {patch} | {row['seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
