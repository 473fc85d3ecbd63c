"""Generated source: pinned by snapshots, deterministic, safe, and debuggable."""

from __future__ import annotations

import ast
import subprocess
import sys
import traceback

import pytest
import torch
from conftest import BUILT_SPECS, ROOT, SPECS

import archc

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
    text = (f'model M(tokens: Tokens[B, T]) {{ x = embedding(tokens, 16, 8)\n'
            f' y = mlp(x, hidden=8, act="{payload}")\n return y }}')
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
    text = ("param eps: float = 1e-7\n"
            "model M(tokens: Tokens[B, T]) { x = embedding(tokens, 16, 8)\n x = rms_norm(x, eps)\n return x }")
    assert "eps=1e-07" in archc.compile(text, name="n.arch").source


def test_one_builtin_called_from_two_lines_is_one_class_listing_both_lines():
    source = archc.compile(str(SPECS / "kimi_linear.arch")).source
    assert "class SwiGLU3(" not in source and "class MoE2(" not in source and "class GroupedExperts2(" not in source
    assert '"""The built-in `MoE` from kimi_linear.arch:28, kimi_linear.arch:39."""' in source
    # the merged class carries no per-line comments (they would belong to only one of its uses)
    moe = source.split("class MoE(")[1].split("\nclass ")[0]
    assert "# kimi_linear.arch" not in moe
    # a class used from one place keeps them
    assert "self.f_up = nn.Linear(32, 128, bias=False)  # kimi_linear.arch:24" in source


DIT = """
block DiTBlock(x: Tensor[B, T, 16], c: Tensor[B, T, 16]) {
    shift = linear(c, 16) as ada
    return x + shift * x
}
model M(x: Tensor[B, T, 16], c: Tensor[B, T, 16]) {
    y = DiTBlock(x, c) as dit
    return y
}
"""


def test_forward_arguments_follow_the_declaration_not_first_use():
    compiled = archc.compile(DIT, name="dit.arch")
    block = compiled.source.split("class DiTBlock(")[1].split("\nclass ")[0]
    assert "def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:" in block
    assert "self.dit(x, c)" in compiled.source
    torch.manual_seed(0)
    model = compiled.build()
    x, c = torch.randn(2, 3, 16), torch.randn(2, 3, 16)
    want = x + model.dit.ada(c) * x  # swapped arguments would compute c + ada(x) * c
    torch.testing.assert_close(model(x, c)["y"], want)
