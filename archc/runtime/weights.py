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


def to_canonical(compiled, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model state dict in canonical names (fused weights split back into their parts)."""
    layout = fused_layout(compiled)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key in layout:
            for name, start, size in layout[key]:
                out[name] = tensor[start:start + size]
        else:
            out[key] = tensor
    return out


def load_canonical(model: torch.nn.Module, compiled, weights: dict[str, torch.Tensor],
                   strict: bool = True) -> LoadReport:
    """Copy canonically named `weights` into `model`; raise WeightsError on any mismatch if strict."""
    layout = fused_layout(compiled)
    target = model.state_dict()
    expected: dict[str, tuple[str, int, int] | None] = {}
    for key in target:
        if key in layout:
            for name, start, size in layout[key]:
                expected[name] = (key, start, size)
        else:
            expected[key] = None
    missing = tuple(k for k in expected if k not in weights)
    unexpected = tuple(k for k in weights if k not in expected)
    mismatched = []
    for name, tensor in weights.items():
        if name not in expected:
            continue
        where = expected[name]
        want = tuple(target[name].shape) if where is None else (where[2], *target[where[0]].shape[1:])
        if tuple(tensor.shape) != want:
            mismatched.append((name, want, tuple(tensor.shape)))
    report = LoadReport(missing, unexpected, tuple(mismatched))
    if strict and not report.ok:
        raise WeightsError(report.render())
    with torch.no_grad():
        for name, tensor in weights.items():
            where = expected.get(name, "?")
            if where == "?" or any(m[0] == name for m in mismatched):
                continue
            if where is None:
                target[name].copy_(tensor)
            else:
                key, start, size = where
                target[key][start:start + size].copy_(tensor)
    return report
