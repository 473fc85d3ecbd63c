"""Training checkpoints: safetensors and JSON only (no pickle), written atomically, resumed exactly.

Layout of `run_dir/checkpoints/step_00001234/`:

    model.safetensors      the model (`safetensors.torch.save_model`: tied weights stored once)
    optimizer.safetensors  every tensor of `optimizer.state_dict()`, keyed by its path ("state/3/exp_avg")
    optimizer.json         the rest of it (param_groups, step counters that are numbers, the class name),
                           with tensors replaced by {"__tensor__": key}
    scheduler.json         the scheduler's state_dict, same encoding (+ scheduler.safetensors if it has tensors)
    rng.safetensors        torch CPU (and CUDA) generator states
    rng.json               Python `random` and numpy global states
    meta.json              the caller's meta (spec hash, params, data position...), the step, and the size
                           and sha256 of every other file (digests.py), written last

JSON cannot tell a tuple from a list or an int key from a str key, so those are
tagged ({"__tuple__": [...]}, {"__items__": [[key, value], ...]}) and the
optimizer's state_dict comes back equal to what was saved, types included.

Atomicity: everything is written into a hidden sibling directory named after
the writing process, each file is fsynced, then one `os.replace` gives it its
final name. A crash before that leaves only a hidden directory and the previous
checkpoints untouched; `latest_checkpoint` never sees a half-written one. A save
deletes only its own temporary directory: leftovers of a crashed save are
removed by `remove_leftovers`, which a run calls once it holds its directory's
lock (so no other process can be writing one).

Trust: `latest_checkpoint` takes the newest checkpoint whose files match the
digests in its meta.json (whole, not truncated, not changed since) and says on
stderr which newer ones it skipped and why; a checkpoint named explicitly that
does not match is refused. Weights or optimizer state holding NaN or infinite
values are refused with the file and tensor named.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from archc.training import digests
from archc.training.run_dir import notice as stderr_notice

FORMAT = "archc-checkpoint-1"
STEP_DIR = re.compile(r"^step_(\d{8,})$")
_TAGS = ("__tensor__", "__tuple__", "__items__", "__dtype__")


class CheckpointError(Exception):
    """A checkpoint that is missing, incomplete, or made for another model; one line saying which."""


# ---------------------------------------------------------------------------- nested state <-> JSON + tensors


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """JSON-able form of `obj`; tensors go into `tensors` under their path ("state/3/exp_avg")."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()  # safetensors refuses tensors that share memory
        seen.add(ptr)
        tensors[path] = t
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj):
            return {k: _encode(v, _join(path, k), tensors, seen) for k, v in obj.items()}
        return {"__items__": [[_encode(k, _join(path, f"key{i}"), tensors, seen),
                               _encode(v, _join(path, k), tensors, seen)] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors, seen) for i, v in enumerate(obj)]
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"cannot store {type(obj).__name__} at {path or '/'} without pickle")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    return {k: _decode(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------------------- writing


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file(tensors, str(path))
    _fsync(path)


def _write_state(directory: Path, name: str, state: Any, extra: dict | None = None,
                 always_tensors: bool = False) -> None:
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors, set())
    if tensors or always_tensors:
        _write_tensors(directory / f"{name}.safetensors", tensors)
    _write_json(directory / f"{name}.json", {**(extra or {}), "state_dict": encoded})


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = state
    version, internal, gauss = random.getstate()
    plain: dict[str, Any] = {"python": [version, list(internal), gauss]}
    try:
        import numpy as np
    except ImportError:  # numpy is optional here
        return tensors, plain
    name, keys, pos, has_gauss, cached = np.random.get_state()
    plain["numpy"] = [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    return tensors, plain


def _step_dirs(checkpoints: Path) -> list[tuple[int, Path]]:
    if not checkpoints.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoints.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(found)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer=None, scheduler=None,
                    meta: dict | None = None, keep: int | None = 3) -> Path:
    """Write `run_dir/checkpoints/step_{step:08d}/` atomically, then keep only the newest `keep` (None: all)."""
    if keep is not None and keep < 1:
        raise CheckpointError(f"keep must be at least 1 (or None to keep all), got {keep}")
    checkpoints = Path(run_dir) / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step_{step:08d}"
    tmp = checkpoints / f".step_{step:08d}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _fsync(tmp / "model.safetensors")
        if optimizer is not None:
            _write_state(tmp, "optimizer", optimizer.state_dict(), {"class": type(optimizer).__name__},
                         always_tensors=True)
        if scheduler is not None:
            _write_state(tmp, "scheduler", scheduler.state_dict(), {"class": type(scheduler).__name__})
        rng_tensors, rng_plain = _rng_state()
        _write_tensors(tmp / "rng.safetensors", rng_tensors)
        _write_json(tmp / "rng.json", rng_plain)
        try:
            _write_json(tmp / "meta.json", {**(meta or {}), "step": step, "format": FORMAT,
                                            "files": digests.record(tmp)})
        except TypeError as e:
            raise CheckpointError(f"meta must be JSON-serialisable: {e}") from None
        _fsync(tmp)
        if final.exists():  # the same step saved again: move the old one aside first
            old = checkpoints / f".step_{step:08d}.tmp-old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(checkpoints)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        for _s, old in _step_dirs(checkpoints)[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def remove_leftovers(run_dir: str | Path) -> None:
    """Delete the temporary directories of saves that crashed under `run_dir/checkpoints`.

    Only for a caller that holds the run directory's lock: then no save of another process is in flight."""
    for stale in (Path(run_dir) / "checkpoints").glob(".step_*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------- reading


def damage(ckpt: Path) -> str | None:
    """Why checkpoint directory `ckpt` cannot be trusted (None when it is whole): "incomplete: ...",
    "damaged: ..." or "changed: ...", naming the file."""
    file = ckpt / "meta.json"
    if not file.is_file():
        return "incomplete: meta.json is missing (its save did not finish)"
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        return f"damaged: meta.json is not valid JSON ({e})"
    if not isinstance(meta, dict):
        return "damaged: meta.json does not hold a JSON object"
    if "files" in meta:
        return digests.mismatch(ckpt, meta["files"], exclude=("meta.json",))
    for tensors in sorted(ckpt.glob("*.safetensors")):  # a checkpoint from before digests were recorded
        try:
            with safe_open(str(tensors), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f"damaged: {tensors.name} is not a readable safetensors file ({e})"
    return None


def latest_checkpoint(path: str | Path, notice=stderr_notice) -> Path | None:
    """The newest whole checkpoint under a run dir (or its checkpoints/ dir), or `path` if it names one.

    Newer checkpoints that are incomplete or damaged are skipped, and `notice(message)` says which and why."""
    found, _checked, skipped = _find(Path(path))
    if skipped:
        notice(f"skipped {'; '.join(skipped)}; " + (f"using {found}" if found else "no whole checkpoint is left"))
    return found


def _find(path: Path) -> tuple[Path | None, bool, list[str]]:
    """(the checkpoint, whether its files were checked against their digests, the newer ones skipped and why)."""
    if (path / "meta.json").is_file() or STEP_DIR.match(path.name):
        return path, False, []  # named explicitly: loading it says what is wrong with it, if anything
    for checkpoints in (path / "checkpoints", path):
        skipped = []
        for _step, ckpt in reversed(_step_dirs(checkpoints)):
            why = damage(ckpt)
            if why is None:
                return ckpt, True, skipped
            skipped.append(f"checkpoint {ckpt} ({why})")
        if skipped:
            return None, False, skipped
    return None, False, []


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(file))
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    _check_finite(file, tensors.items())
    return tensors


def _check_finite(file: Path, tensors) -> None:
    for key, t in tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{file}: `{key}` holds NaN or infinite values; refusing to load it (the run "
                                  "that saved it had diverged, or the file was changed); use an earlier checkpoint")


def _read_state(directory: Path, name: str) -> tuple[dict, Any]:
    doc = _read_json(directory / f"{name}.json")
    tensor_file = directory / f"{name}.safetensors"
    tensors = _read_tensors(tensor_file) if tensor_file.is_file() else {}
    try:
        return doc, _decode(doc["state_dict"], tensors)
    except KeyError as e:
        raise CheckpointError(f"checkpoint {directory}: {name} state refers to missing tensor {e}") from None


# What meta.json's own fields must hold (the caller's meta may add others): a hand-edited or foreign file is
# refused naming the field, not read into a crash later.
META_TYPES = {"step": int, "params": dict, "config": dict, "batches": dict, "spec_sha": str, "tokenizer": str,
              "data": str}


def read_meta(ckpt: Path) -> dict:
    """The meta.json of checkpoint directory `ckpt`, checked: a JSON object, an archc checkpoint, its fields of
    the types archc wrote."""
    meta = _read_json(ckpt / "meta.json")
    if not isinstance(meta, dict):
        raise CheckpointError(f"{ckpt / 'meta.json'}: expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not an archc checkpoint (format {meta.get('format')!r})")
    for key, kind in META_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            raise CheckpointError(f"{ckpt / 'meta.json'}: `{key}` is {value!r}; archc writes a JSON "
                                  f"{_JSON_NAMES[kind]} there (the file was changed outside archc)")
    if meta.get("step", 0) < 0:
        raise CheckpointError(f"{ckpt / 'meta.json'}: `step` is {meta['step']}; expected a step count, 0 or more")
    return meta


_JSON_NAMES = {int: "integer", dict: "object", str: "string"}


def check_expect(ckpt: Path, meta: dict, expect: dict) -> None:
    for key, want in expect.items():
        got = meta.get(key)
        try:
            want = json.loads(json.dumps(want))  # compare as stored: tuples are lists in meta.json
        except TypeError:
            pass
        if got == want:
            continue
        if key == "params" and isinstance(got, dict) and isinstance(want, dict):
            diff = [f"{k}: checkpoint {got.get(k, '(unset)')!r}, now {want.get(k, '(unset)')!r}"
                    for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
            raise CheckpointError(f"this checkpoint was made with different spec parameters ({'; '.join(diff)}); "
                                  f"use the parameters it came from (checkpoint {ckpt})")
        if key in ("spec_sha", "spec_hash", "sha256"):
            params = meta.get("params")
            raise CheckpointError(
                f"this checkpoint was made from a different spec ({key} {str(got)[:12]}, params {params}); "
                f"use the spec it came from (checkpoint {ckpt})")
        raise CheckpointError(f"checkpoint {ckpt} has {key} = {got!r}, expected {want!r}")


def _load_model(ckpt: Path, model: torch.nn.Module) -> None:
    file = ckpt / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: model.safetensors is missing")
    target = model.state_dict()
    wrong = []
    try:
        with safe_open(str(file), framework="pt") as f:
            stored = set(f.keys())
            for key, tensor in target.items():  # in the model's order
                if key in stored and (shape := list(f.get_slice(key).get_shape())) != list(tensor.shape):
                    wrong.append(f"{key} is {shape} in the checkpoint, {list(tensor.shape)} in the model")
    except SafetensorError as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model: {wrong[0]}{more}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        load_model(model, str(file), strict=True, device=str(device))
    except RuntimeError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model: {detail}") from None
    _check_finite(file, model.state_dict().items())


def _restore_rng(ckpt: Path) -> None:
    tensors = _read_tensors(ckpt / "rng.safetensors") if (ckpt / "rng.safetensors").is_file() else None
    if tensors is None:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: rng.safetensors is missing")
    plain = _read_json(ckpt / "rng.json")
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[f"cuda/{i}"] for i in range(torch.cuda.device_count()) if f"cuda/{i}" in tensors]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in plain:
        import numpy as np

        name, keys, pos, has_gauss, cached = plain["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer=None, scheduler=None,
                    restore_rng: bool = True, expect: dict | None = None, notice=stderr_notice) -> dict:
    """Restore what `save_checkpoint` wrote (from a step dir, or the newest whole one under a run dir); return
    its meta.

    `expect` is checked against meta first (e.g. {"spec_sha": compiled.ir.meta["sha256"]}).
    """
    ckpt, checked, skipped = _find(Path(path))
    if ckpt is None and skipped:
        raise CheckpointError(f"no whole checkpoint at {path}: {'; '.join(skipped)}")
    if ckpt is None:
        raise CheckpointError(f"no checkpoint at {path} (looked for meta.json and checkpoints/step_*/)")
    if skipped:
        notice(f"skipped {'; '.join(skipped)}; using {ckpt}")
    if not checked and (ckpt / "meta.json").is_file() and (why := damage(ckpt)) is not None:
        raise CheckpointError(f"checkpoint {ckpt} is {why}; use another checkpoint")
    meta = read_meta(ckpt)
    check_expect(ckpt, meta, expect or {})
    _load_model(ckpt, model)
    if optimizer is not None:
        doc, state = _read_state(ckpt, "optimizer")
        if doc.get("class") != type(optimizer).__name__:
            raise CheckpointError(f"checkpoint {ckpt} holds {doc.get('class')} state, "
                                  f"not {type(optimizer).__name__}; build the optimizer it was saved with")
        try:
            optimizer.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: optimizer state does not fit ({e})") from None
    if scheduler is not None:
        _doc, state = _read_state(ckpt, "scheduler")
        scheduler.load_state_dict(state)
    if restore_rng:
        _restore_rng(ckpt)
    return meta
