"""`archc sweep`: train every point of a grid of spec parameters briefly, on the same data and
seed, and compare validation perplexity, throughput and size (the seed's first use of perplexity)."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
from collections.abc import Iterator, Sequence
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


MAX_POINTS = 1000  # runs one sweep may start; a grid counted larger is refused before anything is built


def parse_axis(text: str) -> tuple[str, Sequence[Any]]:
    """`name=a,b,c` or `name=range(a,b[,step])` -> (name, values); a range stays a `range` (never a list)."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name or not values.strip():
        raise SpecError(f"-m {text!r}: expected -m name=a,b,c or -m name=range(a,b)")
    match = re.fullmatch(r"\s*range\(\s*(-?\d+)\s*,\s*(-?\d+)\s*(?:,\s*(-?\d+)\s*)?\)\s*", values)
    if match:
        start, stop, step = int(match[1]), int(match[2]), int(match[3] or 1)
        if step == 0:
            raise SpecError(f"-m {text!r}: range step cannot be 0")
        if not range(start, stop, step):
            raise SpecError(f"-m {text!r}: the range is empty (Python's range: from a up to, not including, b"
                            f"{'; count down with a negative step' if stop < start and step > 0 else ''})")
        return name, range(start, stop, step)
    items = [v.strip() for v in values.split(",")]
    if any(not v for v in items):
        raise SpecError(f"-m {text!r}: empty value in the list")
    return name, [parse_override(f"{name}={v}")[1] for v in items]


def grid(axes: list[str], fixed: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """The cartesian product of the axes, in the order given, generated lazily after its size is checked
    against MAX_POINTS. A parameter also set by `fixed` (-D) is refused: one of the two would be ignored."""
    parsed = [parse_axis(a) for a in axes]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise SpecError("-m: the same parameter is swept twice")
    both = [n for n in names if n in (fixed or {})]
    if both:
        raise SpecError(f"-m {both[0]}: also set with -D {both[0]}={fixed[both[0]]!r}; drop one of them")
    points = math.prod(len(values) for _, values in parsed)
    if points > MAX_POINTS:
        sizes = " x ".join(f"{len(values):,} ({name})" for name, values in parsed)
        raise SpecError(f"-m: the grid has {points:,} points ({sizes}); a sweep runs at most {MAX_POINTS:,}: "
                        "sweep fewer values (a range step, e.g. range(64,1024,64))")
    return (dict(zip(names, combo)) for combo in itertools.product(*(v for _, v in parsed)))


def run_name(overrides: dict[str, Any]) -> str:
    """The directory name of one point under --out-dir: `name=value,...` with every character other than
    letters, digits and `._=,+-` replaced by `_` (so a swept string cannot name a path outside --out-dir),
    and a hash of the exact values added when anything was replaced or cut (so two points never share one)."""
    tag = ",".join(f"{k}={v}" for k, v in overrides.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", tag)[:120]
    if safe != tag:
        safe += "-" + hashlib.sha256(tag.encode()).hexdigest()[:10]
    return safe


def run_sweep(spec, axes: list[str], config, base: dict[str, Any] | None = None, overwrite: bool = False,
              **compile_kw) -> list[SweepPoint]:
    """Train each grid point with `config` (its out_dir gets a subdirectory per point; `overwrite` replaces
    the runs of an earlier sweep there)."""
    import archc
    from archc.training.train import train

    points = []
    for overrides in grid(axes, base):
        merged = {**(base or {}), **overrides}
        archc.compile(spec, merged, **compile_kw)  # fail fast on a bad point before any training
        run_config = attrs.evolve(config, out_dir=str(Path(config.out_dir) / run_name(overrides)))
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
