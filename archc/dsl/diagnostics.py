"""Errors a user can act on: file:line:col, the source line, a caret, what was expected.

Every problem with a spec or an override is raised as `SpecError`; the CLI
renders it with `render()` and exits 1, never showing a Python traceback.
Independent problems found in one pass are gathered by a `Collector` and
raised together as `SpecErrors`, so one run reports them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

from archc.dsl.ast import SourceFile, Span

# What each grammar terminal means, in the user's words (never a Lark name),
# in the order an "expected ..." list names them.
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
    "SHARED": '"shared"',
    "EQUAL": '"="',
    "PLUS_EQUAL": '"+="',
    "COLON": '":"',
    "COMMA": '","',
    "LPAR": '"("',
    "RPAR": '")"',
    "LSQB": '"["',
    "RSQB": '"]"',
    "LBRACE": '"{"',
    "RBRACE": '"}"',
    "RANGE": '".."',
    "ELLIPSIS": '"..."',
    "POW": '"**"',
    "COMP_OP": "a comparison (== != < <= > >=)",
    "ADD_OP": '"+" or "-"',
    "MUL_OP": '"*", "/", "//", "%" or "@"',
    "SHIFT_OP": '"<<" or ">>"',
    "AMP": '"&"',
    "BAR": '"|"',
    "CARET": '"^"',
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

    kind = "error"

    def render(self) -> str:
        out = [_located(self.kind, self.message, self.span)]
        for note, span in self.notes:
            out.append(_located("note", note, span))
        if self.hint:
            out.append(f"  hint: {self.hint}")
        return "\n".join(out)

    def __str__(self) -> str:
        return self.render()

    @property
    def errors(self) -> tuple[SpecError, ...]:
        """Every problem this error reports (one here; several for `SpecErrors`)."""
        return (self,)


class SpecWarning(SpecError):
    """A spec that compiles but likely does not mean what it says: shown as a warning, never raised."""

    kind = "warning"


class SpecErrors(SpecError):
    """Several independent problems, reported together.

    It reads as its first problem (`message`, `span`, `hint`), so code that
    handles one `SpecError` keeps working; `render()` shows them all, in the
    order of the source, and counts them.
    """

    def __init__(self, errors: Sequence[SpecError]) -> None:
        if len(errors) < 2:
            raise ValueError("SpecErrors holds two or more errors; raise a single one as it is")
        first = errors[0]
        super().__init__(first.message, first.span, hint=first.hint, notes=first.notes)
        self._errors = tuple(errors)

    @property
    def errors(self) -> tuple[SpecError, ...]:
        return self._errors

    def render(self) -> str:
        parts = [err.render() for err in self._errors]
        return "\n\n".join(parts) + f"\n\n{len(self._errors)} errors"


class Collector:
    """Gathers independent SpecErrors from one pass so that a run reports them all.

        errors = Collector()
        for stmt in body:
            with errors.attempt():
                check(stmt)
        errors.raise_any()

    Duplicates (same place, same message) are kept once; past `limit` the rest
    are counted in a last note rather than shown.
    """

    def __init__(self, limit: int = 20) -> None:
        self.limit = limit
        self._errors: list[SpecError] = []
        self._seen: set[tuple] = set()

    def add(self, err: SpecError) -> None:
        for one in err.errors:
            key = (_position(one.span), one.message)
            if key not in self._seen:
                self._seen.add(key)
                self._errors.append(one)

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """Run a check; a SpecError it raises is collected instead of ending the pass."""
        try:
            yield
        except SpecError as err:
            self.add(err)

    def __bool__(self) -> bool:
        return bool(self._errors)

    def __len__(self) -> int:
        return len(self._errors)

    def error(self) -> SpecError | None:
        """The collected problems as one error (None when there are none)."""
        if not self._errors:
            return None
        ordered = sorted(self._errors, key=lambda e: _position(e.span))
        if len(ordered) > self.limit:
            rest = len(ordered) - self.limit
            last = ordered[self.limit - 1]
            ordered = ordered[:self.limit - 1] + [SpecError(
                last.message, last.span, hint=last.hint,
                notes=[*last.notes, (f"... and {rest} more problems like these; fix these first", None)])]
        return ordered[0] if len(ordered) == 1 else SpecErrors(ordered)

    def raise_any(self) -> None:
        err = self.error()
        if err is not None:
            raise err


def _position(span: Span | None) -> tuple:
    if span is None:
        return ("", 0, 0)
    return (span.source.name, span.line, span.column)


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


# ---- "did you mean" ------------------------------------------------------------


def edit_distance(a: str, b: str) -> int:
    """Edits (insert, delete, replace, swap two neighbours) that turn `a` into `b`."""
    prev2: list[int] = []
    prev = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        row = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def _allowed(name: str) -> int:
    """How many edits a misspelling of `name` may be: none under 3 letters, 1 up to 5, 2 up to 8, then 3."""
    return 0 if len(name) < 3 else 1 if len(name) <= 5 else 2 if len(name) <= 8 else 3


def closest(name: str, choices: Iterable[str], *fallbacks: Iterable[str], exclude: Iterable[str] = ()) -> str | None:
    """The known name a misspelling most likely meant, or None.

    `choices` are names of the kind expected where `name` stands (ops for a
    call, variables for a value); `fallbacks`, other kinds, are tried only when
    no choice is close. A name is close when few edits apart for its length
    (`lineer` -> `linear`, never `softmax` -> `max` or `cross_entropy` ->
    `cross_attention`), or equal but for case and underscores
    (`LayerNorm` -> `layer_norm`), or the only one that adds or drops an underscored word
    (`match_rms` -> `match_rms_adamw`). Names in `exclude` (say, the model's own
    name) are never suggested.
    """
    skip = set(exclude) | {name}
    squashed = name.replace("_", "").lower()
    for group in (choices, *fallbacks):
        known = sorted(set(group) - skip)
        same = [c for c in known if c.replace("_", "").lower() == squashed]
        if same:
            return same[0]
        # a word left off or added at an underscore (`match_rms` -> `match_rms_adamw`), when only one fits
        words = [c for c in known if c.startswith(name + "_") or name.startswith(c + "_")]
        if len(words) == 1:
            return words[0]
        scored = sorted((edit_distance(name.lower(), c.lower()), c[:1] != name[:1], c) for c in known)
        if scored and scored[0][0] <= _allowed(name):
            return scored[0][2]
    return None


def did_you_mean(name: str, choices: Iterable[str], *fallbacks: Iterable[str],
                 exclude: Iterable[str] = ()) -> str | None:
    """The closest known name to a misspelling, as a hint, or None."""
    match = closest(name, choices, *fallbacks, exclude=exclude)
    return f"did you mean `{match}`?" if match else None


# ---- what a parse error expected ----------------------------------------------

# Terminals that continue an expression: named as "an operator" only when
# nothing more specific (a closing bracket, a comma) is expected too.
OPERATORS = frozenset({"ADD_OP", "MUL_OP", "POW", "COMP_OP", "IN", "AND", "OR", "SHIFT_OP", "AMP", "BAR",
                       "CARET", "AS", "LSQB"})
# Groups named by one phrase when all their `marks` are expected.
GROUPS = (
    ("an expression", frozenset({"NAME", "NUMBER", "STRING", "TRUE", "FALSE", "LPAR", "LSQB", "ADD_OP", "NOT"}),
     frozenset({"NUMBER", "STRING"})),
    ("a statement", frozenset({"NAME", "REPEAT", "IF", "RETURN"}), frozenset({"REPEAT", "IF", "RETURN"})),
)
_ORDER = {name: i for i, name in enumerate(TOKEN_WORDS)}


def expected_words(terminals: Iterable[str]) -> str:
    """What fits where a parse stopped, in a few words: `an expression`, `"," or ")"`."""
    left = {t for t in terminals if not t.startswith("__")}
    phrases = []
    for phrase, members, marks in GROUPS:
        if marks <= left:
            phrases.append(phrase)
            left -= members
    operators = left & OPERATORS
    if len(operators) >= 3:
        left -= OPERATORS
        if not (left & {"RPAR", "RSQB", "RBRACE", "COMMA", "LBRACE", "COLON"}) and not phrases:
            phrases.insert(0, "an operator")
    words = phrases + [TOKEN_WORDS.get(t, t.lower()) for t in sorted(left, key=lambda t: _ORDER.get(t, 99))]
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]
