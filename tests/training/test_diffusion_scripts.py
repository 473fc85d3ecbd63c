"""The DiT example and benchmark run end to end at toy sizes: the objectives table has a row per
objective and guidance scale with scores in range and writes its grid; the benchmark checks the
generated DiT against diffusers' (it exits on a mismatch) and prints the ratio."""

import importlib.util

import pytest
import torch
from conftest import ROOT


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_objectives_example_runs(tmp_path):
    module = _load(ROOT / "examples" / "diffusion_objectives.py", "diffusion_objectives")
    rows = module.main(steps=2, per_class=2, sample_steps=2, out=str(tmp_path / "runs"), grid=tmp_path / "grid.png")
    assert [(r[0].split()[0], r[1]) for r in rows] == [(o, s) for o in ("ε", "v", "flow") for s in (1.0, 3.0)]
    assert all(0 <= r[3] <= 1 and r[4] > 0 for r in rows)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (10 * 9 * 4 + 4, 6 * 9 * 4 + 4)  # 6 rows of digits 0-9


def test_dit_benchmark_runs(capsys):
    pytest.importorskip("diffusers")
    threads = torch.get_num_threads()
    try:
        _load(ROOT / "benchmarks" / "dit.py", "bench_dit").main(
            ["--threads", "1", "--d-model", "32", "--head-dim", "16", "--layers", "3", "--image-size", "8",
             "--batch", "2", "--steps", "2", "--warmup", "0"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "max |prediction diff| in fp32" in out and "ratio generated / diffusers" in out
