"""The flags every command shares (-D, --kernel, --no-pass, IR dumps), turned into `archc.compile` arguments."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

from archc.dsl.diagnostics import SpecError


def pairs(values: list[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise SpecError(f"{flag} {item!r}: expected {flag} NAME=VALUE")
        _once(out, key.strip(), value.strip(), flag)
    return out


def _once(out: dict, key: str, value, flag: str) -> None:
    """A name given twice is an error, not last-wins: in a long command line the earlier value is easy to miss."""
    if key in out:
        raise SpecError(f"{flag} {key} is given twice ({out[key]!r}, then {value!r}); give it once")
    out[key] = value


def compile_options(args) -> dict:
    """The keyword arguments of `archc.compile` that the common flags ask for."""
    from archc.compiler.api import dump_stages, print_stage
    from archc.compiler.lower import parse_override
    from archc.compiler.passes import PASS_NAMES
    from archc.dsl.diagnostics import did_you_mean

    which = getattr(args, "print_ir_after", None)
    if which not in (None, "all", "lower") and which not in PASS_NAMES:
        raise SpecError(f"--print-ir-after {which}: no such pass",
                        hint=did_you_mean(which, PASS_NAMES) or f"passes: {', '.join(PASS_NAMES)}")
    hooks: list[Callable] = []
    if which:
        hooks.append(print_stage(sys.stderr, which))
    if getattr(args, "dump_dir", None):
        hooks.append(dump_stages(args.dump_dir))

    def on_stage(name, graph):
        for hook in hooks:
            hook(name, graph)

    overrides: dict = {}
    for define in args.define or ():
        _once(overrides, *parse_override(define), "-D")
    return dict(overrides=overrides,
                kernels=pairs(args.kernel, "--kernel"), disable=tuple(args.no_pass or ()),
                on_stage=on_stage if hooks else None)


def at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low` (and below `high`); a bad value is a usage error that
    names the flag."""

    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value >= high):
            within = f"in [{low}, {high})" if high is not None else f"of at least {low}"
            raise argparse.ArgumentTypeError(f"expected an integer {within}, got {text!r}")
        return value

    return convert


def number(low: float, high: float = math.inf, low_open: bool = False, why: str = "") -> Callable[[str], float]:
    """An argparse type: a finite number above (`low_open`) or at least `low`, and at most `high`."""

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            bounds = f"{'above' if low_open else 'at least'} {low:g}" + (f", at most {high:g}" if high < math.inf
                                                                        else "")
            raise argparse.ArgumentTypeError(f"expected a number {bounds}{why}, got {text!r}")
        return value

    return convert


def add_memory_option(p: argparse.ArgumentParser) -> None:
    """--no-memory-check, for the commands that build a model from a checkpoint (eval, convert, export)."""
    p.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                   help="build the model even where its weights seem not to fit in the memory free here")
