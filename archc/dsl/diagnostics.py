"""Errors a user can act on: file:line:col, the source line, a caret, what was expected.

Every problem with a spec or an override is raised as `SpecError`; the CLI
renders it with `render()` and exits 1, never showing a Python traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from archc.dsl.ast import SourceFile, Span

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
    # Lines as the parser counts them: only "\n" ends one (not "\r", "\f" or U+2028).
    lines = span.source.text.split("\n")
    raw = lines[span.line - 1] if 0 < span.line <= len(lines) else ""
    # Tabs expand, so the caret is placed by the expanded prefix, not by the column.
    start = len(raw[:span.column - 1].expandtabs(4))
    end = start + 1
    if span.end_line == span.line and span.end_column > span.column:
        end = len(raw[:span.end_column - 1].expandtabs(4))
    text = "".join(c if c.isprintable() else " " for c in raw.rstrip("\r").expandtabs(4))
    gutter = f"{span.line:>4} | "
    caret = " " * (len(gutter) + start) + "^" * max(1, end - start)
    return f"{span}: {kind}: {message}\n{gutter}{text}\n{caret}"


def end_of(source: SourceFile) -> Span:
    """Just after the last character of the last non-blank line: where a missing `}` or `model` goes."""
    lines = source.text.split("\n")
    line = max((i for i, text in enumerate(lines, 1) if text.strip()), default=1)
    column = len(lines[line - 1].rstrip()) + 1
    return Span(source, line, column, line, column + 1)


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The known name closest to a misspelling, or None."""
    matches = difflib.get_close_matches(name, sorted(set(choices)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, choices: Iterable[str]) -> str | None:
    """The closest known name to a misspelling, as a hint, or None."""
    match = closest(name, choices)
    return f"did you mean `{match}`?" if match else None


def expected_words(terminals: Iterable[str]) -> str:
    words = sorted({TOKEN_WORDS.get(t, t.lower()) for t in terminals if not t.startswith("__")})
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]
