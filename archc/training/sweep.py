"""`archc sweep`: train every point of a grid of spec parameters briefly, on the same data and
seed, and compare validation perplexity, throughput and size (the seed's first use of perplexity)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

import attrs

from archc.compiler.lower import parse_override
from archc.dsl.diagnostics import SpecError


@attrs.frozen
class SweepPoint:
    overrides: dict[str, Any]
    params: int
    val_perplexity: float
    initial_val_perplexity: float | None
    tokens_per_second: float
    out_dir: Path


def parse_axis(text: str) -> tuple[str, list[Any]]:
    """`name=a,b,c` or `name=range(a,b[,step])` -> (name, values)."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise SpecError(f"-m {text!r}: expected -m name=a,b,c or -m name=range(a,b)")
    match = re.fullmatch(r"\s*range\(\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)\s*", values)
    if match:
        start, stop, step = int(match[1]), int(match[2]), int(match[3] or 1)
        if step == 0:
            raise SpecError(f"-m {text!r}: range step cannot be 0")
        return name, list(range(start, stop, step))
    items = [v.strip() for v in values.split(",")]
    if any(not v for v in items):
        raise SpecError(f"-m {text!r}: empty value in the list")
    return name, [parse_override(f"{name}={v}")[1] for v in items]


def grid(axes: list[str]) -> list[dict[str, Any]]:
    """The cartesian product of the axes, in the order given."""
    parsed = [parse_axis(a) for a in axes]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise SpecError("-m: the same parameter is swept twice")
    return [dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in parsed))]


def run_sweep(spec, axes: list[str], config, base: dict[str, Any] | None = None, overwrite: bool = False,
              **compile_kw) -> list[SweepPoint]:
    """Train each grid point with `config` (its out_dir gets a subdirectory per point; `overwrite` replaces
    the runs of an earlier sweep there)."""
    import archc
    from archc.training.train import train

    points = []
    for overrides in grid(axes):
        merged = {**(base or {}), **overrides}
        archc.compile(spec, merged, **compile_kw)  # fail fast on a bad point before any training
        tag = ",".join(f"{k}={v}" for k, v in overrides.items())
        run_config = attrs.evolve(config, out_dir=str(Path(config.out_dir) / tag))
        result = train(spec, run_config, merged, overwrite=overwrite, **compile_kw)
        params = archc.compile(spec, merged, **compile_kw).num_params()
        points.append(SweepPoint(overrides, params, result.val_perplexity, result.initial_val_perplexity,
                                 result.tokens_per_second, result.out_dir))
    return points


def table(points: list[SweepPoint]) -> str:
    header = ("point", "params", "val ppl", "ppl@0", "tokens/s")
    rows = [(",".join(f"{k}={v}" for k, v in p.overrides.items()), f"{p.params:,}", f"{p.val_perplexity:.3f}",
             f"{p.initial_val_perplexity:.1f}" if p.initial_val_perplexity else "-", f"{p.tokens_per_second:,.0f}")
            for p in sorted(points, key=lambda p: p.val_perplexity)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = lambda cols: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cols, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]) + "\n"
