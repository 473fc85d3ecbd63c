"""Training checkpoints: safetensors and JSON only (no pickle), written atomically, resumed exactly.

Layout of `run_dir/checkpoints/step_00001234/`:

    model.safetensors      the model (`safetensors.torch.save_model`: tied weights stored once)
    optimizer.safetensors  every tensor of `optimizer.state_dict()`, keyed by its path ("state/3/exp_avg")
    optimizer.json         the rest of it (param_groups, step counters that are numbers, the class name),
                           with tensors replaced by {"__tensor__": key}
    scheduler.json         the scheduler's state_dict, same encoding (+ scheduler.safetensors if it has tensors)
    rng.safetensors        torch CPU (and CUDA) generator states
    rng.json               Python `random` and numpy global states
    meta.json              the caller's meta (spec hash, params, data position...) and the step

JSON cannot tell a tuple from a list or an int key from a str key, so those are
tagged ({"__tuple__": [...]}, {"__items__": [[key, value], ...]}) and the
optimizer's state_dict comes back equal to what was saved, types included.

Atomicity: everything is written into a hidden sibling directory, each file is
fsynced, then one `os.replace` gives it its final name. A crash before that
leaves only a hidden directory (removed on the next save) and the previous
checkpoints untouched; `latest_checkpoint` never sees a half-written one.
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
from safetensors import safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

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
    for stale in checkpoints.glob(".step_*.tmp-*"):  # left by a save that crashed
        shutil.rmtree(stale, ignore_errors=True)
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
            _write_json(tmp / "meta.json", {**(meta or {}), "step": step, "format": FORMAT})
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


# ---------------------------------------------------------------------------- reading


def latest_checkpoint(path: str | Path) -> Path | None:
    """The newest complete checkpoint under a run dir (or its checkpoints/ dir), or `path` if it is one."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for checkpoints in (path / "checkpoints", path):
        complete = [p for _s, p in _step_dirs(checkpoints) if (p / "meta.json").is_file()]
        if complete:
            return complete[-1]
    return None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} is incomplete: {path.name} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def _read_state(directory: Path, name: str) -> tuple[dict, Any]:
    doc = _read_json(directory / f"{name}.json")
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
    try:
        return doc, _decode(doc["state_dict"], tensors)
    except KeyError as e:
        raise CheckpointError(f"checkpoint {directory}: {name} state refers to missing tensor {e}") from None


def _check_expect(ckpt: Path, meta: dict, expect: dict) -> None:
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
    with safe_open(str(file), framework="pt") as f:
        stored = set(f.keys())
        for key, tensor in target.items():  # in the model's order
            if key in stored and (shape := list(f.get_slice(key).get_shape())) != list(tensor.shape):
                wrong.append(f"{key} is {shape} in the checkpoint, {list(tensor.shape)} in the model")
    if wrong:
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model: {wrong[0]}{more}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        load_model(model, str(file), strict=True, device=str(device))
    except RuntimeError as e:
        detail = "; ".join(line.strip() for line in str(e).splitlines()[1:]) or str(e)
        raise CheckpointError(f"checkpoint {ckpt} does not fit the model: {detail}") from None


def _restore_rng(ckpt: Path) -> None:
    tensors = load_file(str(ckpt / "rng.safetensors")) if (ckpt / "rng.safetensors").is_file() else None
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
                    restore_rng: bool = True, expect: dict | None = None) -> dict:
    """Restore what `save_checkpoint` wrote (from a step dir, or the newest under a run dir); return its meta.

    `expect` is checked against meta first (e.g. {"spec_sha": compiled.ir.meta["sha256"]}).
    """
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise CheckpointError(f"no checkpoint at {path} (looked for meta.json and checkpoints/step_*/)")
    meta = _read_json(ckpt / "meta.json")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt} is not an archc checkpoint (format {meta.get('format')!r})")
    _check_expect(ckpt, meta, expect or {})
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
