"""Checkpoints: exact resume (AdamW and Muon), pruning, atomic saves, clear errors, no pickle."""

from __future__ import annotations

import inspect
import json
import random
import re

import numpy as np
import pytest
import torch
from conftest import SPECS

import archc
from archc.interop.weights import fused_layout
from archc.training import checkpoint as ckpt_mod
from archc.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from archc.training.optim import build_optimizer, lr_lambda

TINY = dict(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)


@pytest.fixture(scope="module")
def compiled():
    return archc.compile(SPECS / "llama.arch", **TINY)


def setup(compiled, name, seed=0):
    torch.manual_seed(seed)
    model = compiled.build()
    opt = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name=name, lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda("cosine", 2, 20))
    return model, opt, sched


def train(model, opt, sched, steps):
    for _ in range(steps):
        tokens = torch.randint(0, 256, (2, 16))  # drawn from the global RNG: resume must restore it
        loss = model(tokens)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()


def meta_for(compiled, **more):
    return {"spec_sha": compiled.ir.meta["sha256"], "params": compiled.params, **more}


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_resume_is_bit_exact(compiled, tmp_path, name):
    model, opt, sched = setup(compiled, name)
    train(model, opt, sched, 3)
    saved_opt_state = opt.state_dict()
    path = save_checkpoint(tmp_path, 3, model, opt, sched, meta=meta_for(compiled, data_position=6))
    assert path == tmp_path / "checkpoints" / "step_00000003"
    train(model, opt, sched, 3)
    want = {k: v.clone() for k, v in model.state_dict().items()}
    want_lr = [g["lr"] for g in opt.param_groups]

    random.random(), np.random.rand(), torch.rand(3)  # disturb every generator
    model2, opt2, sched2 = setup(compiled, name, seed=1)
    meta = load_checkpoint(tmp_path, model2, opt2, sched2, expect={"spec_sha": compiled.ir.meta["sha256"]})
    assert meta["step"] == 3 and meta["data_position"] == 6 and meta["params"]["d_model"] == 32
    loaded = opt2.state_dict()
    assert loaded["param_groups"] == saved_opt_state["param_groups"]  # tuples, names, row_splits, all of it
    assert sched2.last_epoch == 3
    train(model2, opt2, sched2, 3)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert [g["lr"] for g in opt2.param_groups] == want_lr


def test_rng_states_restored(compiled, tmp_path):
    model = compiled.build()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_checkpoint(tmp_path, 1, model)
    want = (random.random(), np.random.rand(), torch.rand(4))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_checkpoint(tmp_path, model)
    got = (random.random(), np.random.rand(), torch.rand(4))
    assert got[0] == want[0] and got[1] == want[1] and torch.equal(got[2], want[2])


def test_state_encoding_round_trips_types():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.ones(2)}, 7: {"n": 4}},
             "param_groups": [{"betas": (0.9, 0.95), "params": [0, 7], "lr": 1e-3, "x": None, "f": float("inf"),
                               "dtype": torch.bfloat16, "splits": [[1, 2], None]}]}
    tensors: dict = {}
    encoded = ckpt_mod._encode(state, "", tensors, set())
    back = ckpt_mod._decode(json.loads(json.dumps(encoded)), tensors)
    assert set(tensors) == {"state/0/step", "state/0/m"}
    assert back["param_groups"] == state["param_groups"]
    assert isinstance(back["param_groups"][0]["betas"], tuple) and list(back["state"]) == [0, 7]
    assert torch.equal(back["state"][0]["m"], state["state"][0]["m"]) and back["state"][7] == {"n": 4}


def test_pruning_keeps_the_newest(compiled, tmp_path):
    model = compiled.build()
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, model, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000040", "step_00000050"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000050"
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "step_00000050"
    assert latest_checkpoint(tmp_path / "checkpoints" / "step_00000040").name == "step_00000040"
    assert latest_checkpoint(tmp_path / "nothing") is None
    save_checkpoint(tmp_path, 50, model, keep=2)  # the same step again replaces it
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == names


def test_interrupted_save_leaves_previous_loadable(compiled, tmp_path, monkeypatch):
    model, opt, sched = setup(compiled, "muon")
    train(model, opt, sched, 1)
    save_checkpoint(tmp_path, 1, model, opt, sched, meta=meta_for(compiled))
    want = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, opt, sched, 1)

    real = ckpt_mod._write_tensors

    def crash(path, tensors):
        if path.name == "rng.safetensors":
            raise OSError("disk full")
        real(path, tensors)

    monkeypatch.setattr(ckpt_mod, "_write_tensors", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, sched, meta=meta_for(compiled), keep=1)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # no partial dir
    # a hard kill would leave a hidden temp dir: it is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".step_00000002.tmp-12345").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000001"

    model2, opt2, sched2 = setup(compiled, "muon", seed=5)
    assert load_checkpoint(tmp_path, model2, opt2, sched2)["step"] == 1
    for k, v in model2.state_dict().items():
        assert torch.equal(v, want[k])
    save_checkpoint(tmp_path, 2, model2, keep=5)  # a save deletes only its own temporary directory ...
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        ".step_00000002.tmp-12345", "step_00000001", "step_00000002"]
    ckpt_mod.remove_leftovers(tmp_path)  # ... the run holding the directory's lock sweeps crashed saves away
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_spec_mismatch_is_one_clear_line(compiled, tmp_path):
    save_checkpoint(tmp_path, 1, compiled.build(), meta=meta_for(compiled))
    with pytest.raises(CheckpointError, match="made from a different spec .*use the spec it came from") as e:
        load_checkpoint(tmp_path, compiled.build(), expect={"spec_sha": "0123456789ab"})
    assert "\n" not in str(e.value) and compiled.ir.meta["sha256"] in str(e.value)
    changed = {**compiled.params, "d_ff": 64}
    with pytest.raises(CheckpointError, match="different spec parameters \\(d_ff: checkpoint 48, now 64\\)"):
        load_checkpoint(tmp_path, compiled.build(), expect={"params": changed})
    load_checkpoint(tmp_path, compiled.build(), expect={"spec_sha": compiled.ir.meta["sha256"],
                                                          "params": compiled.params})
    with pytest.raises(CheckpointError, match="data_seed = None, expected 7"):
        load_checkpoint(tmp_path, compiled.build(), expect={"data_seed": 7})


def test_shape_mismatch_and_missing_files(compiled, tmp_path):
    model, opt, sched = setup(compiled, "adamw")
    save_checkpoint(tmp_path, 1, model, opt, sched)
    other = archc.compile(SPECS / "llama.arch", **{**TINY, "d_ff": 64}).build()
    with pytest.raises(CheckpointError, match=r"does not fit the model: layers.0.mlp.gate_up.weight is \[96, 32\] "
                                              r"in the checkpoint, \[128, 32\] in the model \(and 1 more\)") as e:
        load_checkpoint(tmp_path, other)
    assert "\n" not in str(e.value)
    muon = build_optimizer(model, compiled.param_roles(), fused_layout(compiled), name="muon")
    with pytest.raises(CheckpointError, match="holds AdamW state, not MuonWithAdamW"):
        load_checkpoint(tmp_path, model, muon)
    (tmp_path / "checkpoints" / "step_00000001" / "optimizer.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: optimizer.json is missing"):
        load_checkpoint(tmp_path, model, opt)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "elsewhere", model)
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(tmp_path, 2, model, meta={"bad": object()})
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000001"]  # no half step 2
    notices = []
    assert latest_checkpoint(tmp_path, notice=notices.append) is None  # step 1 lost a file: not whole any more
    assert "step_00000001 (incomplete: optimizer.json is missing)" in notices[0]


def test_no_pickle(compiled, tmp_path, monkeypatch):
    source = inspect.getsource(ckpt_mod)
    assert not re.search(r"import pickle|pickle\.|torch\.load\(|torch\.save\(|weights_only", source)
    import pickle

    def forbidden(*_a, **_k):
        raise AssertionError("pickle used")

    for name in ("dump", "dumps", "load", "loads"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    model, opt, sched = setup(compiled, "muon")
    train(model, opt, sched, 1)
    path = save_checkpoint(tmp_path, 1, model, opt, sched, meta=meta_for(compiled))
    load_checkpoint(path, model, opt, sched)
    assert {p.suffix for p in path.iterdir()} == {".safetensors", ".json"}
