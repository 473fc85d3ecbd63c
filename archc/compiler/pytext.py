"""Spec-derived text made safe for the two places it may appear in generated code.

File names, parameter values and labels come from the user and may hold quotes,
backslashes, newlines or other line breaks. Inside a comment or a docstring such
text is written as the body of its own `repr`, with every double quote escaped, so
it can never end the comment's line, close the docstring, or start an escape the
docstring would interpret: what it says is shown, never run.
"""

from __future__ import annotations


def inert(text: object) -> str:
    """`text` on one line with no line break, no unescaped quote and no unescaped backslash."""
    shown = repr(str(text))
    body = shown[1:-1]
    if shown[0] == "'":  # repr left double quotes bare; escape them (single quotes are already)
        body = body.replace('"', '\\"')
    return body


def comment(text: object) -> str:
    """A `# ...` comment holding `text` (safe: it stays on its line)."""
    return "# " + inert(text)


def docstring_line(text: object) -> str:
    """One line of a triple-quoted docstring holding `text` (safe: it cannot close the string)."""
    return inert(text)
