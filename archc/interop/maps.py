"""The weight-map vocabulary: how a checkpoint family's config.json and tensors map onto a spec.

A map is data. A `WeightMap` names the family (config.json's `model_type`), says
how config fields become spec parameters (`Config`) and how each checkpoint key
becomes archc's canonical weights (`keys`). The same map runs both ways:
`archc convert` / `load_hf` read a checkpoint through it, `archc export` /
`save_hf` write one. The built-in maps (archc/interop/families/) are written in
exactly this vocabulary; a map of your own is a Python file defining `MAP`,
passed explicitly (`--map FILE`, `load_hf(..., map="FILE.py")`). archc never
runs a map file it was not given: a spec cannot pull one in.

Key patterns: "{}" stands for an index (a layer, then an expert), in order;
targets are archc's canonical names (`archc inspect SPEC weights`) with the
same indices. A number written in a pattern matches only itself (T5 numbers
its sub-layers and keeps its position table in block 0). What one checkpoint tensor becomes:

    "name"                          the tensor itself, renamed
    Rename(name, *values)           the same, through value transforms
    Transpose(name, *values)        stored [in, out] (GPT-2's Conv1D); archc's linears are [out, in]
    Split(names, dim, ...)          a fused tensor cut along `dim` into parts sized as the model's
                                    weights (Phi-3's q|k|v with fewer kv heads), equal parts otherwise;
                                    with groups=G (a number or a spec parameter) the dim holds G groups
                                    each cut into the parts' G-th shares, as GPT-NeoX's and BLOOM's
                                    q|k|v per head ([H, 3, d]) or Qwen3-Next's q|gate per head
    Stack(names, dim, ...)          experts stacked on dim 0 ([E, ...]): expert e's slice is cut into
                                    `names`, whose last "{}" is e
    Tied(source, untied, flag)      the output head stored as a copy of `source` (the embedding)

and the value transforms (stored value -> archc value; export applies the inverse):

    Add(c)            archc = stored + c          Gemma's RMSNorm stores w - 1
    Scale(c)          archc = stored * c
    PermuteRotary(h)  each of h heads' rows from interleaved rotary pairs (x0, x1), (x2, x3), ...
                      (Meta's and GPT-J's layout) to rotate-half order (x0, x2, ...; x1, x3, ...)
    PatchConv(p)      a patch-embedding Conv2d weight [D, C, p, p] (stride p) as the linear weight
                      [D, p·p·C] acting on `patchify`'s tokens (p: a number or a spec parameter)

Key patterns may spell an index literally where the checkpoint's is fixed ("ff.net.0.proj": a
Sequential's slot); "{}" then stands for the indices before it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from archc.dsl.diagnostics import SpecError
from archc.interop.weights import WeightsError

__all__ = [
    "Add",
    "Config",
    "MapError",
    "Only",
    "PatchConv",
    "PermuteRotary",
    "Rename",
    "Same",
    "Scale",
    "Split",
    "Stack",
    "Tied",
    "Transpose",
    "WeightMap",
    "load_map_file",
    "located",
    "placeholders",
    "run_hook",
]


class MapError(WeightsError):
    """A weight map that cannot work as written: names the map (file) and the key."""


# ----------------------------------------------------------------------------
# Value transforms


def _number(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MapError(f"{attribute.name} must be a number, got {value!r}")


@attrs.frozen
class Add:
    """archc's value = the stored value + `value` (Gemma stores RMSNorm weights as w - 1: Add(1.0))."""

    value: float = attrs.field(validator=_number)

    def forward(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return _at_least_fp32(t) + self.value

    def inverse(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return _at_least_fp32(t) - self.value


@attrs.frozen
class Scale:
    """archc's value = the stored value * `value` (exact both ways when it is a power of two)."""

    value: float = attrs.field(validator=_number)

    def __attrs_post_init__(self) -> None:
        if self.value == 0:
            raise MapError("Scale(0) cannot be undone on export")

    def forward(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return _at_least_fp32(t) * self.value

    def inverse(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        return _at_least_fp32(t) / self.value


def is_param_name(value: Any) -> bool:
    """A spec parameter's name: the main file's (`d_model`) or a used file's (`blt_entropy.e_heads`)."""
    return isinstance(value, str) and all(part.isidentifier() for part in value.split(".", 1))


def _heads(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not (is_param_name(value) or isinstance(value, int) and value > 0):
        raise MapError(f"{type(_inst).__name__} {attribute.name} must be a positive int or a spec parameter name, "
                       f"got {value!r}")


@attrs.frozen
class PermuteRotary:
    """Rows of each of `heads` heads (a number, or the name of a spec parameter) reordered from
    interleaved rotary pairs to rotate-half order, as transformers' convert_llama_weights_to_hf does:
    row 2i of a head becomes row i, row 2i + 1 becomes row head_dim / 2 + i."""

    heads: int | str = attrs.field(validator=_heads)

    def _count(self, t: torch.Tensor, params: Mapping[str, Any]) -> tuple[int, int]:
        heads = params.get(self.heads) if isinstance(self.heads, str) else self.heads
        if isinstance(self.heads, str) and not isinstance(heads, int):
            raise WeightsError(f"PermuteRotary({self.heads!r}): the spec has no int parameter {self.heads}")
        rows = t.shape[0] if t.dim() else 0
        if heads <= 0 or rows % heads or (rows // heads) % 2:
            raise WeightsError(f"PermuteRotary: {rows} rows do not make {heads} heads of an even size")
        return heads, rows // heads

    def forward(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        heads, size = self._count(t, params)
        rest = t.shape[1:]
        return t.reshape(heads, size // 2, 2, *rest).transpose(1, 2).reshape(t.shape)

    def inverse(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        heads, size = self._count(t, params)
        rest = t.shape[1:]
        return t.reshape(heads, 2, size // 2, *rest).transpose(1, 2).reshape(t.shape)


@attrs.frozen
class PatchConv:
    """A patch-embedding Conv2d weight [D, C, p, p] (kernel = stride = p) as the Linear weight [D, p·p·C]
    that acts on `patchify`'s tokens, whose features are ordered (row in patch, column, channel).
    `patch` is p, a number or the name of a spec parameter (export needs it to fold the weight back)."""

    patch: int | str = attrs.field(validator=_heads)

    def forward(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        if t.dim() != 4 or t.shape[2] != t.shape[3]:
            raise WeightsError(f"PatchConv: expected a Conv2d weight [out, channels, p, p], got {list(t.shape)}")
        return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)

    def inverse(self, t: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
        p = params.get(self.patch) if isinstance(self.patch, str) else self.patch
        if isinstance(p, bool) or not isinstance(p, int) or p <= 0 or t.dim() != 2 or t.shape[1] % (p * p):
            raise WeightsError(f"PatchConv({self.patch!r}): a weight {list(t.shape)} is not {p}×{p} patches")
        return t.reshape(t.shape[0], p, p, -1).permute(0, 3, 1, 2)


Transform = Add | Scale | PermuteRotary | PatchConv
_TRANSFORMS = (Add, Scale, PermuteRotary, PatchConv)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Arithmetic as transformers does it (`1.0 + weight.float()`): bf16/fp16 values go up to fp32 first."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------------------
# Rules: what one checkpoint tensor becomes


def _name(_inst, attribute, value) -> None:
    if not isinstance(value, str) or not value or value != value.strip():
        raise MapError(f"{attribute.name} must be a canonical weight name, got {value!r}")


def _names(_inst, attribute, value) -> None:
    if not value:
        raise MapError(f"{attribute.name} must list at least one canonical weight name")
    for name in value:
        _name(_inst, attribute, name)


def _values(_inst, attribute, value) -> None:
    for v in value:
        if not isinstance(v, _TRANSFORMS):
            raise MapError(f"{v!r} is not a value transform (Add, Scale, PermuteRotary, PatchConv)")


def _dim(_inst, attribute, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MapError(f"{attribute.name} must be a non-negative int, got {value!r}")


@attrs.frozen(init=False)
class Rename:
    """The stored tensor under archc's name `target`, through value transforms."""

    target: str = attrs.field(validator=_name)
    values: tuple[Transform, ...] = attrs.field(validator=_values)

    def __init__(self, target: str, *values: Transform) -> None:
        self.__attrs_init__(target, tuple(values))

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target,)


@attrs.frozen(init=False)
class Transpose:
    """Stored [in, out] (GPT-2's Conv1D), archc's linear weight is [out, in]."""

    target: str = attrs.field(validator=_name)
    values: tuple[Transform, ...] = attrs.field(validator=_values)

    def __init__(self, target: str, *values: Transform) -> None:
        self.__attrs_init__(target, tuple(values))

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.target,)


def _groups(_inst, attribute, value) -> None:
    if value is not None:
        _heads(_inst, attribute, value)


@attrs.frozen
class Split:
    """A fused tensor cut along `dim` (of the stored layout) into `targets`, each optionally transposed.
    Part sizes are those of the model's weights, so unequal parts (q | k | v with fewer kv heads) work.
    `groups` (a number, or the name of a spec parameter such as the head count): the dim is G groups
    side by side, each holding every part's G-th share in turn ([H, 3, d] for q|k|v per head)."""

    targets: tuple[str, ...] = attrs.field(converter=tuple, validator=_names)
    dim: int = attrs.field(default=0, validator=_dim)
    transpose: bool = False
    values: tuple[Transform, ...] = attrs.field(default=(), converter=tuple, validator=_values)
    groups: int | str | None = attrs.field(default=None, validator=_groups)

    def group_count(self, params: Mapping[str, Any]) -> int:
        """G: the number, or the spec parameter's value (1 without groups)."""
        if self.groups is None:
            return 1
        count = params.get(self.groups) if isinstance(self.groups, str) else self.groups
        if isinstance(count, bool) or not isinstance(count, int) or count <= 0:
            raise WeightsError(f"Split(groups={self.groups!r}): the spec has no positive int parameter {self.groups}")
        return count


@attrs.frozen
class Stack:
    """Experts stacked on dim 0 ([E, ...], transformers 5's fused experts): expert e's slice is cut
    into `targets` along `dim` of the slice (as Split), each optionally transposed. Targets hold one
    "{}" more than the key: the expert index."""

    targets: tuple[str, ...] = attrs.field(converter=tuple, validator=_names)
    dim: int = attrs.field(default=0, validator=_dim)
    transpose: bool = False
    values: tuple[Transform, ...] = attrs.field(default=(), converter=tuple, validator=_values)


@attrs.frozen
class Tied:
    """The output head, which a checkpoint may store as a copy of archc's `source` (the embedding).

    When the model has its own `untied` weight, the stored tensor is that weight. When it has none
    (the spec ties its head), the stored copy is dropped after checking that it equals the weight
    `source` came from; a checkpoint may leave it out, as save_pretrained does. `flag` is the config
    field that says whether the checkpoint ties them (tie_word_embeddings): it is checked against the
    spec on import and written from the spec on export."""

    source: str = attrs.field(validator=_name)
    untied: str | None = attrs.field(default=None, validator=attrs.validators.optional(_name))
    flag: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        return (self.untied,) if self.untied else ()


Rule = str | Rename | Transpose | Split | Stack | Tied
_RULES = (str, Rename, Transpose, Split, Stack, Tied)


def as_rule(rule: Rule) -> Rename | Transpose | Split | Stack | Tied:
    """A plain string is shorthand for Rename(string)."""
    return Rename(rule) if isinstance(rule, str) else rule


def placeholders(text: str) -> int:
    return text.count("{}")


# ----------------------------------------------------------------------------
# Config: config.json fields <-> spec parameters


@attrs.frozen(init=False)
class Only:
    """The values of a config field the spec can represent (export writes the first), and why."""

    values: tuple[Any, ...]
    why: str

    def __init__(self, *values: Any, why: str) -> None:
        if not values:
            raise MapError("Only(...) needs at least one allowed value")
        if not isinstance(why, str) or not why:
            raise MapError("Only(..., why=...) needs the reason as text")
        self.__attrs_init__(tuple(values), why)


@attrs.frozen
class Same:
    """A default that copies another config field (num_key_value_heads defaults to num_attention_heads)."""

    field: str


def _str_map(_inst, attribute, value) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and is_param_name(v) for k, v in value.items()):
        raise MapError(f"Config.{attribute.name} must map config fields to spec parameter names, got {value!r}")


def _callable(_inst, attribute, value) -> None:
    if value is not None and not callable(value):
        raise MapError(f"Config.{attribute.name} must be a function or None, got {value!r}")


@attrs.frozen(kw_only=True)
class Config:
    """How config.json's fields become spec parameters (import) and back (export).

    params    field -> spec parameter, both ways; the field must be present (or defaulted)
    optional  the same, for parameters a spec may not declare (a spec without tie_embeddings)
    defaults  transformers' defaults for fields a config.json may omit (Same(field) copies one)
    require   field -> Only(values..., why=...): values the spec can represent; anything else refused
    positive  int fields that must be > 0 (head counts, widths)
    rope      the spec parameter taking RoPE's theta (rope_parameters, or the older rope_theta and
              rope_scaling)
    rope_scaling  the scaled RoPEs (rope_type: "llama3", "yarn") the spec can take, into spec parameters
              named as `attention`'s options (rope_scaling, rope_factor, rope_original_max, ...) where the
              spec declares them (a field it does not declare must hold attention's default); other
              rope_types are refused
    rope_dim  the spec parameter taking the rotated width of a head (partial_rotary_factor · head_dim);
              without it partial rotary is refused; rope_default_partial: the family's default factor
    prepare   config dict -> extra spec parameters, for what the tables cannot say (may edit the dict,
              and refuse with `refuse(config, field, why)`)
    export    spec parameters -> config fields written besides `params` (the inverse of `prepare`)
    ignore    spec parameters that do not change a checkpoint's function (dropout): export neither
              writes them nor requires them to match
    """

    params: dict[str, str] = attrs.field(validator=_str_map)
    optional: dict[str, str] = attrs.field(factory=dict, validator=_str_map)
    defaults: dict[str, Any] = attrs.field(factory=dict)
    require: dict[str, Only] = attrs.field(factory=dict)
    positive: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    rope: str | None = None
    rope_default_theta: float = 10000.0
    rope_scaling: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    rope_dim: str | None = None
    rope_default_partial: float = 1.0
    prepare: Callable[[dict], dict] | None = attrs.field(default=None, validator=_callable)
    export: Callable[[dict], dict] | None = attrs.field(default=None, validator=_callable)
    ignore: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    @require.validator
    def _check_require(self, _attribute, value) -> None:
        for field, only in value.items():
            if not isinstance(only, Only):
                raise MapError(f"Config.require[{field!r}] must be Only(value, ..., why=...), got {only!r}")


# ----------------------------------------------------------------------------
# The map


@attrs.frozen(kw_only=True)
class WeightMap:
    """One checkpoint family: its config and key maps (see the module docstring)."""

    model_type: str
    architecture: str  # the transformers class export names in config.json ("LlamaForCausalLM")
    config: Config
    keys: dict[str, Rule]
    base_prefix: str = ""  # checkpoints saved from the bare base model (the hub's `gpt2`) lack it
    ignored: tuple[str, ...] = attrs.field(default=(), converter=tuple)  # stale buffers: dropped
    extra_layers: str | None = None  # config field counting trailing layers the spec drops (DeepSeek's MTP)
    origin: str = "built-in"  # where the map came from, for error messages
    library: str = "transformers"  # whose directories: "diffusers" ones are read (export writes transformers')

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.model_type, str) or not self.model_type:
            raise MapError("WeightMap.model_type must name the family (config.json's model_type)")
        if not isinstance(self.config, Config):
            raise MapError(f"WeightMap.config must be a Config, got {type(self.config).__name__}")
        if not isinstance(self.keys, dict) or not self.keys:
            raise MapError("WeightMap.keys must map checkpoint key patterns to rules")
        for pattern, rule in self.keys.items():
            _check_rule(pattern, rule)

    def rules(self) -> dict[str, Rename | Transpose | Split | Stack | Tied]:
        return {pattern: as_rule(rule) for pattern, rule in self.keys.items()}


def _check_rule(pattern: str, rule: Rule) -> None:
    if not isinstance(pattern, str) or not pattern:
        raise MapError(f"key pattern {pattern!r} must be a non-empty string")
    if not isinstance(rule, _RULES):
        raise MapError(f"key {pattern!r}: {rule!r} is not a rule (a name, Rename, Transpose, Split, Stack, Tied)")
    rule = as_rule(rule)
    want = placeholders(pattern) + (1 if isinstance(rule, Stack) else 0)
    names = rule.targets + ((rule.source,) if isinstance(rule, Tied) else ())
    for name in names:
        got = placeholders(name)
        if isinstance(rule, Tied) and name == rule.source:
            ok = got <= want
        else:
            ok = got == want
        if not ok:
            extra = " (Stack's targets hold one more: the expert)" if isinstance(rule, Stack) else ""
            raise MapError(f"key {pattern!r}: target {name!r} has {got} '{{}}', the key {placeholders(pattern)}"
                           f"{extra}")


def located(path: str | Path, err: Exception, doing: str = "") -> MapError:
    """`err`, raised by code in the map file `path`, as a MapError at the file's line that raised it."""
    path = Path(path)
    line = next((f.lineno for f in reversed(traceback.extract_tb(err.__traceback__))
                 if Path(f.filename).resolve() == path.resolve()), None)
    where = f"{path}:{line}" if line else str(path)
    what = str(err) if isinstance(err, MapError) else f"{type(err).__name__}: {err}"
    return MapError(f"{where}: {doing}{what}")


def run_hook(wmap: WeightMap, name: str, arg: dict) -> Any:
    """Config.prepare / Config.export of `wmap` on `arg`. A user map's failure is reported at its file and
    line (a refusal, SpecError, passes through); a built-in map's is a bug and propagates."""
    hook = getattr(wmap.config, name)
    if hook is None:
        return None
    if wmap.origin == "built-in":
        return hook(arg)
    try:
        return hook(arg)
    except (SpecError, WeightsError):  # a refusal (hfconfig.refuse) or a located error already
        raise
    except Exception as err:  # noqa: BLE001 -- any other error in the user's hook, at its line
        raise located(wmap.origin, err, f"Config.{name}: ") from None


def load_map_file(path: str | Path) -> WeightMap:
    """The `MAP` a user's map file defines. The file is Python and runs: only ever load one the user
    named (`--map FILE`, `load_hf(..., map=FILE)`). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise MapError(f"{path}: no such map file")
    name = "archc_user_map_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise MapError(f"{path}: not a Python file (a map file defines MAP = WeightMap(...))")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        raise MapError(f"{path}:{err.lineno}:{err.offset or 0}: {err.msg}") from None
    except Exception as err:  # noqa: BLE001 -- any error in the map file is the user's, reported with its line
        raise located(path, err) from None
    found = getattr(module, "MAP", None)
    if not isinstance(found, WeightMap):
        got = "nothing" if found is None else type(found).__name__
        raise MapError(f"{path}: defines {got} as MAP; a map file defines MAP = WeightMap(...) "
                       "(from archc.interop.maps import WeightMap, Config, ...)")
    return attrs.evolve(found, origin=str(path))
