"""Run a weight map over tensors: checkpoint -> archc's canonical names (strict), and back.

Import (`to_archc`) consumes every checkpoint key and, given the model's
canonical names and shapes (`expect`), produces exactly those: every problem
(unknown key, missing weight, a part that does not fit, a tied copy that
differs) is collected and reported together, by checkpoint key. Export
(`to_hf`) runs each rule backwards — the first rule a map lists for a weight
is the layout written, so a map that accepts two layouts writes the first.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from archc.interop.maps import Rename, Split, Stack, Tied, Transpose, WeightMap
from archc.interop.weights import WeightsError

__all__ = ["check_dtypes", "to_archc", "to_hf"]

Shapes = Mapping[str, Sequence[int]]
_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_dtypes(wmap: WeightMap, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse integer and 8-bit float tensors (quantized checkpoints): archc never casts them silently."""
    ignored = set(wmap.ignored)
    bad = [f"{key} ({str(t.dtype).removeprefix('torch.')})" for key, t in state.items()
           if t.dtype not in _FLOATS and _INDEX.sub("{}", key) not in ignored
           and wmap.base_prefix + _INDEX.sub("{}", key) not in ignored]
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise WeightsError(f"{source}: {', '.join(bad[:5])}{more}: integer or 8-bit tensors are quantized weights; "
                           "archc loads float32/bfloat16/float16 checkpoints only and never casts quantized "
                           "ones (dequantize the checkpoint first)")


# ----------------------------------------------------------------------------
# Checkpoint -> archc


def to_archc(wmap: WeightMap, state: Mapping[str, torch.Tensor], expect: Shapes | None = None,
             params: Mapping[str, Any] | None = None, *, n_layers: int | None = None, tied: bool = False,
             skip_layers: range = range(0)) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(canonical tensors, canonical name -> the checkpoint key it came from).

    `expect` (canonical name -> shape) is what the model holds: no more and no less is accepted, and
    Split and Stack cut parts of its sizes. Without it, parts are equal, `n_layers` bounds the layer
    index, `tied` says whether the head is tied, and missing weights are not detected. Keys of
    `skip_layers` (layers the spec does not build) are dropped. `params` are the spec's, for
    transforms that name one (PermuteRotary)."""
    rules = wmap.rules()
    params = params or {}
    out: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    unknown: list[str] = []
    problems: list[str] = []
    copies: list[tuple[str, str]] = []
    for key, tensor in state.items():
        pattern, index = _pattern(key, wmap, rules)
        if pattern in wmap.ignored or (index and index[0] in skip_layers):
            continue
        rule = rules.get(pattern)
        if rule is None or (expect is None and n_layers is not None and index and index[0] >= n_layers):
            unknown.append(key)
            continue
        if isinstance(rule, Tied):
            own = rule.untied.format(*index) if rule.untied else None
            if own is None or (own not in expect if expect is not None else tied):
                copies.append((key, rule.source.format(*index)))
                continue
            rule = Rename(rule.untied)
        try:
            parts = _forward(rule, key, tensor, index, expect, params)
        except WeightsError as err:
            problems.append(str(err))
            continue
        if expect is not None:
            stray = [name for name in parts if name not in expect]
            if len(stray) == len(parts):  # e.g. a layer past n_layers, or an MoE key in a dense layer
                unknown.append(key)
                continue
            if stray:
                problems.append(f"{key} gives {', '.join(stray)}, which the model does not have")
                continue
        for name, part in parts.items():
            if name in out:  # e.g. a checkpoint holding keys both with and without the base prefix
                problems.append(f"{key} and {sources[name]} both give {name}")
            out[name] = part.contiguous()  # transposed views would not save as safetensors
            sources[name] = key
    for key, source in copies:
        if source in sources and not torch.equal(state[key], state[sources[source]]):
            problems.append(f"{key} differs from {sources[source]}, but the spec ties them (one weight)")
    missing = _checkpoint_keys([name for name in expect if name not in out], rules) if expect is not None else []
    if unknown or missing or problems:
        lines = [f"the checkpoint does not fit the {wmap.model_type} weight map ({wmap.origin}):"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unknown:
            lines.append(f"  unexpected ({len(unknown)}): " + ", ".join(unknown))
        lines += [f"  {p}" for p in problems]
        raise WeightsError("\n".join(lines))
    return out, sources


def _pattern(key: str, wmap: WeightMap, rules: Mapping[str, Any]) -> tuple[str, tuple[int, ...]]:
    """The key pattern of `key` and its indices ("h.3.ln_1.weight" -> "h.{}.ln_1.weight", (3,);
    "model.layers.1.mlp.experts.7.w1.weight" -> "model.layers.{}.mlp.experts.{}.w1.weight", (1, 7)).
    A map may spell the last indices of a key literally — a Sequential's fixed slots, diffusers'
    "ff.net.0.proj" and "ff.net.2" — so when the all-placeholder pattern is not the map's, patterns
    keeping the trailing indices as written are tried."""
    spans = list(_INDEX.finditer(key))
    known = rules.keys() | set(wmap.ignored)
    first = None
    for keep in range(len(spans), -1, -1):  # the indices that become placeholders: all, then fewer
        pattern, end = [], 0
        for m in spans[:keep]:
            pattern += [key[end: m.start()], "{}"]
            end = m.end()
        pattern = "".join(pattern) + key[end:]
        index = tuple(int(m.group()) for m in spans[:keep])
        if pattern not in known and wmap.base_prefix + pattern in known:
            pattern = wmap.base_prefix + pattern
        if pattern in known:
            return pattern, index
        first = first or (pattern, index)
    return first


def _forward(rule, key: str, tensor: torch.Tensor, index: tuple[int, ...], expect: Shapes | None,
             params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if isinstance(rule, Rename):
        return {rule.target.format(*index): _values(rule.values, tensor, params, key)}
    if isinstance(rule, Transpose):
        if tensor.dim() != 2:
            raise WeightsError(f"{key}: expected a 2-D weight, got shape {list(tensor.shape)}")
        return {rule.target.format(*index): _values(rule.values, tensor.t(), params, key)}
    if isinstance(rule, Stack):
        if tensor.dim() < 2:
            raise WeightsError(f"{key}: expected experts stacked on dim 0, got shape {list(tensor.shape)}")
        out: dict[str, torch.Tensor] = {}
        for e, piece in enumerate(tensor.unbind(0)):
            out.update(_cut(rule, key, piece, (*index, e), expect, params))
        return out
    return _cut(rule, key, tensor, index, expect, params)


def _cut(rule: Split | Stack, key: str, tensor: torch.Tensor, index: tuple[int, ...], expect: Shapes | None,
         params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """`tensor` cut along `rule.dim` into the targets, sized as the model's weights (equal parts when
    the model is not known, or when these weights are not the model's: then the caller reports them).
    With groups, each of the G groups along the dim is cut into the parts' G-th shares."""
    names = [t.format(*index) for t in rule.targets]
    if tensor.dim() <= rule.dim:
        raise WeightsError(f"{key}: shape {list(tensor.shape)} has no dim {rule.dim} to split")
    if len(names) > 1 and rule.transpose and tensor.dim() != 2:
        raise WeightsError(f"{key}: expected 2-D parts to transpose, got shape {list(tensor.shape)}")
    groups = rule.group_count(params) if isinstance(rule, Split) else 1
    total = tensor.shape[rule.dim]
    per = f" in {groups} groups" if groups > 1 else ""
    if expect is not None and all(n in expect for n in names):
        sizes = [_stored_shape(expect[n], rule.transpose)[rule.dim] if len(expect[n]) > rule.dim else -1
                 for n in names]
        if sum(sizes) != total or min(sizes) < 0 or any(size % groups for size in sizes):
            have = ", ".join(f"{n} {list(expect[n])}" for n in names)
            raise WeightsError(f"{key}: shape {list(tensor.shape)} does not split along dim {rule.dim}{per} into "
                               f"the model's {have}")
    else:
        if total % (len(names) * groups):
            raise WeightsError(f"{key}: shape {list(tensor.shape)} does not split into {len(names)} equal parts"
                               f"{per} along dim {rule.dim}")
        sizes = [total // len(names)] * len(names)
    grouped = tensor.unflatten(rule.dim, (groups, -1))  # [..., G, total / G, ...]
    parts = [p.flatten(rule.dim, rule.dim + 1)
             for p in grouped.split([size // groups for size in sizes], dim=rule.dim + 1)]
    return {n: _values(rule.values, p.t() if rule.transpose else p, params, key) for n, p in zip(names, parts)}


def _stored_shape(shape: Sequence[int], transpose: bool) -> list[int]:
    return list(shape)[::-1] if transpose else list(shape)


def _values(values, tensor: torch.Tensor, params: Mapping[str, Any], key: str) -> torch.Tensor:
    for transform in values:
        try:
            tensor = transform.forward(tensor, params)
        except WeightsError as err:
            raise WeightsError(f"{key}: {err}") from None
    return tensor


def _checkpoint_keys(names: list[str], rules: Mapping[str, Any]) -> list[str]:
    """The checkpoint keys that would give these canonical names (the first layout a map lists), in order."""
    templates = [(_template(target), pattern) for pattern, rule in rules.items() for target in rule.targets]
    keys: dict[str, None] = {}
    for name in names:
        for regex, pattern in templates:
            match = regex.match(name)
            if match:
                keys[pattern.format(*match.groups())] = None  # a Stack key ignores the expert index
                break
        else:
            keys[f"{name} (no checkpoint key maps to it)"] = None
    return list(keys)


def _template(target: str) -> re.Pattern:
    return re.compile(re.escape(target).replace(re.escape("{}"), r"(\d+)") + r"\Z")


# ----------------------------------------------------------------------------
# archc -> checkpoint


def to_hf(wmap: WeightMap, canonical: Mapping[str, torch.Tensor],
          params: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors from archc's canonical ones: each map rule run backwards (the first rule that
    gives a weight is the one written). Raises WeightsError naming any weight the map cannot write."""
    params = params or {}
    left = dict(canonical)
    out: dict[str, torch.Tensor] = {}
    for pattern, rule in wmap.rules().items():
        if isinstance(rule, Tied):
            if rule.untied is None:
                continue  # the spec ties its head: the checkpoint stores no copy (as save_pretrained)
            rule = Rename(rule.untied)
        for index in _instances(rule, left):
            key = pattern.format(*index)
            try:
                out[key] = _backward(rule, index, left, params).contiguous()
            except WeightsError as err:
                raise WeightsError(f"{key}: {err}") from None
    if left:
        raise WeightsError(f"the {wmap.model_type} weight map ({wmap.origin}) has no checkpoint key for "
                           f"{len(left)} of the model's weights: {', '.join(left)}")
    return out


def _instances(rule, names: Mapping[str, Any]) -> list[tuple[int, ...]]:
    """The key indices for which every weight the rule gives is present (for Stack: experts 0..E-1)."""
    targets = [_template(t) for t in rule.targets]
    found = [tuple(int(i) for i in m.groups()) for name in names if (m := targets[0].match(name))]
    if isinstance(rule, Stack):
        experts: dict[tuple[int, ...], set[int]] = {}
        for index in found:
            experts.setdefault(index[:-1], set()).add(index[-1])
        complete = []
        for index, es in experts.items():
            count = max(es) + 1
            if es == set(range(count)) and all(t.format(*index, e) in names for t in rule.targets
                                               for e in range(count)):
                complete.append(index)
        return sorted(complete)
    return sorted(i for i in found if all(t.format(*i) in names for t in rule.targets))


def _backward(rule, index: tuple[int, ...], left: dict[str, torch.Tensor],
              params: Mapping[str, Any]) -> torch.Tensor:
    if isinstance(rule, Stack):
        count = 0
        while rule.targets[0].format(*index, count) in left:
            count += 1
        return torch.stack([_join(rule, (*index, e), left, params) for e in range(count)])
    if isinstance(rule, (Rename, Transpose)):
        t = _inverse(rule.values, left.pop(rule.target.format(*index)), params)
        return t.t() if isinstance(rule, Transpose) else t
    return _join(rule, index, left, params)


def _join(rule: Split | Stack, index: tuple[int, ...], left: dict[str, torch.Tensor],
          params: Mapping[str, Any]) -> torch.Tensor:
    parts = [_inverse(rule.values, left.pop(t.format(*index)), params) for t in rule.targets]
    parts = [p.t() if rule.transpose else p for p in parts]
    if len(parts) == 1:
        return parts[0]
    groups = rule.group_count(params) if isinstance(rule, Split) else 1
    if groups == 1:
        return torch.cat(parts, dim=rule.dim)
    joined = torch.cat([p.unflatten(rule.dim, (groups, -1)) for p in parts], dim=rule.dim + 1)
    return joined.flatten(rule.dim, rule.dim + 1)


def _inverse(values, tensor: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    for transform in reversed(values):
        tensor = transform.inverse(tensor, params)
    return tensor
