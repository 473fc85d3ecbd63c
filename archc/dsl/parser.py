"""Parse .arch text into the typed AST (ast.py), turning Lark errors into SpecErrors."""

from __future__ import annotations

import ast as pyast
import functools
import re
import warnings
from pathlib import Path

import lark
from lark import Token, Transformer, v_args

from archc.dsl import ast
from archc.dsl.ast import SourceFile, Span
from archc.dsl.diagnostics import Collector, SpecError, end_of, expected_words
from archc.dsl.planned import unbuilt as unbuilt_constructs
from archc.dsl.resolve import label_errors

KEYWORDS = {
    "use", "param", "block", "model", "repeat", "in", "as", "if", "elif", "else",
    "return", "true", "false", "and", "or", "not", "shared",
}
# Keywords that begin a statement or a definition: met where an expression was due,
# the expression is missing (`y =` then `return y`), not misnamed.
STATEMENT_KEYWORDS = {"use", "param", "block", "model", "repeat", "if", "elif", "else", "return"}
# Reserved words that may still name a keyword argument (`experts(..., shared=1)`).
ARGUMENT_NAMES = {"shared"}


def _keyword(tok: Token) -> Token:
    # The contextual lexer reads a keyword as a NAME where no keyword fits (`y = return`);
    # give it back its own type so the error is about the keyword, where it stands.
    if tok.value in KEYWORDS and tok.value not in ARGUMENT_NAMES:
        return Token.new_borrow_pos(tok.value.upper(), tok.value, tok)
    return tok


@functools.cache
def _lark() -> lark.Lark:
    return lark.Lark.open(
        "grammar.lark",
        rel_to=__file__,
        parser="lalr",
        propagate_positions=True,
        maybe_placeholders=True,
        lexer_callbacks={"NAME": _keyword},
    )


def parse(text: str, name: str = "<spec>", *, unbuilt: bool = False) -> ast.Module:
    """Parse spec text; `name` is what diagnostics call the file.

    Besides the syntax, this checks what one file alone can show: labels that
    cannot take effect, and (unless `unbuilt`) constructs that are planned
    but not built yet (planned.py), every one of them in one error. Tools that
    only read the AST pass `unbuilt=True`.
    """
    source = SourceFile(name, text)
    try:
        tree = _lark().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise _syntax_error(err, source) from None
    _check_depth(tree, source)
    try:
        module = _ToAst(source).transform(tree)
    except lark.exceptions.VisitError as err:  # unwrap, so no Lark frames reach users
        if isinstance(err.orig_exc, SpecError):
            raise err.orig_exc from None
        raise
    errors = Collector()
    for err in label_errors(module, {block.name: block for block in module.blocks}):
        errors.add(err)
    if not unbuilt:
        for err in unbuilt_constructs(module):
            errors.add(err)
    errors.raise_any()
    return module


def parse_file(path: str | Path, *, unbuilt: bool = False) -> ast.Module:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # editors may write a byte-order mark
    except FileNotFoundError:
        raise SpecError(f"no such spec file: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read spec file {path}: {err}") from None
    return parse(text, str(path), unbuilt=unbuilt)


# Nesting deeper than this would exhaust Python's stack in the recursive passes
# that follow (tree -> AST, evaluation, lowering); no real spec comes close.
MAX_DEPTH = 200


def _check_depth(tree: lark.Tree, source: SourceFile) -> None:
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            line, column = getattr(node.meta, "line", 1), getattr(node.meta, "column", 1)
            raise SpecError(f"this expression nests more than {MAX_DEPTH} levels deep",
                            Span(source, line, column, line, column + 1),
                            hint="split it into several assignments")
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))


# ---- syntax errors -----------------------------------------------------------


def _describe(token: Token) -> str:
    if token.type == "$END":
        return "the end of the file"
    if token.type in ("NAME",):
        return f"name `{token}`"
    if token.type == "NUMBER":
        return f"number {token}"
    if token.type == "STRING":
        return f"string {token}"
    if token.value in KEYWORDS:
        return f"keyword `{token}`"
    return f'"{token}"'


def _syntax_error(err: lark.exceptions.UnexpectedInput, source: SourceFile) -> SpecError:
    line, column = max(err.line, 1), max(err.column, 1)
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        char = source.text[err.pos_in_stream] if err.pos_in_stream < len(source.text) else "?"
        span = Span(source, line, column, line, column + 1)
        if char == '"':
            return SpecError("unterminated string: a string must close with `\"` on the same line", span)
        return SpecError(f"unexpected character {char!r}", span, hint=_char_hint(char))
    token: Token = err.token
    expected = set(getattr(err, "expected", ()) or ())
    if token.type == "$END":
        span = end_of(source)
        if "RBRACE" in expected:
            return SpecError("the file ended inside a block: a closing `}` is missing", span)
        return SpecError(f"the file ended early; expected {expected_words(expected)}", span)
    width = len(str(token)) or 1
    span = Span(source, line, column, line, column + width)
    starts_a_statement = token.value in STATEMENT_KEYWORDS and "NUMBER" in expected
    if token.value in KEYWORDS and "NAME" in expected and not starts_a_statement:
        return SpecError(f"`{token}` is a reserved word and cannot be used as a name", span)
    previous = (getattr(err, "token_history", None) or [_word_before(source, token)])[-1]
    if previous is not None and previous.value in KEYWORDS and token.type in ("EQUAL", "PLUS_EQUAL", "COLON"):
        # `return = ...`, `in: int`: a keyword where the user meant a name
        return SpecError(f"`{previous}` is a reserved word and cannot be used as a name",
                         _tok_span(source, previous), hint=f"rename it, e.g. `{previous}_`")
    message = f"unexpected {_describe(token)}; expected {expected_words(expected)}"
    hint = None
    if token.type == "EQUAL" and "EQUAL" not in expected:
        hint = "a statement is `name = expression`; to compare values use `==`"
    elif expected >= {"EQUAL", "PLUS_EQUAL"}:
        hint = ("statements are assignments (`x = f(x)`, `a, b = f(x)`), residual updates (`x += f(x)`), "
                "`repeat`, `if` or `return`")
    elif "COLON" in expected:
        hint = "parameters need a type, as in `d_model: int = 512` or `x: Tensor[B, T, d_model]`"
    elif expected in ({"EQUAL"}, {"IN", "EQUAL"}):
        hint = "a spec parameter needs a default, as in `param d_model: int = 512`"
    elif token.type in _CLOSERS and token.type not in expected:
        hint = f"this `{token}` has no matching `{_CLOSERS[token.type]}`"
    return SpecError(message, span, hint=hint)


_CLOSERS = {"RPAR": "(", "RSQB": "[", "RBRACE": "{"}


def _char_hint(char: str) -> str | None:
    if char == "'":
        return 'strings use double quotes: "like this"'
    if char == ";":
        return "statements need no separator; put each on its own line"
    if char == "\ufeff":
        return "remove the byte-order mark (an invisible character some editors write)"
    lookalike = {"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "*", "\u201c": '"', "\u201d": '"'}
    if char in lookalike:
        return f"this is a typographic character; write `{lookalike[char]}`"
    return None


# ---- tree -> AST -------------------------------------------------------------


def _span(source: SourceFile, meta) -> Span:
    return Span(source, meta.line, meta.column, meta.end_line, meta.end_column)


def _word_before(source: SourceFile, token: Token) -> Token | None:
    """The word just before `token` on its line, where Lark's error does not carry the token history."""
    line = source.text.splitlines()[token.line - 1] if token.line else ""
    match = re.search(r"([A-Za-z_][A-Za-z0-9_]*)\s*$", line[:token.column - 1])
    if match is None:
        return None
    start = match.start(1) + 1
    return Token("NAME", match.group(1), line=token.line, column=start, end_line=token.line,
                 end_column=start + len(match.group(1)))


def _tok_span(source: SourceFile, tok: Token) -> Span:
    return Span(source, tok.line, tok.column, tok.end_line, tok.end_column)


@v_args(meta=True)
class _ToAst(Transformer):
    def __init__(self, source: SourceFile) -> None:
        super().__init__()
        self.source = source

    def _s(self, meta) -> Span:
        return _span(self.source, meta)

    # expressions
    def number(self, meta, c):
        text = str(c[0])
        try:
            value = int(text) if text.isdigit() else float(text)
        except ValueError:  # the grammar admits only valid numbers, but Python caps an int's digits
            raise SpecError(f"the number {text[:12]}... is too long", self._s(meta)) from None
        return ast.Num(value, self._s(meta))

    def string(self, meta, c):
        # The grammar admits only "..." with backslash escapes; literal_eval reads
        # exactly that and never executes anything.
        try:
            with warnings.catch_warnings():  # an unknown escape such as "\d" is an error, not a warning
                warnings.simplefilter("error")
                value = pyast.literal_eval(str(c[0]))
        except (ValueError, SyntaxError, Warning):
            raise SpecError("malformed string: a bad escape after `\\`", self._s(meta),
                            hint='escapes are \\n, \\t, \\" and \\\\ (a backslash itself)') from None
        return ast.Str(value, self._s(meta))

    def true(self, meta, c):
        return ast.Bool(True, self._s(meta))

    def false(self, meta, c):
        return ast.Bool(False, self._s(meta))

    def name(self, meta, c):
        return ast.Name(str(c[0]), self._s(meta))

    def atom(self, meta, c):
        # `( expr )`: the only atom Lark keeps as a tree (its parentheses are named terminals)
        return c[1]

    def list_lit(self, meta, c):
        items = tuple(x for x in c if not isinstance(x, Token) and x is not None)
        return ast.ListExpr(items, self._s(meta))

    def binop(self, meta, c):
        left, op, right = c
        return ast.BinOp(str(op), left, right, self._s(meta))

    def neg(self, meta, c):
        return ast.UnaryOp(str(c[0]), c[1], self._s(meta))

    def not_op(self, meta, c):
        return ast.UnaryOp("not", c[1], self._s(meta))

    def kwarg(self, meta, c):
        name = str(c[0]) if str(c[0]) in ARGUMENT_NAMES else self._check_name(c[0])
        return ast.Kwarg(name, c[2], self._s(meta))

    def args(self, meta, c):
        return [x for x in c if not isinstance(x, Token)]

    def call(self, meta, c):
        func, _lpar, args, _rpar = c
        self._check_name(func)
        positional, keywords, seen = [], [], set()
        for arg in args or ():
            if isinstance(arg, ast.Kwarg):
                if arg.name in seen:
                    raise SpecError(f"argument `{arg.name}` is given twice", arg.span)
                seen.add(arg.name)
                keywords.append(arg)
            elif keywords:
                raise SpecError(
                    "a positional argument cannot follow a keyword argument",
                    arg.span,
                    hint="put positional arguments first: `linear(x, 64, bias=false)`",
                )
            else:
                positional.append(arg)
        return ast.Call(
            str(func), tuple(positional), tuple(keywords), None, self._s(meta), _tok_span(self.source, func)
        )

    def labelled(self, meta, c):
        call, _as, label, shared = c
        return ast.Call(call.func, call.args, call.kwargs, self._check_name(label), self._s(meta), call.func_span,
                        shared=shared is not None)

    def index(self, meta, c):
        value, _lsqb, items, _rsqb = c
        return ast.Index(value, items, self._s(meta))

    def subscripts(self, meta, c):
        return tuple(x for x in c if not isinstance(x, Token))

    def ellipsis(self, meta, c):
        return ast.EllipsisIndex(self._s(meta))

    def slice(self, meta, c):
        # [start] ":" [stop] [":" [step]]: the parts between the colons, None where left out
        parts: list = [None]
        for child in c:
            if isinstance(child, Token) and child.type == "COLON":
                parts.append(None)
            elif child is not None:
                parts[-1] = child
        start, stop, step = (parts + [None, None])[:3]
        return ast.Slice(start, stop, step, self._s(meta))

    # types
    def scalar_type(self, meta, c):
        return ast.ScalarType(str(c[0]), self._s(meta))

    def dims(self, meta, c):
        return tuple(x for x in c if not isinstance(x, Token))

    def tensor_type(self, meta, c):
        return ast.TensorType(str(c[0]), c[2], self._s(meta))

    # statements
    def assign(self, meta, c):
        return ast.Assign(self._check_name(c[0]), c[2], self._s(meta))

    def aug_assign(self, meta, c):
        return ast.AugAssign(self._check_name(c[0]), c[2], self._s(meta))

    def unpack(self, meta, c):
        equal = next(i for i, x in enumerate(c) if isinstance(x, Token) and x.type == "EQUAL")
        names = [t for t in c[:equal] if t.type == "NAME"]
        seen: dict[str, Token] = {}
        for tok in names:
            name = self._check_name(tok)
            if name in seen and name != "_":
                raise SpecError(f"`{name}` is assigned twice in one statement", _tok_span(self.source, tok),
                                hint="use `_` for a part you do not need")
            seen[name] = tok
        values = tuple(x for x in c[equal + 1:] if not isinstance(x, Token))
        return ast.Unpack(tuple(str(t) for t in names), tuple(_tok_span(self.source, t) for t in names), values,
                          self._s(meta))

    def body(self, meta, c):
        return tuple(x for x in c if not isinstance(x, Token))

    def repeat_stmt(self, meta, c):
        _kw, var, _in, start, _range, stop, _as, name, body = c
        return ast.Repeat(self._check_name(var), start, stop, self._check_name(name) if name else None, body,
                          self._s(meta))

    def elif_clause(self, meta, c):
        return (c[1], c[2])

    def else_clause(self, meta, c):
        return c[1]

    def if_stmt(self, meta, c):
        branches = [(c[1], c[2])]
        orelse: tuple = ()
        for extra in c[3:]:
            if isinstance(extra, tuple) and len(extra) == 2 and not isinstance(extra[0], tuple) and _is_expr(extra[0]):
                branches.append(extra)
            elif extra is not None:
                orelse = extra
        return ast.If(tuple(branches), orelse, self._s(meta))

    def return_stmt(self, meta, c):
        return ast.Return(tuple(x for x in c if not isinstance(x, Token)), self._s(meta))

    # declarations
    def _check_name(self, tok: Token) -> str:
        # The contextual lexer lets a keyword through where only a name can
        # stand; reject it here so `in` or `as` never become variables.
        if str(tok) in KEYWORDS:
            raise SpecError(
                f"`{tok}` is a reserved word and cannot be used as a name", _tok_span(self.source, tok)
            )
        return str(tok)

    def param(self, meta, c):
        name, _colon, typ, _eq, default = c
        return ast.Param(self._check_name(name), typ, default, self._s(meta))

    def params(self, meta, c):
        return tuple(x for x in c if not isinstance(x, Token))

    def param_decl(self, meta, c):
        _kw, name, _colon, typ, _in, choices, _eq, default = c
        return ast.ParamDecl(self._check_name(name), typ, default, self._s(meta), choices)

    def use_decl(self, meta, c):
        string = self.string(meta, [c[1]])
        return ast.Use(string.value, self._s(meta))

    def block_def(self, meta, c):
        _kw, name, _l, params, _r, body = c
        return ast.BlockDef(self._check_name(name), params or (), body, self._s(meta))

    def model_def(self, meta, c):
        _kw, name, _l, params, _r, body = c
        return ast.BlockDef(self._check_name(name), params or (), body, self._s(meta), is_model=True)

    def start(self, meta, c):
        uses = tuple(x for x in c if isinstance(x, ast.Use))
        params = tuple(x for x in c if isinstance(x, ast.ParamDecl))
        blocks = tuple(x for x in c if isinstance(x, ast.BlockDef))
        return ast.Module(self.source, uses, params, blocks)


def _is_expr(x) -> bool:
    return isinstance(x, (ast.Num, ast.Str, ast.Bool, ast.Name, ast.ListExpr, ast.BinOp, ast.UnaryOp, ast.Call,
                          ast.Index))
