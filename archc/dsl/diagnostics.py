"""Errors a user can act on: file:line:col, the source line, a caret, what was expected.

Every problem with a spec or an override is raised as `SpecError`; the CLI
renders it with `render()` and exits 1, never showing a Python traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from archc.dsl.ast import Span

# What each grammar terminal means, in the user's words (never a Lark name).
TOKEN_WORDS = {
    "USE": '"use"',
    "PARAM": '"param"',
    "BLOCK": '"block"',
    "MODEL": '"model"',
    "REPEAT": '"repeat"',
    "IN": '"in"',
    "AS": '"as"',
    "IF": '"if"',
    "ELIF": '"elif"',
    "ELSE": '"else"',
    "RETURN": '"return"',
    "TRUE": '"true"',
    "FALSE": '"false"',
    "AND": '"and"',
    "OR": '"or"',
    "NOT": '"not"',
    "COLON": '":"',
    "COMMA": '","',
    "EQUAL": '"="',
    "PLUS_EQUAL": '"+="',
    "LPAR": '"("',
    "RPAR": '")"',
    "LSQB": '"["',
    "RSQB": '"]"',
    "LBRACE": '"{"',
    "RBRACE": '"}"',
    "RANGE": '".."',
    "POW": '"**"',
    "COMP_OP": "a comparison (== != < <= > >=)",
    "ADD_OP": '"+" or "-"',
    "MUL_OP": '"*", "/", "//" or "%"',
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "$END": "the end of the file",
}


class SpecError(Exception):
    """A problem in a spec, an override or an option, located where it can be fixed."""

    def __init__(
        self,
        message: str,
        span: Span | None = None,
        *,
        hint: str | None = None,
        notes: Iterable[tuple[str, Span | None]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.span = span
        self.hint = hint
        self.notes = tuple(notes)

    def render(self) -> str:
        out = [_located("error", self.message, self.span)]
        for note, span in self.notes:
            out.append(_located("note", note, span))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()


def _located(kind: str, message: str, span: Span | None) -> str:
    if span is None:
        return f"{kind}: {message}"
    text = span.source.line(span.line).expandtabs(4)
    width = 1
    if span.end_line == span.line and span.end_column > span.column:
        width = span.end_column - span.column
    gutter = f"{span.line:>4} | "
    caret = " " * (len(gutter) + span.column - 1) + "^" * max(1, width)
    return f"{span}: {kind}: {message}\n{gutter}{text}\n{caret}"


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """The closest known name to a misspelling, as a hint, or None."""
    matches = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.6)
    return f"did you mean `{matches[0]}`?" if matches else None


def expected_words(terminals: Iterable[str]) -> str:
    words = sorted({TOKEN_WORDS.get(t, t.lower()) for t in terminals if not t.startswith("__")})
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]
