"""Every `arch` example in GRAMMAR.md parses; those marked *compiles* compile and run."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import ROOT

import archc
from archc.dsl import parse

FENCE = re.compile(r"(\*compiles\*\s*\n\s*\n)?```arch\n(.*?)```", re.S)
EXAMPLES = [(bool(m.group(1)), m.group(2)) for m in FENCE.finditer((ROOT / "GRAMMAR.md").read_text())]


def test_grammar_doc_has_examples_of_every_family():
    text = (ROOT / "GRAMMAR.md").read_text()
    assert len(EXAMPLES) >= 10
    for word in ("experts(", "kda(", "gated(", "lanes(", "patch(", "diffusion_loss("):
        assert word in text


@pytest.mark.parametrize("index", range(len(EXAMPLES)))
def test_every_example_parses(index):
    compiles, text = EXAMPLES[index]
    parse(text, f"GRAMMAR.md example {index}")


@pytest.mark.parametrize("index", [i for i, (c, _t) in enumerate(EXAMPLES) if c])
def test_compiling_examples_compile_and_run(index):
    _compiles, text = EXAMPLES[index]
    compiled = archc.compile(text, name=f"example{index}.arch")
    model = compiled.build()
    inputs = {}
    for node in compiled.ir.nodes():
        if node.op == "input":
            shape = [2 if d == "B" else 5 if isinstance(d, str) else d for d in node.shape]
            inputs[node.name] = torch.randint(0, 8, shape) if node.dtype == "long" else torch.randn(shape)
    outputs = model(**inputs)
    assert all(torch.isfinite(v).all() for v in outputs.values())
