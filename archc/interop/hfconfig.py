"""config.json <-> spec parameters, through a map's `Config` (see maps.py).

Import is strict in the same way as the key maps: a field the spec cannot
represent (a RoPE scaling it has no parameters for, an attention bias the spec
has not, a quantized checkpoint) is refused with the field, its value and why —
better an error than a model that loads and computes something else. Values are
checked against the types the spec declares before any arithmetic is done on them.

RoPE: rope_parameters (transformers 5) or the older rope_theta / rope_scaling /
partial_rotary_factor (and GPT-NeoX's rotary_emb_base / rotary_pct) become the
spec's theta, its `rope_scaling` options (named as `attention`'s, see
ROPE_SCALING_FIELDS) and its `rope_dim`, where the map says the spec takes them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NoReturn

from archc.dsl.diagnostics import SpecError
from archc.interop.maps import Same, Tied, WeightMap, run_hook

__all__ = ["ROPE_SCALING_FIELDS", "hf_config", "refuse", "same_value", "spec_overrides"]

REQUIRED = object()
# rope_type -> {rope_parameters field: (spec parameter, transformers' default)}: the spec parameters are
# named as `attention`'s options, and their defaults are the attention's (attention_factor: computed).
ROPE_SCALING_FIELDS: dict[str, dict[str, tuple[str, Any]]] = {
    "llama3": {"factor": ("rope_factor", REQUIRED), "original_max_position_embeddings": ("rope_original_max", REQUIRED),
               "low_freq_factor": ("rope_low_freq_factor", REQUIRED),
               "high_freq_factor": ("rope_high_freq_factor", REQUIRED)},
    "yarn": {"factor": ("rope_factor", REQUIRED), "original_max_position_embeddings": ("rope_original_max", REQUIRED),
             "beta_fast": ("rope_beta_fast", 32.0), "beta_slow": ("rope_beta_slow", 1.0),
             "attention_factor": ("rope_attention_factor", None), "truncate": ("rope_truncate", True)},
}

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
        overrides.update(_rope(c, cfg, declared, source))
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


def _rope_parts(c: dict, source: str) -> dict:
    """rope_parameters (transformers 5) merged over the older rope_scaling ({"type"} or {"rope_type"})."""
    parts = {}
    for field in ("rope_scaling", "rope_parameters"):
        value = c.get(field)
        if value is not None and not isinstance(value, dict):
            raise SpecError(f"{source} {field}={value!r}: expected a JSON object")
        parts.update(value or {})
    return parts


def _yarn_attention_factor(factor: float, parts: dict) -> float:
    """transformers' default for YaRN's attention_factor: from mscale / mscale_all_dim, else 0.1·ln(factor) + 1."""
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if parts.get("mscale") and parts.get("mscale_all_dim"):
        return mscale(factor, parts["mscale"]) / mscale(factor, parts["mscale_all_dim"])
    return mscale(factor)


def _rope(c: dict, cfg, declared: Mapping[str, str] | None, source: str) -> dict[str, Any]:
    """The spec's RoPE parameters: theta, and where the map and spec take them the scaling and rotated width;
    a rope_type or partial rotary the spec cannot represent is refused."""
    parts = _rope_parts(c, source)
    has = (lambda param: True) if declared is None else (lambda param: param in declared)  # noqa: E731
    theta = parts.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", cfg.rope_default_theta)))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise SpecError(f"{source} rope_theta={theta!r}: expected a positive number")
    out: dict[str, Any] = {cfg.rope: float(theta)}
    rope_type = parts.get("rope_type", parts.get("type", "default"))
    if rope_type != "default":
        if rope_type not in cfg.rope_scaling:
            why = (f"the spec's RoPE scalings are {', '.join(cfg.rope_scaling)}" if cfg.rope_scaling
                   else "the spec's RoPE is unscaled")
            refuse(c, "rope_type", why, rope_type, source=source)
        if not has("rope_scaling"):
            refuse(c, "rope_type", "the spec declares no rope_scaling parameter (its RoPE is unscaled)", rope_type,
                   source=source)
        out["rope_scaling"] = rope_type
        out.update(_rope_scaling(c, parts, rope_type, has, source))
    partial = parts.get("partial_rotary_factor", c.get("partial_rotary_factor", c.get("rotary_pct",
                                                                                      cfg.rope_default_partial)))
    if not same_value(partial, 1.0):
        if cfg.rope_dim is None or not has(cfg.rope_dim):
            refuse(c, "partial_rotary_factor", "the spec's RoPE rotates the whole head", partial, source=source)
        if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
            raise SpecError(f"{source} partial_rotary_factor={partial!r}: expected a number in (0, 1]")
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]  # as transformers
        out[cfg.rope_dim] = int(head_dim * partial)
    elif cfg.rope_dim is not None and has(cfg.rope_dim):
        out[cfg.rope_dim] = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return out


def _rope_field(c: dict, parts: dict, field: str, rope_type: str, values: dict) -> Any:
    """One field of a scaled RoPE, with transformers' fallbacks (None when it has none)."""
    value = parts.get(field)
    if field == "original_max_position_embeddings" and value is None:
        value = c.get(field) or c.get("max_position_embeddings")
    elif field == "factor" and value is None and rope_type == "yarn" and parts.get("original_max_position_embeddings"):
        value = (c.get("max_position_embeddings") or 0) / parts["original_max_position_embeddings"]
    elif field in ("beta_fast", "beta_slow"):
        value = value or ROPE_SCALING_FIELDS[rope_type][field][1]  # transformers: `get(...) or 32`
    elif field == "attention_factor" and value is None:
        value = _yarn_attention_factor(values["factor"], parts)
    return value


def _rope_scaling(c: dict, parts: dict, rope_type: str, has, source: str) -> dict[str, Any]:
    """The spec parameters of a scaled RoPE: each field into its spec parameter where the spec declares it; where
    it does not, the field must hold the value the attention uses by default."""
    values: dict[str, Any] = {}
    out: dict[str, Any] = {}
    for field, (param, default) in ROPE_SCALING_FIELDS[rope_type].items():
        value = _rope_field(c, parts, field, rope_type, values)
        if field == "attention_factor":
            default = _yarn_attention_factor(values["factor"], {})  # what the attention computes without one
        if value is None:
            if default is REQUIRED:
                raise SpecError(f"{source} rope_parameters lacks {field}, which rope_type {rope_type!r} needs")
            value = default
        kind = bool if field == "truncate" else int if field == "original_max_position_embeddings" else float
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, int if kind is int else (kind, int)) \
                or kind is not bool and not value > 0:
            what = {bool: "true or false", int: "a positive integer", float: "a positive number"}[kind]
            raise SpecError(f"{source} rope_parameters {field}={value!r}: expected {what}")
        values[field] = value = float(value) if kind is float else value
        if has(param):
            out[param] = value
        elif default is REQUIRED or value != default:
            refuse(c, field, f"the spec declares no {param} parameter"
                   + ("" if default is REQUIRED else f", and its {rope_type} RoPE uses {default!r}"),
                   value, source=source)
    return out


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
        out["rope_parameters"] = _rope_parameters(cfg, params, declared, out)
        out["rope_theta"] = params[cfg.rope]  # what transformers 4 reads
    try:
        out.update(run_hook(wmap, "export", dict(params)) or {})
    except KeyError as err:  # a built-in map's export reads a parameter this spec lacks
        raise SpecError(f"the {wmap.model_type} weight map ({wmap.origin}) writes config.json from spec parameter "
                        f"{err}, which this spec does not declare") from None
    return out


def _rope_parameters(cfg, params: Mapping[str, Any], declared: Mapping[str, str], out: dict) -> dict[str, Any]:
    """config.json's rope_parameters from the spec's RoPE parameters (the inverse of `_rope`)."""
    rope = {"rope_type": "default", "rope_theta": params[cfg.rope], "partial_rotary_factor": 1.0}
    if cfg.rope_dim is not None and cfg.rope_dim in declared:
        head_dim = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
        rope["partial_rotary_factor"] = params[cfg.rope_dim] / head_dim
    scaling = params.get("rope_scaling", "none") if "rope_scaling" in declared else "none"
    if scaling != "none":
        if scaling not in cfg.rope_scaling:
            raise SpecError(f"this weight map cannot write rope_scaling={scaling!r}: it writes "
                            f"{', '.join(cfg.rope_scaling) or 'unscaled RoPE only'}")
        rope["rope_type"] = scaling
        for field, (param, default) in ROPE_SCALING_FIELDS[scaling].items():
            if param not in declared and default is REQUIRED:
                raise SpecError(f"rope_scaling={scaling!r} writes {field} from the spec parameter {param}, which this "
                                "spec does not declare")
            value = params[param] if param in declared else default
            if value is not None:
                rope[field] = value
    return rope
