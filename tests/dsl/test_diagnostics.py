"""Every mistake in a spec or an override gets a message a user can act on.

Each case is a small bad spec. Its rendered error is snapshotted (see
__snapshots__/test_diagnostics.ambr) and checked here for the project's rules:
it names bad.arch:LINE:COL, shows the source line with a caret, never leaks a
Lark terminal name, and suggests the closest name for a misspelling.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import archc
from archc.cli import main
from archc.dsl.parser import _lark

TERMINALS = {t.name for t in _lark().terminals} | {"$END"}
CAPS = re.compile(r"\b(__ANON\w*|[A-Z_]{3,})\b")

EMBED = "    x = embedding(tokens, 100, 64) as wte\n"


def model(*lines: str, head: str = "") -> str:
    """A small model around `lines`, with `head` (params, blocks) above it."""
    return head + "model M(tokens: Tokens[B, T]) {\n" + EMBED + "".join(f"    {ln}\n" for ln in lines) + "}\n"


LAYER = "block Layer(x: Tensor[B, T, 64]) {{\n{body}}}\n\n"

# id -> (spec text, overrides, (line, col) the error must point at, a phrase the message must contain)
CASES: dict[str, tuple[str, dict, tuple[int, int], str]] = {
    # ---- syntax ----
    "missing_colon_in_block_param": (
        "block Layer(x Tensor[B, T, 64]) {\n    return x\n}\n", {}, (1, 15), 'expected ":"'),
    "missing_colon_in_param_decl": ("param d_model int = 64\n", {}, (1, 15), 'expected ":"'),
    "unclosed_brace": (
        "model M(tokens: Tokens[B, T]) {\n    x = embedding(tokens, 100, 64)\n    return x\n", {}, (3, 13),
        "closing `}` is missing"),
    "unexpected_token": (model("x = linear(x, 64))", "return x"), {}, (3, 22), 'unexpected ")"'),
    "keyword_as_param_name": ("param in: int = 3\n", {}, (1, 7), "reserved word"),
    "keyword_as_variable": (model("return = linear(x, 64)", "return x"), {}, (3, 5), "reserved word"),
    "python_keyword_as_block_name": (
        "block None(x: Tensor[B, T, 64]) {\n    return x\n}\n" + model("x = None(x)", "return x"), {}, (1, 1),
        "Python reserves"),
    "keyword_as_block_name": (
        "block repeat(x: Tensor[B, T, 64]) {\n    return x\n}\n", {}, (1, 7), "reserved word"),
    "single_quoted_string": (model("x = mlp(x, hidden=256, act='relu')", "return x"), {}, (3, 32), "double quotes"),
    "unterminated_string": (model('x = mlp(x, hidden=256, act="relu)', "return x"), {}, (3, 32), "unterminated"),
    "trailing_garbage": (model("return x") + "}\n", {}, (5, 1), 'unexpected "}"'),
    "missing_equal_in_param_decl": ("param d_model: int 64\n", {}, (1, 20), 'expected "in" or "="'),
    "missing_equal_in_statement": (model("h linear(x, 64)", "return h"), {}, (3, 7), 'expected "=", "+=" or ","'),
    "bad_escape_in_string": (model('x = mlp(x, hidden=256, act="gelu\\d")', "return x"), {}, (3, 32), "bad escape"),
    "semicolon": (model("x = linear(x, 64);", "return x"), {}, (3, 22), "no separator"),
    "positional_after_keyword": (model("x = linear(x, bias=false, 64)", "return x"), {}, (3, 31), "positional"),
    # ---- names ----
    "unknown_name": (
        model("x = linear(x, d_modle)", "return x", head="param d_model: int = 64\n"), {}, (4, 19),
        "did you mean `d_model`?"),
    "unknown_op": (model("x = lineer(x, 64)", "return x"), {}, (3, 9), "did you mean `linear`?"),
    "unknown_block": (
        model("x = Layr(x)", "return x", head=LAYER.format(body="    return x\n")), {}, (7, 9),
        "did you mean `Layer`?"),
    "unknown_keyword_argument": (model("x = attention(x, haeds=4)", "return x"), {}, (3, 22), "did you mean `heads`?"),
    "unknown_tensor_type": (
        "model M(tokens: Tokns[B, T]) {\n    return tokens\n}\n", {}, (1, 17), "did you mean `Tokens`?"),
    "unknown_scalar_type": ("param d_model: itn = 64\n" + model("return x"), {}, (1, 16), "did you mean `int`?"),
    "tensor_type_without_dims": (
        model("x = Layer(x)", "return x", head="block Layer(x: Tensor) {\n    return x\n}\n\n"), {}, (1, 16),
        "needs its dims"),
    # ---- types ----
    "heads_not_an_int": (model("x = attention(x, heads=2.5)", "return x"), {}, (3, 28), "must be an int"),
    "bias_not_a_bool": (model("x = linear(x, 32, bias=1)", "return x"), {}, (3, 28), "must be a bool"),
    "act_not_a_choice": (model('x = mlp(x, hidden=256, act="gelu2")', "return x"), {}, (3, 32), "must be one of"),
    "param_default_wrong_type": ("param d_model: int = 64.5\n" + model("return x"), {}, (1, 22), "declared int"),
    "block_argument_wrong_type": (
        model("x = Layer(x, k=true)", "return x",
              head="block Layer(x: Tensor[B, T, 64], k: int = 2) {\n    return x\n}\n\n"), {}, (7, 20),
        "declared int"),
    "if_condition_not_a_bool": (model("if 1 {", "    x = linear(x, 64)", "}", "return x"), {}, (3, 8),
                                "true or false"),
    # ---- shapes ----
    "shape_mismatch_add": (model("y = linear(x, 32)", "z = x + y", "return z"), {}, (4, 9), "64 vs 32"),
    "heads_do_not_divide_width": (model("x = attention(x, heads=5)", "return x"), {}, (3, 9), "heads=5"),
    "heads_not_multiple_of_kv_heads": (
        model("x = attention(x, heads=4, kv_heads=3)", "return x"), {}, (3, 9), "multiple of kv_heads=3"),
    "block_input_shape_mismatch": (
        model("x = Layer(x)", "return x", head="block Layer(x: Tensor[B, T, 128]) {\n    return x\n}\n\n"), {},
        (1, 16), "[B, T, 128]"),
    "tie_shape_mismatch": (model("logits = linear(x, 50, tie=wte)", "return logits"), {}, (3, 14), "cannot tie"),
    "attention_needs_a_stream": (
        "model M(v: Tensor[64]) {\n    y = attention(v, heads=4)\n    return y\n}\n", {}, (2, 9), "[B, T, D]"),
    "norm_of_a_number": (
        model("loss = next_token_loss(linear(x, 100), tokens)", "y = layer_norm(loss)", "return y"), {}, (4, 9),
        "shape []"),
    # ---- attention masks ----
    "window_not_positive": (model("x = attention(x, heads=4, window=0)", "return x"), {}, (3, 38), "must be positive"),
    "sinks_negative": (model("x = attention(x, heads=4, window=8, sinks=0 - 1)", "return x"), {}, (3, 9),
                       "`sinks` must be 0 or more"),
    "sinks_without_window": (model("x = attention(x, heads=4, sinks=4)", "return x"), {}, (3, 9), "needs a window"),
    "prefix_without_effect": (
        model("x = attention(x, heads=4, causal=false, prefix=8)", "return x"), {}, (3, 9), "has no effect"),
    "cross_attention_other_batch": (
        ("model M(x: Tensor[B, T, 32], m: Tensor[C, S, 32]) {\n    y = cross_attention(x, m, heads=4)\n"
         "    return y\n}\n"), {}, (2, 9), "queries' batch dim B"),
    # ---- overrides ----
    "override_unknown_name": (
        model("return x", head="param d_model: int = 64\n"), {"d_modle": 128}, (1, 1), "did you mean `d_model`?"),
    "override_wrong_type": (
        model("return x", head="param d_model: int = 64\n"), {"d_model": "big"}, (1, 1), "declared int"),
    # ---- structure ----
    "block_calls_itself": (
        model("x = Layer(x)", "return x", head=LAYER.format(body="    x = Layer(x)\n    return x\n")), {}, (2, 9),
        "calls itself"),
    "block_returns_nothing": (
        model("x = Layer(x)", "return x", head=LAYER.format(body="    h = linear(x, 64)\n")), {}, (1, 1),
        "returns nothing"),
    "tie_to_a_linear": (
        model("h = linear(x, 64) as proj", "logits = linear(h, 100, tie=proj)", "return logits"), {}, (4, 33),
        "must name an embedding"),
    "tie_to_unknown_label": (model("logits = linear(x, 100, tie=wtf)", "return logits"), {}, (3, 33),
                             "did you mean `wte`?"),
    "duplicate_label": (
        model("x = linear(x, 64) as proj", "x = linear(x, 64) as proj", "return x"), {}, (4, 9), "already used"),
    "no_model": ("param d_model: int = 64\n\nblock Layer(x: Tensor[B, T, 64]) {\n    return x\n}\n", {}, (3, 1),
                 "no `model`"),
    "empty_spec": ("# nothing here yet\n", {}, (1, 19), "no `model`"),
    "two_models": (model("return x") + "\n" + model("return x").replace("model M", "model N"), {}, (6, 1),
                   "exactly one `model`"),
    "return_not_last": (model("return x", "x = linear(x, 64)"), {}, (4, 5), "after `return`"),
    "return_inside_repeat": (model("repeat i in 0..2 {", "    return x", "}"), {}, (4, 9), "inside `repeat`"),
    "block_defined_twice": (
        LAYER.format(body="    return x\n") * 2 + model("return x"), {}, (5, 1), "defined twice"),
    "label_without_effect_in_repeat": (
        model("repeat i in 0..4 {", "    x = Layer(x) as shared_layer", "}", "return x",
              head=LAYER.format(body="    return x\n")), {}, (8, 13), "has no effect"),
    "shared_label_used_once": (model("x = linear(x, 64) as proj shared", "return x"), {}, (3, 9), "has no effect"),
    "planned_op": (model("a = warp(x, n=4)", "return a"), {}, (3, 9), "not built yet"),  # made up: see test_error
    "keyword_where_an_expression_is_due": (model("y =", "return y"), {}, (4, 5), "expected an expression"),
    "no_unrelated_suggestion": (model("y = argmax(x)", "return y"), {}, (3, 9), "unknown op or block `argmax`"),
    "parenthesised_expression_ok_but_width_bad": (
        model("x = linear(x, (0 - 64))", "return x"), {}, (3, 9), "must be positive"),
    "number_too_large": (model("x = linear(x, 1e400)", "return x"), {}, (3, 19), "too large"),
}


def compile_case(case_id: str) -> archc.SpecError:
    text, overrides, _where, _phrase = CASES[case_id]
    with pytest.raises(archc.SpecError) as info:
        archc.compile(text, overrides, name="bad.arch")
    return info.value


def assert_actionable(rendered: str, err: archc.SpecError) -> None:
    for message in (err.message, err.hint or "", *(note for note, _span in err.notes)):
        leaked = {m for m in CAPS.findall(message) if m in TERMINALS or m.startswith("__ANON")}
        assert not leaked, f"Lark terminal name {leaked} leaked into {message!r}"
    assert "Traceback" not in rendered and "Token(" not in rendered and "Tree(" not in rendered
    # a caret line under a source line
    lines = rendered.splitlines()
    carets = [i for i, line in enumerate(lines) if line.strip() and set(line.strip()) == {"^"}]
    assert carets, rendered
    for i in carets:
        assert re.match(r"\s*\d+ \| ", lines[i - 1]), rendered
        assert lines[i].index("^") >= lines[i - 1].index("|") + 2


@pytest.mark.parametrize("case_id", sorted(CASES))
def test_error(case_id, snapshot, monkeypatch):
    from archc.dsl.planned import PLANNED_OPS

    monkeypatch.setitem(PLANNED_OPS, "warp", "faster than light")  # every designed op is built today
    err = compile_case(case_id)
    rendered = err.render()
    _text, _overrides, (line, col), phrase = CASES[case_id]
    assert f"bad.arch:{line}:{col}" in rendered, rendered
    assert phrase in rendered, rendered
    assert_actionable(rendered, err)
    assert rendered == snapshot


def test_no_unrelated_suggestion():
    assert "did you mean" not in compile_case("no_unrelated_suggestion").render()


def test_at_least_24_cases():
    assert len(CASES) >= 24


def test_the_caret_sits_under_the_mistake():
    rendered = compile_case("unknown_op").render()
    source, caret = rendered.splitlines()[1:3]
    start = caret.index("^")
    assert source[start:start + caret.count("^")] == "lineer"


def test_the_caret_follows_tabs():
    text = "model M(tokens: Tokens[B, T]) {\n\tx = embedding(tokens, 100, 64)\n\ty = lineer(x, 3)\n\treturn y\n}\n"
    with pytest.raises(archc.SpecError) as info:
        archc.compile(text, name="bad.arch")
    source, caret = info.value.render().splitlines()[1:3]
    start = caret.index("^")
    assert source[start:start + caret.count("^")] == "lineer"


def test_lines_are_counted_as_the_parser_counts_them():
    # U+2028 and a lone CR are not line ends for the parser; the shown line must be the one meant.
    for odd in ("\u2028", "\r", "\f"):
        text = f"# a{odd}b\n" + model("x = lineer(x, 64)", "return x")
        with pytest.raises(archc.SpecError) as info:
            archc.compile(text, name="bad.arch")
        assert "x = lineer(x, 64)" in info.value.render().splitlines()[1]


# ---- `use`: real files in a temporary directory -------------------------------


def _normalise(rendered: str, tmp_path: Path) -> str:
    return rendered.replace(str(tmp_path), "<tmp>")


def test_use_of_a_missing_file(tmp_path, snapshot):
    (tmp_path / "layers.arch").write_text("block Layer(x: Tensor[B, T, 64]) {\n    return x\n}\n")
    main_spec = tmp_path / "bad.arch"
    main_spec.write_text('use "layer.arch"\n\n' + model("x = Layer(x)", "return x"))
    with pytest.raises(archc.SpecError) as info:
        archc.compile(main_spec)
    rendered = _normalise(info.value.render(), tmp_path)
    assert "bad.arch:1:1" in rendered and "did you mean `layers.arch`?" in rendered
    assert_actionable(rendered, info.value)
    assert rendered == snapshot


def test_use_cycle(tmp_path, snapshot):
    (tmp_path / "a.arch").write_text('use "b.arch"\n\nblock A(x: Tensor[B, T, 64]) {\n    return x\n}\n')
    (tmp_path / "b.arch").write_text('use "a.arch"\n\nblock Bee(x: Tensor[B, T, 64]) {\n    return x\n}\n')
    main_spec = tmp_path / "bad.arch"
    main_spec.write_text('use "a.arch"\n\n' + model("x = A(x)", "return x"))
    with pytest.raises(archc.SpecError) as info:
        archc.compile(main_spec)
    rendered = _normalise(info.value.render(), tmp_path)
    assert "b.arch:1:1" in rendered and "cycle" in rendered
    assert_actionable(rendered, info.value)
    assert rendered == snapshot


def test_use_cycle_through_another_spelling_of_the_path(tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "a.arch").write_text('use "../sub/a.arch"\n\nblock A(x: Tensor[B, T, 64]) {\n    return x\n}\n')
    main_spec = sub / "bad.arch"
    main_spec.write_text('use "a.arch"\n\n' + model("x = A(x)", "return x"))
    with pytest.raises(archc.SpecError, match="cycle"):
        archc.compile(main_spec)


def test_use_of_a_directory(tmp_path):
    main_spec = tmp_path / "bad.arch"
    main_spec.write_text('use "."\n\n' + model("return x"))
    with pytest.raises(archc.SpecError) as info:
        archc.compile(main_spec)
    assert info.value.span is not None and "directory" in info.value.message


def test_a_byte_order_mark_is_accepted_in_files(tmp_path):
    spec = tmp_path / "bom.arch"
    spec.write_text("\ufeff" + model("return x"), encoding="utf-8")
    archc.compile(spec)


# ---- the command line: exit 1 for a bad spec, 2 for bad usage, never a traceback --


def test_cli_bad_spec_exits_1_without_traceback(tmp_path, capsys):
    spec = tmp_path / "bad.arch"
    spec.write_text(CASES["unknown_op"][0])
    assert main(["check", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "bad.arch:3:9: error: unknown op or block `lineer`" in err and "did you mean `linear`?" in err


def test_cli_syntax_error_exits_1(tmp_path, capsys):
    spec = tmp_path / "bad.arch"
    spec.write_text(CASES["unclosed_brace"][0])
    assert main(["compile", str(spec)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.arch:3:13" in err and "^" in err


def test_cli_bad_override_exits_1(tmp_path, capsys):
    spec = tmp_path / "bad.arch"
    spec.write_text(CASES["override_unknown_name"][0])
    assert main(["check", str(spec), "-D", "d_modle=128"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "did you mean `d_model`?" in err
    assert main(["check", str(spec), "-D", "d_model=big"]) == 1
    assert "declared int" in capsys.readouterr().err


def test_cli_missing_spec_file_exits_1(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nowhere.arch")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "nowhere.arch" in err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["compile"], ["check"], ["compile", "x.arch", "--bogus"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
