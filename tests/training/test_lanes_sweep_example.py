"""examples/lanes_sweep.py runs at a tiny size and prints its table."""

from __future__ import annotations

import importlib.util

import torch
from conftest import ROOT


def test_lanes_sweep_example_runs_and_prints_a_table(tmp_path, corpus, capsys):
    spec = importlib.util.spec_from_file_location("lanes_sweep", ROOT / "examples" / "lanes_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tiny = dict(n_layers=4, d_model=16, n_heads=2, n_kv_heads=1, d_ff=32)
    threads = torch.get_num_threads()
    try:
        rows = module.main(steps=2, seeds=(0,), out=str(tmp_path), base=tiny, batch_size=2, seq_len=16, data=corpus)
    finally:
        torch.set_num_threads(threads)
    assert [r["name"] for r in rows] == list(module.VARIANTS)
    assert all(len(r["val_loss"]) == 1 and all(v > 0 for v in r["val_loss"]) for r in rows)
    engram = rows[-1]
    assert engram["active"] < engram["params"] and all(r["active"] == r["params"] for r in rows[:-1])
    table = capsys.readouterr().out
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(rows)  # the header and a row each
    assert "| baseline | " in table and " ± " in table
