"""The name resolver: every unknown name in a spec in one run, suggestions of the right kind, labels that
cannot take effect.

`check_names` gets the compiler's vocabulary as the compiler will hand it over
(its user ops and composites with their argument names), so these tests also
prove that no spec or compiling GRAMMAR.md example trips it (no false alarms).
"""

from __future__ import annotations

import re

import pytest
from conftest import ALL_SPECS, ROOT, vocabulary

import archc
from archc.dsl import SpecError, parse, parse_file
from archc.dsl.diagnostics import SpecErrors
from archc.dsl.resolve import check_names

VOCABULARY = vocabulary()


def check(text: str) -> None:
    check_names([parse(text, "bad.arch", unbuilt=True)], VOCABULARY)


def problems(text: str) -> list[SpecError]:
    with pytest.raises(SpecError) as info:
        check(text)
    return list(info.value.errors)


@pytest.mark.parametrize("path", ALL_SPECS, ids=[p.stem for p in ALL_SPECS])
def test_every_spec_resolves(path):
    main = parse_file(path, unbuilt=True)  # with the files it uses (specs/blt.arch: its entropy model)
    check_names([main, *(parse_file(path.parent / use.path, unbuilt=True) for use in main.uses)], VOCABULARY)


COMPILING = [m.group(1) for m in re.finditer(r"\*compiles\*\s*\n\s*\n```arch\n(.*?)```",
                                             (ROOT / "GRAMMAR.md").read_text(), re.DOTALL)]


@pytest.mark.parametrize("index", range(len(COMPILING)))
def test_compiling_grammar_examples_resolve(index):
    check(COMPILING[index])


DIT = """param d_model: int = 64

block DiTBlock(x: Tensor[B, N, d_model], c: Tensor[B, d_model]) {
    shift, scale, gate = chunk(linaer(silu(c), 3 * d_modle), 3)
    h = layer_nrom(x, eps=1e-6) * (1 + unsqueeze(scael, 1)) + unsqueeze(shift, 1)
    return x + unsqueeze(gate, 1) * attention(h, heads=4, casual=false)
}

model DiT(x: Tensor[B, N, d_model], c: Tensor[B, d_model]) {
    repeat i in 0..2 { x = DiTBlok(x, c) }
    return x
}
"""


def test_every_unknown_name_in_one_run():
    found = problems(DIT)
    assert [(e.span.line, e.span.column, e.message) for e in found] == [
        (4, 32, "unknown op or block `linaer`"),
        (4, 52, "unknown name `d_modle`"),
        (5, 9, "unknown op or block `layer_nrom`"),
        (5, 50, "unknown name `scael`"),
        (6, 59, "`attention` has no argument `casual`"),
        (10, 28, "unknown op or block `DiTBlok`"),
    ]
    assert [e.hint for e in found] == [
        "did you mean `linear`?", "did you mean `d_model`?", "did you mean `layer_norm`?", "did you mean `scale`?",
        "did you mean `causal`?", "did you mean `DiTBlock`?"]


def test_several_problems_render_together_with_their_count():
    with pytest.raises(SpecErrors) as info:
        check(DIT)
    rendered = info.value.render()
    assert rendered.count("error:") == 6 and rendered.endswith("6 errors")
    assert rendered.index("bad.arch:4:32") < rendered.index("bad.arch:10:28")
    assert info.value.message == "unknown op or block `linaer`"  # it reads as its first problem


def test_suggestions_fit_the_kind_and_never_the_model():
    found = problems("""model CrossEntropyModel(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, 64)
    a = cross_entropie(x, tokens)
    b = softmx(x)
    c = CrossEntropyModl(x)
    d = lenear(x, 10)
    return a, b, c, d
}
""")
    assert [(e.message, e.hint) for e in found] == [
        ("unknown op or block `cross_entropie`", "did you mean `cross_entropy`?"),  # never the model
        ("unknown op or block `softmx`", "did you mean `softmax`?"),
        ("unknown op or block `CrossEntropyModl`", None),
        ("unknown op or block `lenear`", "did you mean `linear`?"),
    ]


def test_values_are_suggested_before_labels():
    found = problems("""param hidden: int = 64
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, hidden) as hiddens
    y = linear(x, hiden)
    return y
}
""")
    assert [(e.message, e.hint) for e in found] == [("unknown name `hiden`", "did you mean `hidden`?")]


def test_a_lowercase_dim_that_is_no_parameter_is_a_typo():
    found = problems("param d_model: int = 64\nmodel M(x: Tensor[B, T, d_modle]) {\n    return x\n}\n")
    assert [(e.message, e.hint) for e in found] == [("unknown name `d_modle` in a shape", "did you mean `d_model`?")]


def test_dims_are_values_in_their_block():
    check("model M(x: Tensor[B, N, 8], y: Tensor[B, L, 8]) {\n    a, b = split(concat([x, y], dim=1), [N, L], dim=1)\n"
          "    return a, b\n}\n")


def test_labels_are_not_values_and_tie_needs_one():
    found = problems("""model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, 64) as wte
    y = wte + x
    logits = linear(x, 100, tie=wtf)
    return logits, y
}
""")
    assert [(e.message.split(",")[0], e.hint) for e in found] == [
        ("`wte` is the label of a module", ("a label names the module an op makes (`tie=` takes one); to use its "
                                            "output, assign it: `h = f(x) as wte`")),
        ("`tie=` names a module labelled with `as`", "did you mean `wte`?"),
    ]


def test_init_rules_stand_only_in_init():
    found = problems("""model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, 64, init=normal(0.02, mean=0.0))
    y = linear(x, 64, init=zeros(), bias_init=constant(1.0))
    z = normal(0.02)
    w = linear(x, 64, init=normal(std=0.02, sdt=1))
    return y, z, w
}
""")
    assert [e.message for e in found] == [
        "`normal(...)` is an initialisation rule; it goes in `init=`",
        "the init rule `normal` has no argument `sdt`",
    ]


def test_blocks_are_values_where_an_op_takes_one():
    check("""block Expert(x: Tensor[N, 64], hidden: int = 32) {
    return mlp(x, hidden=hidden)
}
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, 64)
    x += experts(x, n=4, top_k=2, hidden=32, body=Expert)
    return x
}
""")


def test_block_arguments_are_checked():
    found = problems("""block L(x: Tensor[B, T, 64], width: int = 2) {
    return x
}
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, 64)
    x = L(x, 2, 3)
    x = L(x, widht=3)
    x = L(x, k=3)
    return x
}
""")
    assert [(e.message, e.hint) for e in found] == [
        ("block `L` takes at most 2 positional arguments (x, width), got 3", None),
        ("block `L` has no argument `widht`", "did you mean `width`?"),
        ("block `L` has no argument `k`", "its arguments are: x, width"),  # too short to guess
    ]


def test_names_set_in_branches_and_loops_are_known_after_them():
    check("""model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, 64)
    repeat i in 0..3 {
        if i == 0 { h = x } else { h = h + x }
    }
    if true { y = h } else { y = x }
    return y
}
""")


def test_files_that_use_others_see_their_blocks(tmp_path):
    (tmp_path / "layers.arch").write_text("param width: int = 64\n"
                                          "block Layer(x: Tensor[B, T, width]) {\n    return lnear(x, width)\n}\n")
    main = tmp_path / "main.arch"
    main.write_text('use "layers.arch"\nmodel M(tokens: Tokens[B, T]) {\n    x = embedding(tokens, 100, 64)\n'
                    "    x = Layer(linear(x, width))\n    return x\n}\n")
    modules = [parse_file(main), parse_file(tmp_path / "layers.arch")]
    with pytest.raises(SpecError) as info:
        check_names(modules, VOCABULARY)
    assert [(e.span.source.name.rsplit("/", 1)[-1], e.message) for e in info.value.errors] == [
        ("layers.arch", "unknown op or block `lnear`"),
        ("main.arch", "unknown name `width`"),  # a used file's parameters are its own
    ]


# ---- labels that cannot take effect --------------------------------------------------------

LAYER = "block Layer(x: Tensor[B, T, 64]) {\n    x += mlp(x, hidden=128)\n    return x\n}\n"


def test_a_label_on_the_only_call_in_a_repeat_is_an_error_saying_what_to_write():
    # Today's silent case: the label was dropped and n separate layers were built.
    with pytest.raises(SpecError) as info:
        parse(LAYER + "model M(tokens: Tokens[B, T]) {\n    x = embedding(tokens, 100, 64)\n"
                      "    repeat i in 0..4 as layers {\n        x = Layer(x) as shared_layer\n    }\n"
                      "    return x\n}\n",
              "bad.arch")
    err = info.value
    assert (err.span.line, err.span.column) == (8, 13)
    assert "the label `shared_layer` has no effect" in err.message and "layers.0" in err.message
    assert "x = Layer(x) as shared_layer shared" in err.hint and "repeat i in ... as shared_layer" in err.hint


def test_a_label_in_a_repeat_with_more_than_one_module_takes_effect():
    parse(LAYER + "model M(tokens: Tokens[B, T]) {\n    x = embedding(tokens, 100, 64)\n"
                  "    repeat i in 0..4 {\n        x = Layer(x) as layer\n        x = linear(x, 64) as proj\n    }\n"
                  "    return x\n}\n")


def test_shared_label_rules():
    found = problems(LAYER + """model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, 64) as embed shared
    y = embedding(tokens, 100, 64) as embed shared
    z = linear(x, 64) as embed shared
    w = embedding(tokens, 100, 64) as embed
    once = linear(x, 64) as alone shared
    repeat i in 0..4 { x = Layer(x) as layer shared }
    return x, y, z, w, once
}
""")
    assert [(e.span.line, e.message) for e in found] == [
        (8, "the shared module `embed` is `embedding`, so this call cannot be `linear`"),
        (9, "`embed` labels a shared module, so every call labelled `embed` must say `shared`"),
        (10, "`as alone shared` has no effect: no other call here is labelled `alone`"),
    ]


def test_the_same_label_in_different_branches_is_fine():
    parse("model M(tokens: Tokens[B, T], flag: bool = true) {\n    x = embedding(tokens, 100, 64)\n"
          "    if flag { x = linear(x, 64) as proj } else { x = linear(x, 32) as proj }\n    return x\n}\n")


def test_a_label_used_twice_is_reported_with_the_shared_way_out():
    found = problems("model M(tokens: Tokens[B, T]) {\n    x = embedding(tokens, 100, 64) as e\n"
                     "    y = linear(x, 64) as e\n    return y\n}\n")
    assert [e.message for e in found] == ["the name `e` is already used in this block"]
    assert "as e shared" in found[0].hint


# ---- wired into the compiler ---------------------------------------------------------------


def test_compile_reports_every_unknown_name_in_one_run():
    with pytest.raises(SpecErrors) as info:
        archc.compile(DIT, name="bad.arch")
    assert [e.message for e in info.value.errors if "not built yet" not in e.message] == \
        [e.message for e in problems(DIT)]


def test_compile_reports_unknown_names_and_unbuilt_constructs_together(tmp_path, monkeypatch):
    from archc.dsl.planned import PLANNED_OPS

    monkeypatch.setitem(PLANNED_OPS, "warp", "faster than light")  # every designed op is built today
    (tmp_path / "lib.arch").write_text("block L(x: Tensor[B, T, 8]) {\n    return warp(x, n=4)\n}\n")
    spec = tmp_path / "main.arch"
    spec.write_text('use "lib.arch"\nmodel M(x: Tensor[B, T, 8]) {\n    y = L(lnear(x, 8))\n    return y\n}\n')
    with pytest.raises(SpecErrors) as info:
        archc.compile(spec)
    assert sorted((e.span.source.name.rsplit("/", 1)[-1], e.message.split(" (")[0]) for e in info.value.errors) == [
        ("lib.arch", "`warp` is planned"), ("main.arch", "unknown op or block `lnear`")]


def test_the_compiler_never_suggests_the_model_itself():
    with pytest.raises(SpecError) as info:
        archc.compile("model Encoder(x: Tensor[B, T, 8]) {\n    return Encodr(x)\n}\n", name="bad.arch")
    assert info.value.hint is None
