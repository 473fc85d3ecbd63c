"""config.json <-> spec parameters, through a map's `Config` (see maps.py).

Import is strict in the same way as the key maps: a field the spec cannot
represent (scaled RoPE, an attention bias the spec has not, a quantized
checkpoint) is refused with the field, its value and why — better an error
than a model that loads and computes something else. Values are checked
against the types the spec declares before any arithmetic is done on them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NoReturn

from archc.dsl.diagnostics import SpecError
from archc.interop.maps import Same, Tied, WeightMap, run_hook

__all__ = ["hf_config", "refuse", "same_value", "spec_overrides"]

_TYPES = {"int": ((int,), "an integer"), "float": ((int, float), "a number"), "bool": ((bool,), "true or false"),
          "str": ((str,), "a string")}


def refuse(config: Mapping[str, Any], field: str, why: str, value: Any = None, *,
           source: str = "config.json") -> NoReturn:
    """Raise the error for a config field the spec cannot represent."""
    value = config.get(field) if value is None else value
    raise SpecError(f"{source} {field}={value!r} cannot be represented by the spec: {why}")


def same_value(a: Any, b: Any) -> bool:
    """Equality as JSON means it: true is not 1, and a list equals the tuple with the same items."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, str) != isinstance(b, str):
        return False
    return a == b


def spec_overrides(wmap: WeightMap, config: Any, declared: Mapping[str, str] | None = None, *,
                   source: str = "config.json") -> dict[str, Any]:
    """Spec parameter overrides from a config.json dict. `declared` (spec parameter -> its type name)
    checks the values' types and decides which `optional` parameters apply; without it every optional
    parameter is passed. Raises SpecError naming the field for what the spec cannot express."""
    cfg = wmap.config
    if not isinstance(config, dict):
        raise SpecError(f"{source}: expected a JSON object of fields, got {type(config).__name__}")
    if config.get("quantization_config") is not None:
        quant = config["quantization_config"]
        method = quant.get("quant_method", quant) if isinstance(quant, dict) else quant
        refuse(config, "quantization_config", "quantized checkpoints are refused, never cast; dequantize to "
               "float32/bfloat16 first", method, source=source)
    c = {field: _special_floats(value) for field, value in config.items()}
    for field, default in cfg.defaults.items():
        if isinstance(default, Same):
            if c.get(field) is None:
                c[field] = c.get(default.field)
        elif field not in c:
            c[field] = default
    params = dict(cfg.params)
    params.update({f: p for f, p in cfg.optional.items() if declared is None or p in declared})
    _check_types(c, params, declared, source)
    _check_present(c, [f for f in cfg.positive if f in params], params, source)
    for field in cfg.positive:
        value = c.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise SpecError(f"{source} {field}={value!r}: expected a positive integer")
    overrides: dict[str, Any] = {}
    if cfg.rope:
        overrides[cfg.rope] = _rope_theta(c, cfg.rope_default_theta, source)
    for field, only in cfg.require.items():
        if not any(same_value(c.get(field), allowed) for allowed in only.values):
            refuse(c, field, only.why, source=source)
    for rule in wmap.rules().values():  # a head with no weight of its own in the model: the config must tie it
        if isinstance(rule, Tied) and rule.flag and rule.untied is None and not same_value(c.get(rule.flag), True):
            refuse(c, rule.flag, "the spec ties the output head to the embedding", source=source)
    extra = run_hook(wmap, "prepare", c)
    _check_present(c, cfg.params, params, source)
    _check_types(c, params, declared, source)  # again: `prepare` may have filled fields in
    overrides.update({param: c[field] for field, param in params.items() if c.get(field) is not None})
    overrides.update(extra or {})
    return overrides


def _special_floats(value: Any) -> Any:
    """transformers 5 writes inf and nan as {"__float__": "Infinity"} (JSON has no such numbers)."""
    if isinstance(value, dict):
        if value.keys() == {"__float__"} and value["__float__"] in ("Infinity", "-Infinity", "NaN"):
            return float(value["__float__"].replace("Infinity", "inf"))
        return {k: _special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_special_floats(v) for v in value]
    return value


def _check_present(c: dict, fields, params: Mapping[str, str], source: str) -> None:
    absent = [f for f in fields if c.get(f) is None]
    if absent:
        raise SpecError(f"{source} lacks {', '.join(absent)}",
                        hint=f"needed for the spec's {', '.join(params[f] for f in absent)}")


def _check_types(c: dict, params: Mapping[str, str], declared: Mapping[str, str] | None, source: str) -> None:
    if declared is None:
        return
    for field, param in params.items():
        value, kind = c.get(field), declared.get(param)
        if value is None or kind not in _TYPES:
            continue
        types, what = _TYPES[kind]
        if isinstance(value, bool) and kind != "bool" or not isinstance(value, types) or \
                isinstance(value, float) and not math.isfinite(value):
            raise SpecError(f"{source} {field}={value!r}: expected {what} (it sets the spec's {kind} parameter "
                            f"{param})")


def _rope_theta(c: dict, default_theta: float, source: str) -> float:
    """RoPE's theta; refuses scaled RoPE (llama3, linear, dynamic, yarn, longrope) and partial rotary."""
    # transformers 5 writes {"rope_parameters": {"rope_type", "rope_theta", ...}}; older files have a
    # top-level rope_theta and an optional "rope_scaling" ({"type"} or {"rope_type"}).
    parts = {}
    for field in ("rope_scaling", "rope_parameters"):
        value = c.get(field)
        if value is not None and not isinstance(value, dict):
            raise SpecError(f"{source} {field}={value!r}: expected a JSON object")
        parts.update(value or {})
    theta = parts.get("rope_theta", c.get("rope_theta", default_theta))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise SpecError(f"{source} rope_theta={theta!r}: expected a positive number")
    rope_type = parts.get("rope_type", parts.get("type", "default"))
    if rope_type != "default":
        refuse(c, "rope_type", "the spec's RoPE is unscaled", rope_type, source=source)
    partial = parts.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
    if not same_value(partial, 1.0):
        refuse(c, "partial_rotary_factor", "the spec's RoPE rotates the whole head", partial, source=source)
    return float(theta)


def hf_config(wmap: WeightMap, params: Mapping[str, Any], declared: Mapping[str, str]) -> dict[str, Any]:
    """The config.json fields that load back as `params` through `wmap` (the inverse of spec_overrides)."""
    cfg = wmap.config
    needed = [*cfg.params.values(), *([cfg.rope] if cfg.rope else [])]
    absent = [p for p in needed if p not in params]
    if absent:
        raise SpecError(f"the {wmap.model_type} weight map ({wmap.origin}) writes config.json from spec parameters "
                        f"{', '.join(absent)}, which this spec does not declare")
    out: dict[str, Any] = {"architectures": [wmap.architecture], "model_type": wmap.model_type}
    for field, only in cfg.require.items():
        out[field] = only.values[0]
    for field, param in cfg.params.items():
        out[field] = params[param]
    for field, param in cfg.optional.items():
        if param in declared:
            out[field] = params[param]
    if cfg.rope:
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": params[cfg.rope], "partial_rotary_factor": 1.0}
        out["rope_theta"] = params[cfg.rope]  # what transformers 4 reads
    try:
        out.update(run_hook(wmap, "export", dict(params)) or {})
    except KeyError as err:  # a built-in map's export reads a parameter this spec lacks
        raise SpecError(f"the {wmap.model_type} weight map ({wmap.origin}) writes config.json from spec parameter "
                        f"{err}, which this spec does not declare") from None
    return out
