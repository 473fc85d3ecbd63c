"""Hugging Face checkpoints in and out of archc-compiled models.

A checkpoint is a directory holding `config.json` (hyperparameters) and
`model.safetensors` (or its shards; diffusers names it `diffusion_pytorch_model.safetensors`). Its
`model_type` (a diffusers config's `_class_name`) picks a weight map
(archc/interop/families/, or a map file of your own: maps.py says how to
write one); the map turns config fields into spec parameters and tensors into
the model's canonical weights, strictly — every tensor consumed, every weight
present, all problems reported together by checkpoint key. Export runs the
same map backwards and writes a directory transformers loads.

Only safetensors files are read (never pickle), so opening a checkpoint cannot
run code; a map file is Python and runs only when you pass it.

    compiled, model = load_hf("specs/llama.arch", "path/to/hf_dir")
    compiled, model = load_hf("my.arch", "path/to/hf_dir", map="my_map.py")
    save_hf(compiled, model, "out_dir", "llama")
    archc convert specs/gpt2.arch --from-hf path/to/gpt2 -o gpt2.safetensors
    archc export specs/gpt2.arch gpt2-hf/ --checkpoint gpt2.safetensors
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from archc.dsl.diagnostics import SpecError
from archc.interop.families import BUILTIN
from archc.interop.hfconfig import hf_config, same_value, spec_overrides
from archc.interop.maps import Tied, WeightMap, load_map_file
from archc.interop.remap import check_dtypes, to_archc, to_hf
from archc.interop.weights import WeightsError, load_canonical, to_canonical

__all__ = [
    "ARCHS",
    "convert_state_dict",
    "expected_weights",
    "hf_overrides",
    "load_converted",
    "load_for_convert",
    "load_hf",
    "load_hf_into",
    "read_config",
    "read_hf",
    "resolve_map",
    "save_converted",
    "save_hf",
]

ARCHS: dict[str, WeightMap] = BUILTIN  # the built-in maps, by model_type

MapLike = WeightMap | str | Path | None  # a map, a built-in model_type, or a map file (*.py)


def resolve_map(map: MapLike, model_type: str | None = None, source: str = "config.json") -> WeightMap:
    """The weight map `map` names: a WeightMap as is, a path ending in .py loaded (it runs: pass only
    files you trust), else a built-in model_type; with no map, the built-in one for `model_type`."""
    if isinstance(map, WeightMap):
        return map
    if isinstance(map, Path) or isinstance(map, str) and map.endswith(".py"):
        return load_map_file(map)
    name = map or model_type
    if name is None:
        raise SpecError(f"{source} has no model_type", hint=f"pass --arch ({', '.join(BUILTIN)}) or --map FILE")
    if name not in BUILTIN:
        raise SpecError(f"Hugging Face model_type {name!r} has no built-in weight map",
                        hint=f"built-in: {', '.join(BUILTIN)} (--arch forces one for a compatible model); for "
                             "another family write a map file and pass --map FILE (README: Bring your own "
                             "checkpoint)")
    return BUILTIN[name]


def model_type(config: dict) -> str | None:
    """The family a config.json names: transformers' `model_type`, or diffusers' `_class_name`."""
    return config.get("model_type") or config.get("_class_name")


def declared_params(spec) -> dict[str, str]:
    """The spec's parameters and their declared types (int, float, bool, str)."""
    from archc.compiler.lower import Spec, load_spec

    loaded = spec if isinstance(spec, Spec) else load_spec(spec)
    return {p.name: p.type.name for p in loaded.module.params}


def hf_overrides(map: MapLike, config: dict, spec=None) -> dict[str, Any]:
    """Spec parameter overrides from an HF config.json dict; SpecError for what the spec cannot express.
    With `spec`, values are checked against the types it declares."""
    wmap = resolve_map(map, model_type(config) if isinstance(config, dict) else None)
    return spec_overrides(wmap, config, declared_params(spec) if spec is not None else None)


def convert_state_dict(map: MapLike, hf_state: dict[str, torch.Tensor], n_layers: int | None = None, *,
                       tie_embeddings: bool = False, expect: Mapping[str, Sequence[int]] | None = None,
                       params: Mapping[str, Any] | None = None, extra_layers: int = 0) -> dict[str, torch.Tensor]:
    """An HF state dict in archc's canonical names. Strict: raises WeightsError naming every unknown,
    missing or unsplittable HF key.

    `expect` — the model's canonical weight names and shapes (`expected_weights`) — is what the
    checkpoint must provide, no more and no less. Without it only the layer count is checked (and
    `tie_embeddings` says whether the head is tied). Keys of the `extra_layers` layers after the last
    (DeepSeek-V3's multi-token prediction) are skipped."""
    wmap = resolve_map(map)
    n_layers = n_layers if n_layers is not None else (params or {}).get("n_layers")
    skipped = range(n_layers, n_layers + extra_layers) if n_layers is not None else range(0)
    check_dtypes(wmap, hf_state, "the state dict")
    tensors, _sources = to_archc(wmap, hf_state, expect, params, n_layers=n_layers, tied=tie_embeddings,
                                 skip_layers=skipped)
    return tensors


def expected_weights(compiled, model: torch.nn.Module | None = None) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of everything the model's state dict holds, saved buffers included
    (the aux-free routers' expert_bias): what a converted checkpoint must provide."""
    model = compiled.build() if model is None else model
    return {name: tuple(t.shape) for name, t in to_canonical(compiled, model.state_dict()).items()}


def read_config(hf_dir: str | Path) -> dict:
    """The config.json of an HF model directory."""
    return _read_config(_model_dir(hf_dir))


def read_hf(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and the tensors of model.safetensors (or its shards) in an HF model directory."""
    hf_dir = _model_dir(hf_dir)
    return _read_config(hf_dir), _read_tensors(hf_dir)


def load_hf(spec: str | Path, hf_dir: str | Path, map: MapLike = None, *, kernels: dict[str, str] | None = None,
            disable: tuple[str, ...] = (), on_stage: Callable | None = None, **overrides: Any):
    """Compile `spec` with parameters from `hf_dir/config.json` (then `overrides`), build the model and
    load the checkpoint into it strictly. `map` defaults to the built-in map of config.json's model_type
    (a model_type forces another, a path to a .py file loads a map of your own); `kernels`, `disable`
    and `on_stage` go to archc.compile. Returns (compiled, model in eval mode)."""
    compile_kw = {"kernels": kernels, "disable": disable, "on_stage": on_stage}
    loaded = load_for_convert(spec, hf_dir, map, overrides, compile_kw)
    return loaded.compiled, loaded.model


def load_hf_into(compiled, model: torch.nn.Module, hf_dir: str | Path, map: MapLike = None) -> None:
    """Load a checkpoint into a model already built from `compiled` (training from pretrained weights).
    The spec parameters config.json gives must be the compiled ones."""
    hf_dir = _model_dir(hf_dir)
    config = _read_config(hf_dir)
    wmap = resolve_map(map, model_type(config), str(hf_dir / "config.json"))
    derived = spec_overrides(wmap, config, declared_params(compiled.spec), source=str(hf_dir / "config.json"))
    differ = [f"{k}: config.json gives {v!r}, the model has {compiled.params.get(k)!r}"
              for k, v in derived.items() if not same_value(v, compiled.params.get(k))]
    if differ:
        raise WeightsError(f"{hf_dir}: the checkpoint is not this model ({'; '.join(differ)}); compile the spec "
                           "with the checkpoint's parameters")
    _load_tensors(wmap, compiled, model, hf_dir, config)


# ----------------------------------------------------------------------------
# Loading


@attrs.frozen
class _Loaded:
    compiled: Any
    model: torch.nn.Module
    wmap: WeightMap
    derived: dict[str, Any]  # parameters taken from config.json
    n_hf_tensors: int

    @property
    def arch(self) -> str:
        return self.wmap.model_type


def load_for_convert(spec, hf_dir, map: MapLike, overrides: dict[str, Any], compile_kw: dict[str, Any],
                     check_memory: bool = True) -> _Loaded:
    import archc

    # Config and spec first: a checkpoint that cannot fit fails before gigabytes of tensors are read.
    hf_dir = _model_dir(hf_dir)
    config = _read_config(hf_dir)
    source = str(hf_dir / "config.json")
    wmap = resolve_map(map, model_type(config), source)
    derived = spec_overrides(wmap, config, declared_params(spec), source=source)
    try:
        compiled = archc.compile(spec, {**derived, **overrides}, **compile_kw)
    except SpecError as err:  # say where parameters the user never typed came from
        note = f"parameters from {source}: " + ", ".join(f"{k}={v!r}" for k, v in derived.items())
        raise SpecError(err.message, err.span, hint=err.hint, notes=(*err.notes, (note, None))) from None
    model = compiled.build(check_memory=check_memory)  # a config.json asking for terabytes stops here
    count = _load_tensors(wmap, compiled, model, hf_dir, config)
    return _Loaded(compiled, model.eval(), wmap, derived, count)


def _load_tensors(wmap: WeightMap, compiled, model: torch.nn.Module, hf_dir: Path, config: dict) -> int:
    expect = expected_weights(compiled, model)
    _check_tied(wmap, config, expect, hf_dir / "config.json")
    skipped = range(0)
    if wmap.extra_layers and config.get(wmap.extra_layers):  # they follow the checkpoint's layers
        extra, layers = config[wmap.extra_layers], config.get("num_hidden_layers")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (extra, layers)):
            raise SpecError(f"{hf_dir / 'config.json'} {wmap.extra_layers}={extra!r}, num_hidden_layers={layers!r}: "
                            "expected non-negative integers")
        skipped = range(layers, layers + extra)
    hf_state = _read_tensors(hf_dir)
    check_dtypes(wmap, hf_state, str(hf_dir))
    tensors, sources = to_archc(wmap, hf_state, expect, compiled.params, skip_layers=skipped)
    _check_shapes(tensors, sources, hf_state, expect)
    load_canonical(model, compiled, tensors, strict=True)
    return len(hf_state)


def _check_tied(wmap: WeightMap, config: dict, expect: Mapping[str, Any], source: Path) -> None:
    """A checkpoint whose config ties the head has no head tensor: the spec must tie it too."""
    for rule in wmap.rules().values():
        if not (isinstance(rule, Tied) and rule.flag and rule.untied) or rule.untied not in expect:
            continue
        tied = config.get(rule.flag, wmap.config.defaults.get(rule.flag))
        if tied is True:
            raise SpecError(f"{source} {rule.flag}=true: the checkpoint's output head is its embedding, but the "
                            f"spec gives the head a weight of its own ({rule.untied})",
                            hint="use a spec that ties the head (linear(..., tie=embed)), e.g. -D tie_embeddings=true "
                                 "where the spec has that parameter")


def _check_shapes(tensors: dict[str, torch.Tensor], sources: dict[str, str], hf_state: dict[str, torch.Tensor],
                  expected: Mapping[str, Sequence[int]]) -> None:
    """Name the HF key behind each mis-shaped weight (load_canonical only knows the canonical name)."""
    bad = [f"  {sources[name]} {list(hf_state[sources[name]].shape)} -> {name} {list(t.shape)}: "
           f"the model expects {list(expected[name])}"
           for name, t in tensors.items() if name in expected and tuple(t.shape) != tuple(expected[name])]
    if bad:
        raise WeightsError("shape mismatch (HF key [shape] -> archc name [shape]):\n" + "\n".join(bad))


def _model_dir(hf_dir: str | Path) -> Path:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise WeightsError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    return hf_dir


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found (a Hugging Face model directory has a config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WeightsError(f"{path}: not valid JSON ({err})") from None


def _read_config(hf_dir: Path) -> dict:
    config = _read_json(hf_dir / "config.json")
    if not isinstance(config, dict):
        raise WeightsError(f"{hf_dir / 'config.json'}: expected a JSON object of fields, got {type(config).__name__}")
    return config


def _read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    stem = next((name for name in ("model", "diffusion_pytorch_model")  # transformers', diffusers' names
                 if any((hf_dir / f"{name}{end}").is_file() for end in (".safetensors", ".safetensors.index.json"))),
                "model")
    single, index = hf_dir / f"{stem}.safetensors", hf_dir / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():  # a sharded checkpoint: the index maps each key to its shard file
        weight_map = _read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(s, str) for s in weight_map.values()):
            raise WeightsError(f"{index}: expected {{\"weight_map\": {{key: shard file}}}}")
        shards = set(weight_map.values())
        if any(Path(s).name != s for s in shards):
            raise WeightsError(f"{index}: shard names must be files in {hf_dir}")
        files = [hf_dir / s for s in sorted(shards)]
    else:
        raise WeightsError(f"{hf_dir}: no model.safetensors or diffusion_pytorch_model.safetensors (pickled "
                           "pytorch_model.bin files are never read; convert them to safetensors first)")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            state.update(load_file(path))  # safetensors only: loading cannot execute code
        except (SafetensorError, OSError, RuntimeError, ValueError) as err:
            raise WeightsError(f"{path}: cannot read safetensors ({err}); the file is truncated or not "
                               "safetensors") from None
    return state


# ----------------------------------------------------------------------------
# Writing: archc's own weights file, and Hugging Face directories


def save_converted(model: torch.nn.Module, compiled, path: Path, model_type: str | None = None) -> None:
    """save_model (it handles tied weights), atomically: a failed write never replaces a good file.
    The spec parameters (and the family the weights came from) travel in the file's metadata."""
    meta = {"format": "pt", "archc.params": json.dumps(compiled.params)}
    if model_type:
        meta["archc.model_type"] = model_type
    _atomic(Path(path), lambda tmp: save_model(model, tmp, metadata=meta))


def load_converted(spec, path: str | Path, overrides: dict[str, Any], compile_kw: dict[str, Any],
                   check_memory: bool = True):
    """(compiled, model, model_type or None) from a weights file `save_converted` wrote."""
    import archc

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: cannot read safetensors ({err})") from None
    try:
        params = json.loads(meta["archc.params"])
    except (KeyError, json.JSONDecodeError):
        raise WeightsError(f"{path}: no archc.params in its metadata (not written by `archc convert`)") from None
    compiled = archc.compile(spec, {**params, **overrides}, **compile_kw)
    model = compiled.build(check_memory=check_memory)
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as err:
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:]) or str(err)
        raise WeightsError(f"{path} does not fit the model compiled from {spec}: {detail}") from None
    return compiled, model.eval(), meta.get("archc.model_type")


def save_hf(compiled, model: torch.nn.Module, out_dir: str | Path, map: MapLike,
            base_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write `out_dir/config.json` and `out_dir/model.safetensors` that transformers loads as the same
    model: the weight map run backwards. Refuses (SpecError) spec parameters the family's config.json
    cannot say — the written config must load back as exactly these parameters. `base_config` (e.g.
    the config.json the weights came from) supplies the fields the map does not write: token ids,
    max_position_embeddings, chunk sizes. Returns the config."""
    from archc.compiler.lower import resolve_params

    wmap = resolve_map(map)
    if wmap.library != "transformers":
        raise SpecError(f"cannot export to {wmap.model_type}: writing {wmap.library} directories is not built "
                        "(they can be read: archc convert --from-hf)")
    declared = declared_params(compiled.spec)
    canonical = to_canonical(compiled, model.state_dict())
    # Token ids belong to the tokenizer, which archc does not know: without a base config none is
    # written (a family's default pad id may lie outside a small vocabulary).
    config = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None}
    config.update({k: v for k, v in (base_config or {}).items() if k != "transformers_version"})
    config.update(hf_config(wmap, compiled.params, declared))
    for rule in wmap.rules().values():
        if isinstance(rule, Tied) and rule.flag:
            config[rule.flag] = rule.untied is None or rule.untied not in canonical
    dtypes = {t.dtype for t in canonical.values()}
    if len(dtypes) == 1:
        config["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    back = resolve_params(compiled.spec, spec_overrides(wmap, config, declared, source="the exported config.json"))
    differ = [f"{k}={v!r} (it would load back as {back.get(k)!r})" for k, v in compiled.params.items()
              if k not in wmap.config.ignore and not same_value(back.get(k), v)]
    if differ:
        raise SpecError(f"cannot export to {wmap.model_type}: its config.json cannot say " + ", ".join(differ),
                        hint="export a model whose parameters the family has (see the map's config fields)")
    tensors = {k: t.detach().cpu().clone() for k, t in to_hf(wmap, canonical, compiled.params).items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic(out_dir / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config, indent=2) + "\n"
    _atomic(out_dir / "config.json", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return config


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
