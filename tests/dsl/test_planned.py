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


# Every designed op is built today, so the mechanism is tested with made-up planned ops.
@pytest.fixture
def designed(monkeypatch):
    monkeypatch.setitem(PLANNED_OPS, "wormhole", "time travel")
    monkeypatch.setitem(PLANNED_OPS, "teleport", "time travel")
    monkeypatch.setitem(PLANNED_OPS, "warp", "faster than light")


SPEC = """param d: int = 8

model M(x: Tensor[B, T, d], tokens: Tokens[B, T]) {
    h = wormhole(x, n=4) as gate
    h = teleport(h, tokens, orders=[2, 3], slots=64) + teleport(h, tokens, orders=[4], slots=64)
    return warp(h)
}
"""


def test_every_planned_construct_is_named_once_at_its_first_use(designed):
    with pytest.raises(SpecError) as info:
        parse(SPEC, "bad.arch")
    found = [(e.span.line, e.span.column, e.message) for e in info.value.errors]
    assert found == [
        (4, 9, "`wormhole` is planned (issue: time travel) and not built yet"),
        (5, 9, "`teleport` is planned (issue: time travel) and not built yet"),
        (6, 12, "`warp` is planned (issue: faster than light) and not built yet"),
    ]
    teleport = next(e for e in info.value.errors if "`teleport`" in e.message)
    assert [(n, s.line, s.column) for n, s in teleport.notes] == [("also used here", 5, 56)]
    assert parse(SPEC, "bad.arch", unbuilt=True).blocks[0].name == "M"


def test_many_uses_of_one_construct_are_counted_not_listed(designed):
    lines = "".join(f"    y{i} = warp(x, n={i + 1})\n" for i in range(8))
    with pytest.raises(SpecError) as info:
        parse(f"model M(x: Tensor[B, N, 8]) {{\n{lines}    return y0\n}}\n", "bad.arch")
    (err,) = info.value.errors
    assert len(err.notes) == 4 and err.notes[-1] == ("and 4 more uses", None)


def test_a_block_of_the_same_name_is_not_planned(designed):
    module = parse("block warp(x: Tensor[B, T, 8]) {\n    return x\n}\n"
                   "model M(x: Tensor[B, T, 8]) {\n    return warp(x)\n}\n")
    assert not unbuilt(module)


def test_cli_prints_every_problem_and_their_count(designed, tmp_path, capsys):
    spec = tmp_path / "bad.arch"
    spec.write_text(SPEC)
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert err.count(": error: ") == 3 and err.rstrip().endswith("3 errors")
    assert "Traceback" not in err and err.count("^") >= 3
