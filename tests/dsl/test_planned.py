"""Constructs that are designed but not built: refused by name, all at once, and never out of date.

The tables in archc/dsl/planned.py must shrink as the compiler grows: a test
here fails while a built op, argument or type is still listed as planned.
"""

from __future__ import annotations

import pytest

from archc.cli import main
from archc.compiler import lower, ops
from archc.dsl import SpecError, parse
from archc.dsl.planned import PLANNED_ARGUMENTS, PLANNED_OPS, PLANNED_TYPES, unbuilt

BUILT_OPS = {name for name, op in ops.REGISTRY.items() if op.user} | set(ops.COMPOSITES)


def _arguments(op: str) -> set[str]:
    if op in ops.COMPOSITES:
        comp = ops.COMPOSITES[op]
        return {*comp.inputs, *comp.attrs}
    return {*ops.REGISTRY[op].inputs, *ops.REGISTRY[op].attrs}


def test_no_built_op_is_listed_as_planned():
    assert not set(PLANNED_OPS) & BUILT_OPS, "remove built ops from archc/dsl/planned.py"


def test_planned_arguments_belong_to_built_ops_and_are_not_built():
    for op, arg in PLANNED_ARGUMENTS:
        assert op in BUILT_OPS, op
        assert arg not in _arguments(op), f"`{arg}=` on `{op}` is built: remove it from PLANNED_ARGUMENTS"


def test_planned_types_are_not_built():
    assert not set(PLANNED_TYPES) & set(lower.TENSOR_KINDS)


SPEC = """param d: int = 8

model M(x: Tensor[B, T, d], tokens: Tokens[B, T]) {
    h = gated(x, n=4) as gate
    h = engram(h, tokens, orders=[2, 3], slots=64) + engram(h, tokens, orders=[4], slots=64)
    h = unpatch(h) + unpatch(h)
    patches = patch(h, by="entropy")
    return patches
}
"""


def test_every_planned_construct_is_named_once_at_its_first_use():
    with pytest.raises(SpecError) as info:
        parse(SPEC, "bad.arch")
    found = [(e.span.line, e.span.column, e.message) for e in info.value.errors]
    assert found == [
        (4, 9, "`gated` is planned (issue: gated paths) and not built yet"),
        (6, 9, "`unpatch` is planned (issue: byte patching) and not built yet"),
        (7, 15, "`patch` is planned (issue: byte patching) and not built yet"),
    ]
    unpatch = next(e for e in info.value.errors if "`unpatch`" in e.message)
    assert [(n, s.line, s.column) for n, s in unpatch.notes] == [("also used here", 6, 22)]
    assert parse(SPEC, "bad.arch", unbuilt=True).blocks[0].name == "M"


def test_many_uses_of_one_construct_are_counted_not_listed():
    lines = "".join(f"    y{i} = gated(x, n={i + 1})\n" for i in range(8))
    with pytest.raises(SpecError) as info:
        parse(f"model M(x: Tensor[B, N, 8]) {{\n{lines}    return y0\n}}\n", "bad.arch")
    (err,) = info.value.errors
    assert len(err.notes) == 4 and err.notes[-1] == ("and 4 more uses", None)


def test_a_block_of_the_same_name_is_not_planned():
    module = parse("block patch(x: Tensor[B, T, 8]) {\n    return x\n}\n"
                   "model M(x: Tensor[B, T, 8]) {\n    return patch(x)\n}\n")
    assert not unbuilt(module)


def test_cli_prints_every_problem_and_their_count(tmp_path, capsys):
    spec = tmp_path / "bad.arch"
    spec.write_text(SPEC)
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert err.count(": error: ") == 3 and err.rstrip().endswith("3 errors")
    assert "Traceback" not in err and err.count("^") >= 3
