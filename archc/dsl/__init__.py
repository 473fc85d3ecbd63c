"""The .arch language: grammar, typed AST, parser and diagnostics. Knows nothing of torch."""

from archc.dsl.ast import SourceFile, Span
from archc.dsl.diagnostics import SpecError, SpecErrors
from archc.dsl.parser import parse, parse_file

__all__ = ["SourceFile", "Span", "SpecError", "SpecErrors", "parse", "parse_file"]
