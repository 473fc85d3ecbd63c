"""One training loop for every mode: an MoE spec with aux-free balancing trains the same on one process, on
FSDP2 with 1 and 2 processes, on one DiLoCo replica with H=1 and outer SGD lr=1, and on torchft data-parallel
replica groups: same losses, same parameters, and the same expert biases (the loads are summed over ranks)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SPECS
from safetensors.torch import load_file

from archc.training.config import TrainConfig
from archc.training.train import train

pytestmark = pytest.mark.slow

SPEC = str(SPECS / "deepseek_moe.arch")
MOE = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_ff": 64, "n_experts": 8, "top_k": 2, "n_shared": 1,
       "d_expert": 16, "groups": 2, "top_groups": 1}
STEPS = 3


def config(tmp_path, corpus, name, **kw):
    base = {"data": corpus, "batch_size": 4, "seq_len": 32, "steps": STEPS, "eval_every": STEPS, "eval_batches": 2,
            "checkpoint_every": STEPS, "sample_tokens": 0, "progress": False, "out_dir": str(tmp_path / name),
            "lr": 3e-3}
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def biases(state):
    return {k: v for k, v in state.items() if k.endswith("expert_bias")}


@pytest.fixture(scope="module")
def single(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("single")
    train(SPEC, config(out, corpus, "run"), MOE)
    state = load_file(out / "run" / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    assert sum(b.abs().sum().item() for b in biases(state).values()) > 0  # the biases did move
    return losses(out / "run"), state


def assert_same_run(run_dir, state, single, tol=1e-5):
    want_losses, want = single
    assert losses(run_dir) == pytest.approx(want_losses, rel=tol, abs=tol)
    assert sorted(state) == sorted(want)
    # Gradients summed in another order differ in the last bits; Adam divides by sqrt(v), so an entry whose
    # gradient is near zero can move by a visible part of one step (lr 3e-3): allow a tenth of a step.
    for name in want:  # biases move by ±γ on the summed loads: equal unless a routing tie flips
        torch.testing.assert_close(state[name], want[name], rtol=1e-4, atol=3e-4, msg=name)
    assert biases(state) and all(torch.equal(b, biases(want)[k]) for k, b in biases(state).items())


@pytest.mark.parametrize("nproc", [1, 2])
def test_fsdp2_balances_experts_like_one_process(tmp_path, corpus, single, nproc):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    train(SPEC, config(tmp_path, corpus, "fsdp"), MOE, nproc=nproc)
    dcp_to_torch_save(tmp_path / "fsdp" / "dcp" / f"step_{STEPS:08d}", tmp_path / "fsdp.pt")
    state = torch.load(tmp_path / "fsdp.pt")["model"]
    assert_same_run(tmp_path / "fsdp", state, single)


def test_diloco_one_replica_h1_outer_sgd_lr1_balances_experts_like_plain_training(tmp_path, corpus, single):
    from archc.training.distributed.diloco import parse_diloco

    diloco = parse_diloco("replicas=1,inner_steps=1,outer_lr=1,outer_momentum=0")
    train(SPEC, config(tmp_path, corpus, "diloco"), MOE, diloco=diloco)
    state = load_file(tmp_path / "diloco" / "diloco" / "replica_0" / "checkpoints" / f"step_{STEPS:08d}"
                      / "model.safetensors")
    assert_same_run(tmp_path / "diloco", state, single, tol=1e-6)


def test_fault_tolerant_data_parallel_balances_experts_like_one_process(tmp_path, corpus, single):
    pytest.importorskip("torchft", reason="torchft==0.2.0 is not installed")
    from archc.training.distributed.ft import FTConfig

    train(SPEC, config(tmp_path, corpus, "ft"), MOE, nproc=2, fault_tolerant=FTConfig())
    state = load_file(tmp_path / "ft" / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors")
    assert_same_run(tmp_path / "ft", state, single)
