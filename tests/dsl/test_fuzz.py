"""Fuzz the front end: whatever text comes in, the only exception is a renderable SpecError.

Six sources: (a) random sequences of the language's tokens, (b) random
mutations of the specs in specs/, (c) random scalar expressions planted where a
spec evaluates one (parameter defaults, op arguments, repeat bounds, `if`
conditions, tensor dims), (d) random overrides and `-D` text, (e) the front end
alone — parsing with constructs not built yet allowed, then resolving every
name — on token soup and on mutated specs, and the same new syntax (indexing,
tuple assignment, bit operations, shared labels, Mask, learned) through the
whole pipeline, (f) random expressions of tensor moves, arithmetic and
reductions. `archc.compile()` parses, lowers, runs the passes and generates
source; whatever compiles must generate valid Python, and in (f) it is also
built and run: it must run and give every output the shape the checker said.
"""

from __future__ import annotations

import builtins
import os
import re
import time
from pathlib import Path

import pytest
from conftest import vocabulary
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import archc
from archc.dsl.parser import _lark, parse
from archc.dsl.resolve import check_names

SPECS = {p.name: p.read_text(encoding="utf-8") for p in sorted((Path(__file__).resolve().parents[2] / "specs").glob("*.arch"))}
TERMINALS = {t.name for t in _lark().terminals} | {"$END"}
LARK_NAME = re.compile(r"\b(__ANON\w*|[A-Z_]{3,})\b")

KEYWORDS = ["use", "param", "block", "model", "repeat", "in", "as", "if", "elif", "else", "return",
            "true", "false", "and", "or", "not", "shared"]
PUNCT = [":", ",", "=", "+=", "(", ")", "[", "]", "{", "}", "..", "...", "**", "==", "!=", "<=", ">=", "<", ">",
         "+", "-", "*", "/", "//", "%", "&", "|", "^", "<<", ">>"]
NAMES = ["x", "h", "y", "tokens", "logits", "loss", "B", "T", "d_model", "n_heads", "vocab", "i",
         "int", "float", "bool", "str", "Tokens", "Tensor", "Image", "Block", "M",
         "embedding", "pos_embedding", "linear", "layer_norm", "rms_norm", "dropout", "attention", "mlp",
         "swiglu", "gelu", "silu", "relu", "next_token_loss", "min", "max", "heads", "kv_heads", "head_dim",
         "hidden", "bias", "tie", "out", "act", "rope", "causal", "eps", "forward", "self", "class", "None",
         "input", "add", "attention_core", "fused_linear", "split_part", "_", "Mask", "N", "L",
         "chunk", "concat", "split", "shift", "learned", "zeros", "normal", "init", "cross_entropy", "mean", "dim",
         "unsqueeze", "reshape", "where", "lanes", "Layer"]
NUMBERS = ["0", "1", "2", "3", "7", "64", "0.5", "2.5", "1e-5", "1e400", "1000000000000", "00", "1.0e308"]
STRINGS = ['"gelu"', '"relu"', '""', '"a\\tb"', '"\\u00e9"', '"\\x"', '"\\N{BULLET}"']
ODD = ["'", ";", "@", "$", "?", "\\", "\t", "\u00e9", "\u2212", "#", "\"", "\x00", "\r", "\u2028", "\ufeff"]
TOKENS = KEYWORDS + PUNCT + NAMES + NUMBERS + STRINGS + ODD
SEPARATORS = [" ", "\n", "", "  ", "\n    ", " # c\n"]


def assert_actionable(err: archc.SpecError) -> None:
    """Every problem the error reports is located (file:line:col, the line, a caret) and in the user's words."""
    rendered = err.render()
    assert isinstance(rendered, str) and rendered.strip()
    for one in err.errors:
        messages = [one.message, one.hint or "", *(note for note, _span in one.notes)]
        for message in messages:
            leaked = {m for m in LARK_NAME.findall(message) if m in TERMINALS or m.startswith("__ANON")}
            assert not leaked, f"Lark terminal name {leaked} in {message!r}"
            assert "Token(" not in message and "Tree(" not in message, message
        assert one.span is not None, f"unlocated error: {rendered}"
        assert str(one.span) in rendered and "^" in rendered
        if one.span.source.name == "fuzz.arch":
            assert "fuzz.arch" in rendered


def check(text: str) -> None:
    """Compile `text`; any failure must be a SpecError whose rendering a user can act on."""
    try:
        compiled = archc.compile(text, name="fuzz.arch")
    except archc.SpecError as err:
        assert_actionable(err)
        return
    # It compiled: the generated module must at least be valid Python.
    builtins.compile(compiled.source, "<generated>", "exec")


VOCABULARY = vocabulary()


def check_front_end(text: str) -> None:
    """Parse `text` allowing what is not built yet and resolve its names: only located SpecErrors."""
    try:
        check_names([parse(text, "fuzz.arch", unbuilt=True)], VOCABULARY)
    except archc.SpecError as err:
        assert_actionable(err)


# ARCHC_FUZZ_SCALE=20 runs twenty times as many examples (a soak run);
# the default keeps this file near 30 s of CPU on 2 cores.
SCALE = float(os.environ.get("ARCHC_FUZZ_SCALE", "1"))


def fuzz(examples: int) -> settings:
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


FUZZ = fuzz(400)


class Budget:
    """Seconds a test may spend compiling; past them its remaining examples return at once.

    specs/ keeps growing and some specs take a second to compile, so the tests
    that mutate them are bounded by time rather than by a count of examples.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds * SCALE
        self.start: float | None = None

    def spent(self) -> bool:
        if self.start is None:
            self.start = time.monotonic()
        return time.monotonic() - self.start > self.seconds


# ---- (a) random token soup ---------------------------------------------------


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TOKENS), st.sampled_from(SEPARATORS)), max_size=60))
def test_random_tokens(pieces):
    check("".join(tok + sep for tok, sep in pieces))


# A skeleton that parses keeps random tokens from dying at the first character.
SKELETON = "model M(tokens: Tokens[B, T]) {{\n    x = embedding(tokens, 100, 64) as wte\n    {}\n    return x\n}}\n"


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TOKENS), st.sampled_from(SEPARATORS)), max_size=20))
def test_random_tokens_in_a_model(pieces):
    check(SKELETON.format("".join(tok + sep for tok, sep in pieces)))


# ---- (b) mutations of real specs --------------------------------------------

LEX = re.compile(r"\s+|#[^\n]*|\"(?:[^\"\\\n]|\\.)*\"|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z_]\w*"
                 r"|\*\*|\+=|\.\.\.|\.\.|<<|>>|[=!<>]=|//|.", re.S)
IDENT = re.compile(r"[A-Za-z_]\w*\Z")
NUMBER = re.compile(r"\d")


def tokenize(text: str) -> list[str]:
    return LEX.findall(text)


def _significant(tokens: list[str]) -> list[int]:
    return [i for i, t in enumerate(tokens) if t.strip() and not t.startswith("#")]


@st.composite
def mutated_spec(draw) -> str:
    tokens = tokenize(SPECS[draw(st.sampled_from(sorted(SPECS)))])
    for _ in range(draw(st.integers(1, 3))):
        sig = _significant(tokens)
        kind = draw(st.sampled_from(["delete", "insert", "duplicate", "swap", "char_delete", "char_insert",
                                     "number", "rename"]))
        i = sig[draw(st.integers(0, len(sig) - 1))]
        if kind == "delete":
            del tokens[i]
        elif kind == "insert":
            tokens.insert(i, " " + draw(st.sampled_from(TOKENS)) + " ")
        elif kind == "duplicate":
            tokens.insert(i, tokens[i] + " ")
        elif kind == "swap":
            j = sig[min(sig.index(i) + 1, len(sig) - 1)]
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "char_delete":
            tok = tokens[i]
            k = draw(st.integers(0, len(tok) - 1))
            tokens[i] = tok[:k] + tok[k + 1:]
        elif kind == "char_insert":
            tok = tokens[i]
            k = draw(st.integers(0, len(tok)))
            ch = draw(st.sampled_from(ODD + PUNCT + ["a", "_", "0", ".", " "]))
            tokens[i] = tok[:k] + ch + tok[k:]
        elif kind == "number":
            nums = [j for j in sig if NUMBER.match(tokens[j])]
            if nums:
                j = nums[draw(st.integers(0, len(nums) - 1))]
                # Not mid-sized ints: a 5000-layer model is valid, just slow to compile.
                tokens[j] = draw(st.sampled_from(NUMBERS + ["-1", "(0 - 3)", "2 ** 70", "1e200 ** 2", "0 ** -1"]))
        else:  # rename an identifier everywhere, or at one use
            idents = sorted({tokens[j] for j in sig if IDENT.match(tokens[j])})
            old = draw(st.sampled_from(idents))
            new = draw(st.one_of(st.sampled_from(NAMES + KEYWORDS), st.just(old[:-1] or "_"), st.just(old + "s")))
            if draw(st.booleans()):
                tokens = [new if t == old else t for t in tokens]
            else:
                tokens[i] = new if IDENT.match(tokens[i]) else tokens[i]
    return "".join(tokens)


MUTATION_BUDGET = Budget(12)


@fuzz(700)
@given(mutated_spec())
def test_mutated_specs(text):
    if not MUTATION_BUDGET.spent():
        check(text)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_specs_round_trip_the_tokenizer(name):
    # The mutator relies on tokenize() covering the text exactly.
    assert "".join(tokenize(SPECS[name])) == SPECS[name]


# ---- (e) the front end alone: syntax whose lowering is still to come -------------

NEW_SYNTAX = ["x[:, 0]", "x[..., :d]", "x[1:-1:2]", "a, b = chunk(x, 2)", "a, _ = x, y", "t << 2 ^ t & 7 | t >> 1",
              "x = Layer(x) as l shared", "m: Mask[B, T]", "learned([1, 1, 64], init=normal(0.02))",
              "concat([x, y], dim=1)", "return a, b"]


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TOKENS + NEW_SYNTAX), st.sampled_from(SEPARATORS)), max_size=30))
def test_front_end_on_random_tokens_in_a_model(pieces):
    check_front_end(SKELETON.format("".join(tok + sep for tok, sep in pieces)))


FRONT_END_BUDGET = Budget(8)


@fuzz(500)
@given(mutated_spec())
def test_front_end_on_mutated_specs(text):
    if not FRONT_END_BUDGET.spent():
        check_front_end(text)


# ---- (c) random scalar expressions where the spec evaluates one ---------------

ATOMS = st.sampled_from(["0", "1", "2", "3", "64", "0.5", "1e-5", "1e300", "1e400", "true", "false", '"gelu"', '""',
                         "d", "flag", "name", "x", "tokens", "[]", "[1, 2]", "[d, 2.5]", "B", "nope", "-1",
                         "(10 ** 60)", "(2 ** 0.5)", "wte", "i"])
UNARY = ["-", "not "]
BINARY = ["+", "-", "*", "/", "//", "%", "**", "==", "!=", "<", "<=", ">", ">=", "in", "and", "or"]


def _expr(children):
    return st.one_of(
        st.tuples(st.sampled_from(UNARY), children).map(lambda t: f"{t[0]}{t[1]}"),
        st.tuples(children, st.sampled_from(BINARY), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(["min", "max", "linear", "gelu", "foo"]), st.lists(children, max_size=3))
          .map(lambda t: f"{t[0]}({', '.join(t[1])})"),
        st.lists(children, max_size=3).map(lambda items: f"[{', '.join(items)}]"),
    )


EXPRS = st.recursive(ATOMS, _expr, max_leaves=8)

TEMPLATE = """param d: int = 64
param flag: bool = true
param name: str = "gelu"
param p: {ptype} = {e0}

block Layer(x: Tensor[B, T, {e1}], k: int = {e2}) {{
    h = linear(x, {e3}, bias={e4})
    x += mlp(h, hidden={e5}, act={e6}, out=d)
    return x
}}

model M(tokens: Tokens[B, T]) {{
    x = embedding(tokens, 100, d) as wte
    repeat i in {e7}..{e8} {{
        x = Layer(x, k={e9})
    }}
    if {e10} {{
        x = attention(x, heads={e11}, kv_heads={e12}, dropout={e13}) * {e14}
    }}
    return x
}}
"""


PLAIN = ["1", "d", "1", "d", "true", "(4 * d)", '"gelu"', "0", "2", "1", "flag", "4", "2", "0.0", "1"]


@fuzz(600)
@given(st.sampled_from(["int", "float", "bool", "str", "list", "Int"]), st.integers(0, len(PLAIN) - 1), EXPRS)
def test_random_expressions(ptype, slot, expr):
    # One slot holds a random expression, the others their ordinary values, so lowering gets that far.
    values = {f"e{k}": expr if k == slot else plain for k, plain in enumerate(PLAIN)}
    check(TEMPLATE.format(ptype=ptype if slot == 0 else "int", **values))


def test_template_compiles_as_is():
    archc.compile(TEMPLATE.format(ptype="int", **{f"e{k}": v for k, v in enumerate(PLAIN)}), name="fuzz.arch")


# ---- (d) overrides: random -D text, random values for real specs --------------

VALUES = st.one_of(st.integers(-10, 10**6), st.sampled_from([0, 2**999, 2**1001, 10**400]), st.floats(allow_nan=True),
                   st.booleans(), st.text(max_size=8), st.none(), st.lists(st.integers(), max_size=2))


OVERRIDE_BUDGET = Budget(6)


@fuzz(200)
@given(st.sampled_from(sorted(SPECS)), st.dictionaries(
    st.one_of(st.sampled_from(["d_model", "vocab", "n_heads", "n_kv_heads", "eps", "dropout", "tie_embeddings",
                               "n_layers", "max_len", "rope_theta", "d_ff"]), st.sampled_from(NAMES)),
    VALUES, max_size=3))
def test_random_overrides(spec_name, overrides):
    if OVERRIDE_BUDGET.spent():
        return
    if isinstance(overrides.get("n_layers"), int) and not isinstance(overrides["n_layers"], bool):
        overrides["n_layers"] %= 8  # a valid but deep model only costs time
    try:
        archc.compile(SPECS[spec_name], overrides, name="fuzz.arch")
    except archc.SpecError as err:
        rendered = err.render()
        assert "fuzz.arch" in rendered, rendered  # located at the declaration, or a note pointing at one
        assert "Traceback" not in rendered


@fuzz(300)
@given(st.one_of(st.text(max_size=30), st.tuples(st.sampled_from(NAMES + ["", " ", "1x"]), st.text(max_size=20))
                 .map(lambda t: f"{t[0]}={t[1]}")))
def test_random_define_text(text):
    from archc.compiler.lower import parse_override

    try:
        name, value = parse_override(text)
    except archc.SpecError as err:
        assert err.render()
    else:
        assert isinstance(value, (int, float, bool, str)) and name.isidentifier()


# ---- (f) the language's tensor moves, arithmetic and reductions, compiled and run --------------------
# Random expressions over a model's tensors and dims, through the whole pipeline. Whatever compiles is
# also built and run on tensors whose symbolic dims get distinct sizes: it must run, and every output
# must have the shape the checker gave it — the shape checker and PyTorch agree, or the test says where.

MOVE_ATOMS = st.sampled_from(["x", "y", "tokens", "mask", "x", "y", "B", "T", "L", "d", "0", "1", "2", "3", "-1",
                              "0.5", "T - 1", "L + T", "[x, x]", "[x, y]", "[T, L]", "[2, -1]", "[B, T, 2, 4]",
                              "[B, -1]", "[0, 2, 1]", "true"])
MOVE_OPS = ["concat", "stack", "split", "chunk", "unsqueeze", "squeeze", "reshape", "flatten", "transpose", "permute",
            "expand", "shift", "where", "softmax", "log_softmax", "logsumexp", "mean", "sum", "max", "min", "exp",
            "abs", "sqrt", "learned", "linear", "cross_entropy", "mse"]
MOVE_BINARY = ["+", "-", "*", "/", "//", "%", "&", "|", "^", "<<", ">>", "==", "<", "**"]
INDEX_ITEMS = st.sampled_from([":", "0", "-1", "1:", ":-1", ":T - 1", "...", "::2", "1:3", "T", "d // 2", ":d // 2"])


def _moves(children):
    return st.one_of(
        st.tuples(children, st.lists(INDEX_ITEMS, min_size=1, max_size=4)).map(lambda t: f"{t[0]}[{', '.join(t[1])}]"),
        st.tuples(children, st.sampled_from(MOVE_BINARY), children).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(st.sampled_from(MOVE_OPS), st.lists(children, min_size=1, max_size=3),
                  st.sampled_from(["", ", dim=1", ", dim=-1", ", dim=T", ", dim=0", ", keepdim=true",
                                   ", init=zeros()", ", fill=-1"]))
          .map(lambda t: f"{t[0]}({', '.join(t[1])}{t[2]})"),
    )


MOVE_EXPRS = st.recursive(MOVE_ATOMS, _moves, max_leaves=6)
MOVES = """param d: int = 8
model M(x: Tensor[B, T, d], y: Tensor[B, L, d], tokens: Tokens[B, T], mask: Mask[B, T]) {{
    {targets} = {expr}
    return {targets}
}}
"""
SIZES = {"B": 6, "T": 7, "L": 9}  # distinct, and longer than any int slice bound above (no clamping)
MOVES_BUDGET = Budget(15)


def _run_and_compare(compiled) -> None:
    import torch

    from archc.compiler.ops import dim_value

    torch.manual_seed(0)
    inputs = {"x": torch.randn(6, 7, 8), "y": torch.randn(6, 9, 8), "tokens": torch.randint(0, 50, (6, 7)),
              "mask": torch.rand(6, 7) > 0.5}
    try:
        outputs = compiled.build()(**inputs)
    except RuntimeError as err:  # integer division by zero is the data's fault, not the checker's
        assert "ZeroDivisionError" in str(err), f"{err}\n{compiled.source}"
        return
    except IndexError as err:  # a position into a symbolic axis (x[4] of [B, ...]) is checked when it runs
        assert "out of bounds" in str(err), f"{err}\n{compiled.source}"
        return
    for name, node_id in compiled.ir.outputs:
        shape = tuple(round(dim_value(d, SIZES)) for d in compiled.ir.node(node_id).shape)
        assert tuple(outputs[name].shape) == shape, f"{name}: ran as {tuple(outputs[name].shape)}, checked as " \
                                                    f"{compiled.ir.node(node_id).shape}\n{compiled.source}"


@fuzz(400)
@given(MOVE_EXPRS, st.sampled_from(["a", "a, b", "a, _, c"]))
def test_moves_compile_to_what_runs_or_to_located_errors(expr, targets):
    if MOVES_BUDGET.spent():
        return
    text = MOVES.format(expr=expr, targets=targets).replace("return a, _, c", "return a, c")
    try:
        compiled = archc.compile(text, name="fuzz.arch")
    except archc.SpecError as err:
        assert_actionable(err)
        return
    _run_and_compare(compiled)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(TOKENS + NEW_SYNTAX), st.sampled_from(SEPARATORS)), max_size=30))
def test_new_syntax_through_the_whole_pipeline(pieces):
    check(SKELETON.format("".join(tok + sep for tok, sep in pieces)))
