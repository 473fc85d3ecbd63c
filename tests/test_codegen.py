"""Generated source: pinned by snapshots, deterministic, safe, and debuggable."""

from __future__ import annotations

import ast
import subprocess
import sys
import traceback

import pytest
import torch

import archc
from conftest import BUILT_SPECS, ROOT, SPECS

SPEC_FILES = [p.name for p in BUILT_SPECS]


@pytest.mark.parametrize("spec", SPEC_FILES, ids=[s.removesuffix(".arch") for s in SPEC_FILES])
def test_generated_source_snapshot(spec, snapshot_py):
    compiled = archc.compile(str(SPECS / spec))
    assert compiled.source == snapshot_py


def test_unfused_source_snapshot(snapshot_py):
    compiled = archc.compile(str(SPECS / "llama.arch"), disable=("fuse_projections",))
    assert "qkv" not in compiled.source
    assert compiled.source == snapshot_py


@pytest.mark.parametrize("spec", SPEC_FILES)
def test_same_spec_gives_byte_identical_source_across_processes(spec):
    # A fresh interpreter has a different hash seed: any set iteration would show.
    code = f"import archc; print(archc.compile({str(SPECS / spec)!r}).source, end='')"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(seed), "PATH": ""}, cwd=ROOT).stdout
            for seed in (1, 2)}
    assert len(runs) == 1
    assert runs.pop() == archc.compile(str(SPECS / spec)).source


@pytest.mark.parametrize("spec", SPEC_FILES)
def test_generated_source_imports_only_torch_and_archc(spec):
    tree = ast.parse(archc.compile(str(SPECS / spec)).source)
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots <= {"torch", "archc", "__future__"}


def test_identical_layers_share_one_class_and_a_loop():
    source = archc.compile(str(SPECS / "llama.arch"), n_layers=6).source
    assert source.count("class DecoderLayer(") == 1
    assert "nn.ModuleList([DecoderLayer() for _ in range(6)])" in source
    assert "for layer in self.layers:" in source


def test_repeat_conditions_make_distinct_classes():
    text = """
    block Dense(x: Tensor[B, T, 32]) { x += mlp(x, hidden=64) \n return x }
    block Wide(x: Tensor[B, T, 32]) { x += mlp(x, hidden=128) \n return x }
    model M(tokens: Tokens[B, T]) {
        x = embedding(tokens, 16, 32)
        repeat i in 0..4 as layers {
            if i % 2 == 0 { x = Dense(x) } else { x = Wide(x) }
        }
        return x
    }
    """
    compiled = archc.compile(text, name="alt.arch")
    assert "nn.ModuleList([Dense(), Wide(), Dense(), Wide()])" in compiled.source
    out = compiled.build()(torch.randint(0, 16, (2, 5)))
    assert out["x"].shape == (2, 5, 32)


def test_tracebacks_show_generated_lines():
    text = """
    model M(tokens: Tokens[B, T]) {
        x = embedding(tokens, 16, 8) as emb
        return x
    }
    """
    model = archc.compile(text, name="tb.arch").build()
    try:
        model(torch.full((1, 3), 99))  # out of range for the embedding
    except IndexError:
        text = traceback.format_exc()
    else:  # pragma: no cover
        pytest.fail("expected an IndexError")
    assert "<archc:M:" in text
    assert "x = self.emb(tokens)" in text  # linecache shows the generated line


HOSTILE_STRINGS = [
    '"); import os; os.system(\\"echo pwned\\")  #',
    "\\n\\nimport os\\n",
    "'''",
    '\\"\\"\\"',
    "__import__('os')",
]


@pytest.mark.parametrize("payload", HOSTILE_STRINGS)
def test_hostile_strings_never_become_code(payload):
    # Strings reach only validated attributes; one that is not allowed is an error,
    # never text in the output.
    text = f'model M(tokens: Tokens[B, T]) {{ x = embedding(tokens, 16, 8)\n y = mlp(x, hidden=8, act="{payload}")\n return y }}'
    with pytest.raises(archc.SpecError) as err:
        archc.compile(text, name="evil.arch")
    assert "act" in err.value.message


HOSTILE_NAMES = ["__class__", "forward", "training", "self", "import", "lambda", "exec"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_are_rejected_or_renamed(name):
    text = f"model M(tokens: Tokens[B, T]) {{ x = embedding(tokens, 16, 8) as {name}\n return x }}"
    try:
        compiled = archc.compile(text, name="evil.arch")
    except archc.SpecError:
        return
    source = compiled.source
    ast.parse(source)  # still valid Python
    model = compiled.build()
    assert model(torch.zeros(1, 2, dtype=torch.long))["x"].shape == (1, 2, 8)


def test_numbers_are_emitted_with_repr():
    text = "param eps: float = 1e-7\nmodel M(tokens: Tokens[B, T]) { x = embedding(tokens, 16, 8)\n x = rms_norm(x, eps)\n return x }"
    assert "eps=1e-07" in archc.compile(text, name="n.arch").source
