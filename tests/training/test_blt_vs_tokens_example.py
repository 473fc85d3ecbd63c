"""examples/blt_vs_tokens.py runs at a tiny size and prints its table: three rows, finite bits per byte."""

from __future__ import annotations

import importlib.util
import math

import torch
from conftest import ROOT


def test_blt_vs_tokens_example_runs_and_prints_a_table(tmp_path, corpus, capsys):
    spec = importlib.util.spec_from_file_location("blt_vs_tokens", ROOT / "examples" / "blt_vs_tokens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    llama = dict(d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32)
    blt = {"d_local": 16, "local_heads": 2, "local_hidden": 32, "encoder_layers": 1, "decoder_layers": 1,
           "d_global": 32, "global_heads": 2, "global_hidden": 64, "global_layers": 1, "buckets": 101,
           "blt_entropy.e_dim": 16, "blt_entropy.e_layers": 1, "blt_entropy.e_heads": 2, "blt_entropy.e_hidden": 32}
    threads = torch.get_num_threads()
    try:
        rows = module.main(steps=8, entropy_steps=1, patch=2.0, bpe_vocab=300, batch_size=2, seq_len=16,
                           out=str(tmp_path), byte_llama=llama, bpe_llama=llama, blt=blt, data=corpus)
    finally:
        torch.set_num_threads(threads)
    assert [r["name"] for r in rows] == ["byte-level Llama", "BPE Llama (bpe:300)", "BLT"]
    assert all(math.isfinite(r["bpb"]) and r["bpb"] > 0 for r in rows)
    budget = rows[0]["flops"]
    assert all(abs(r["flops"] / budget - 1) < 0.5 for r in rows)  # toy sizes: few steps, coarse matching
    assert rows[2]["patch"] >= 1 and rows[0]["patch"] is None
    table = capsys.readouterr().out
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(rows)  # the header and a row each
    for line, row in zip(lines[1:], rows):
        assert line.startswith(f"| {row['name']} | ") and f"| {row['bpb']:.4f} |" in line
