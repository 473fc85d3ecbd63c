"""Load weights by their canonical (unfused) names into a compiled model.

Passes may fuse several linears into one (`fuse_projections`); weight maps and
checkpoints from elsewhere name the linears one by one. The canonical names
are the state-dict names the model would have without fusion; this module
moves tensors between the two layouts, with a strict report of missing,
unexpected and mis-shaped keys.
"""

from __future__ import annotations

import attrs
import torch


class WeightsError(Exception):
    """Weights that do not fit the model: names the keys and shapes."""


@attrs.frozen
class LoadReport:
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    mismatched: tuple[tuple[str, tuple, tuple], ...]  # (name, expected, got)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def render(self) -> str:
        lines = []
        if self.missing:
            lines.append(f"missing ({len(self.missing)}): " + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
        for name, want, got in self.mismatched:
            lines.append(f"shape mismatch: {name} expects {list(want)}, got {list(got)}")
        return "\n".join(lines) or "all weights matched"


def fused_layout(compiled) -> dict[str, list[tuple[str, int, int]]]:
    """Fused state-dict name -> [(canonical name, row start, row count)]."""
    layout: dict[str, list[tuple[str, int, int]]] = {}
    for node in compiled.ir.nodes():
        if node.op != "fused_linear":
            continue
        prefix = f"{node.scope}." if node.scope else ""
        for suffix in ("weight", "bias") if node.attrs["bias"] else ("weight",):
            start, rows = 0, []
            for name, size in node.attrs["parts"]:
                rows.append((f"{prefix}{name}.{suffix}", start, size))
                start += size
            layout[f"{node.path}.{suffix}"] = rows
    return layout


def stacked_layout(compiled) -> dict[str, list[tuple[str, int]]]:
    """Stacked expert weight name ([E, in, out]) -> [(canonical name of expert e's linear, e)]."""
    layout: dict[str, list[tuple[str, int]]] = {}
    for node in compiled.ir.nodes():
        if node.op == "grouped_linear":
            layout[f"{node.path}.weight"] = [(f"{node.scope}.{e}.{node.name}.weight", e)
                                             for e in range(node.attrs["experts"])]
    return layout


def _where(compiled, target: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """Canonical name -> where it lives in the model: ("same", key), ("rows", key, start, size), ("expert", key, e)."""
    rows, stacked = fused_layout(compiled), stacked_layout(compiled)
    where: dict[str, tuple] = {}
    for key in target:
        if key in rows:
            for name, start, size in rows[key]:
                where[name] = ("rows", key, start, size)
        elif key in stacked:
            for name, e in stacked[key]:
                where[name] = ("expert", key, e)
        else:
            where[key] = ("same", key)
    return where


def _view(target: dict[str, torch.Tensor], place: tuple) -> torch.Tensor:
    """The canonical tensor as a view into the model's tensor (an expert's weight is transposed)."""
    if place[0] == "rows":
        return target[place[1]][place[2]:place[2] + place[3]]
    if place[0] == "expert":
        return target[place[1]][place[2]].t()
    return target[place[1]]


def to_canonical(compiled, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict in canonical names (fused and stacked weights split back into their parts)."""
    return {name: _view(state, place) for name, place in _where(compiled, state).items()}


def load_canonical(model: torch.nn.Module, compiled, weights: dict[str, torch.Tensor],
                   strict: bool = True) -> LoadReport:
    """Copy canonically named `weights` into `model`; raise WeightsError on any mismatch if strict."""
    target = model.state_dict()
    where = _where(compiled, target)
    missing = tuple(k for k in where if k not in weights)
    unexpected = tuple(k for k in weights if k not in where)
    mismatched = tuple((name, tuple(_view(target, where[name]).shape), tuple(tensor.shape))
                       for name, tensor in weights.items()
                       if name in where and tuple(tensor.shape) != tuple(_view(target, where[name]).shape))
    report = LoadReport(missing, unexpected, mismatched)
    if strict and not report.ok:
        raise WeightsError(report.render())
    bad = {m[0] for m in mismatched}
    with torch.no_grad():
        for name, tensor in weights.items():
            if name in where and name not in bad:
                _view(target, where[name]).copy_(tensor)
    return report
