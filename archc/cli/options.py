"""The flags every command shares (-D, --kernel, --no-pass, IR dumps), turned into `archc.compile` arguments."""

from __future__ import annotations

import sys
from collections.abc import Callable

from archc.dsl.diagnostics import SpecError


def pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in values or ():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SpecError(f"{flag} {item!r}: expected {flag} NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


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

    return dict(overrides=dict(parse_override(d) for d in args.define or ()),
                kernels=pairs(args.kernel, "--kernel"), disable=tuple(args.no_pass or ()),
                on_stage=on_stage if hooks else None)
