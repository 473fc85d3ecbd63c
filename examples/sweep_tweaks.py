"""Compare architecture tweaks by validation perplexity before committing to a long run.

The research loop the compiler is built for: compile variants of one spec,
train each briefly on the same data with the same seed, and compare. Run:

    .venv/bin/python examples/sweep_tweaks.py            # ~2 minutes on two CPU cores
"""

from __future__ import annotations

from pathlib import Path

import attrs

import archc
from archc.training.train import TrainConfig, train

SPEC = Path(__file__).resolve().parent.parent / "specs" / "llama.arch"
BASE = dict(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=176)
VARIANTS = {
    "baseline (GQA 4:2)": {},
    "multi-query (4:1)": {"n_kv_heads": 1},
    "wider MLP": {"d_ff": 256},
}


def main(steps: int = 120, out: str = "runs/sweep") -> list[tuple]:
    config = TrainConfig(steps=steps, batch_size=8, seq_len=128, eval_every=max(1, steps // 2), eval_batches=8,
                         sample_tokens=0, progress=False)
    rows = []
    for name, tweak in VARIANTS.items():
        overrides = {**BASE, **tweak}
        compiled = archc.compile(SPEC, overrides)
        result = train(SPEC, attrs.evolve(config, out_dir=f"{out}/{name.split()[0]}"), overrides, overwrite=True)
        rows.append((name, compiled.num_params(), result.val_perplexity, result.tokens_per_second))
        print(f"{name:22s} params {rows[-1][1]:>9,}  val ppl {rows[-1][2]:7.3f}  {rows[-1][3]:8,.0f} tok/s")
    best = min(rows, key=lambda r: r[2])
    print(f"\nbest: {best[0]} (val perplexity {best[2]:.3f})")
    return rows


if __name__ == "__main__":
    main()
