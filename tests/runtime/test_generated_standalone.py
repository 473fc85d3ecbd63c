"""A generated module needs only torch and archc.runtime: it runs where lark and networkx cannot load."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT, SPECS

import archc

RUNNER = """
import importlib.abc, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lark", "networkx") or name.startswith(("archc.compiler", "archc.dsl")):
            raise ImportError(f"{name} must not load in a generated module")
        return None

sys.meta_path.insert(0, Refuse())
import torch
import generated
model = getattr(generated, sys.argv[1])()
tokens = torch.randint(0, 32, (2, 8))
out = model(tokens)
assert out["logits"].shape[:2] == (2, 8), out["logits"].shape
print("ran", sorted(m for m in sys.modules if m.startswith("archc")))
"""


@pytest.mark.parametrize("spec", ["llama", "deepseek_moe", "kimi_linear"])
def test_generated_module_runs_without_the_compiler(spec, tmp_path):
    compiled = archc.compile(SPECS / f"{spec}.arch", vocab=32, d_model=32, n_layers=2)
    (tmp_path / "generated.py").write_text(compiled.source)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "runner.py", compiled.class_name], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "archc.compiler" not in result.stdout and "ran" in result.stdout
