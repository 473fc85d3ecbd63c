"""Fault tolerance on torchft, for DiLoCo and for plain data parallel: a replica group SIGKILLed mid-run is
restarted, heals from its live peer, and every group ends with bit-identical (global) parameters, each sync or
step committed exactly once."""

from __future__ import annotations

import json

import pytest
from conftest import SPECS

from archc.cli import main

pytest.importorskip("torchft", reason="torchft==0.2.0 is not installed (pip install torchft==0.2.0)")
pytestmark = pytest.mark.slow

TINY = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)
SPEC = str(SPECS / "llama.arch")


def common(corpus, out, steps, batch=2):
    return ["train", SPEC, *sum((["-D", f"{k}={v}"] for k, v in TINY.items()), []), "--data", corpus,
            "--batch-size", str(batch), "--seq-len", "32", "--steps", str(steps), "--eval-every", str(steps),
            "--eval-batches", "2", "--sample-tokens", "0", "--no-progress", "--out-dir", str(out)]


def args(corpus, out, steps, diloco, *extra):
    return [*common(corpus, out, steps), "--diloco", diloco, "--fault-tolerant", *extra]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_replica_group_heals_and_all_end_with_identical_global_parameters(tmp_path, corpus, monkeypatch,
                                                                                 capsys):
    # replica 1 is SIGKILLed after inner step 5 (between the syncs at 4 and 6); replica 0 keeps going alone and
    # waits before step 9 until replica 1's restart is up (the ordering torchft's tests force with barriers).
    # Where the restart heals depends on when its quorum request reaches the lighthouse, so the test checks
    # what must hold wherever that is: one heal, at a sync after the kill, nothing trained twice or lost.
    monkeypatch.setenv("ARCHC_FT_INJECT", json.dumps({"kill": [1, 5], "hold": [0, 9, 1]}))
    out = tmp_path / "ft"
    assert main(args(corpus, out, 12, "replicas=2,inner_steps=2")) == 0, capsys.readouterr().err
    assert (out / ".ft" / "replica_1.attempt_1").exists()  # it was killed and restarted once
    assert not (out / ".ft" / "replica_1.attempt_2").exists()
    finals = [json.loads((out / f"replica_{r}" / "ft_final.json").read_text()) for r in range(2)]
    assert finals[0]["global_sha256"] == finals[1]["global_sha256"]
    # one commit for the first quorum + one per sync (12 / H = 6), on both: none lost, none twice
    assert [f["ft_step"] for f in finals] == [7, 7] and [f["step"] for f in finals] == [12, 12]

    lead = [r for r in rows(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in lead] == list(range(1, 13))
    assert [r["ft_step"] for r in lead] == [1 + s // 2 for s in range(1, 13)]  # +1 at every sync
    other = rows(out / "replica_1" / "metrics.jsonl")
    healed = [r for r in other if r.get("event") == "healed"]
    assert len(healed) == 1, healed
    at = healed[0]["step"]
    assert 5 < at <= 12 and at % 2 == 0  # at a sync after the kill
    assert healed[0]["ft_step"] == 1 + at // 2  # it finished the donor's open sync with it
    assert [r["participants"] for r in lead if r["step"] % 2 == 0] == [2 if s <= 4 or s >= at else 1
                                                                       for s in range(2, 13, 2)]
    trained = [r["step"] for r in other if "loss" in r]
    assert trained == [1, 2, 3, 4, 5] + list(range(at + 1, 13))  # its first life, then on from the donor's step


def test_fault_tolerant_option_errors_are_one_line(tmp_path, corpus, capsys):
    for diloco, message in [("replicas=2,inner_steps=2,fp4=e3m0", "fp4 is not available"),
                            ("replicas=2,inner_steps=4,streaming=2,tau=2", "tau=2 must be below")]:
        assert main(args(corpus, tmp_path / "bad", 4, diloco)) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    bad = args(corpus, tmp_path / "bad", 4, "replicas=2,inner_steps=2", "--replica-id", "1")
    assert main(bad) == 1 and "--replica-id needs --lighthouse" in capsys.readouterr().err
    data_parallel = [*common(corpus, tmp_path / "bad", 4, batch=3), "--nproc", "2", "--fault-tolerant"]
    assert main(data_parallel) == 1 and "does not split over --nproc 2 replica groups" in capsys.readouterr().err
    data_parallel = [*common(corpus, tmp_path / "bad", 4), "--nproc", "2", "--fault-tolerant",
                     "--lighthouse", "http://127.0.0.1:1", "--replica-id", "2"]
    assert main(data_parallel) == 1 and "--replica-id 2: must be in [0, 2)" in capsys.readouterr().err


def test_replica_groups_started_on_their_own_join_a_given_lighthouse(tmp_path, corpus):
    # the multi-machine recipe on one machine: one lighthouse, one `archc train --replica-id I` per group
    import os
    import subprocess
    import sys

    from torchft._torchft import LighthouseServer

    lighthouse = LighthouseServer(bind="127.0.0.1:0", min_replicas=1)
    try:
        env = {**os.environ, "PYTHONPATH": str(SPECS.parent)}
        procs = [subprocess.Popen([sys.executable, "-m", "archc",
                                   *args(corpus, tmp_path / f"group{r}", 4, "replicas=2,inner_steps=2"),
                                   "--lighthouse", lighthouse.address(), "--replica-id", str(r)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for r in range(2)]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        lighthouse.shutdown()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    finals = [json.loads((tmp_path / f"group{r}" / f"replica_{r}" / "ft_final.json").read_text()) for r in range(2)]
    assert finals[0]["global_sha256"] == finals[1]["global_sha256"] and [f["ft_step"] for f in finals] == [3, 3]
    assert [r["participants"] for r in rows(tmp_path / "group0" / "metrics.jsonl") if "loss" in r] == [2] * 4


# ------------------------------------------------------------------------- data parallel under torchft


def test_killed_data_parallel_group_heals_and_both_end_with_identical_parameters(tmp_path, corpus, monkeypatch,
                                                                                 capsys):
    # group 1 is SIGKILLed after step 5; group 0 goes on alone (the whole quorum, half the global batch) and
    # waits before step 9 until group 1's restart is up, which then heals to group 0's state at the start of
    # one of its next steps (which one depends on timing) and runs the rest with it.
    monkeypatch.setenv("ARCHC_FT_INJECT", json.dumps({"kill": [1, 5], "hold": [0, 9, 1]}))
    out = tmp_path / "ftdp"
    assert main([*common(corpus, out, 12, batch=4), "--nproc", "2", "--fault-tolerant"]) == 0, \
        capsys.readouterr().err
    assert (out / ".ft" / "replica_1.attempt_1").exists() and not (out / ".ft" / "replica_1.attempt_2").exists()
    finals = [json.loads((out / f"replica_{r}" / "ft_final.json").read_text()) for r in range(2)]
    assert finals[0]["global_sha256"] == finals[1]["global_sha256"]
    # one commit for the first quorum + one per step, on both groups: none lost, none twice
    assert [f["ft_step"] for f in finals] == [13, 13] and [f["step"] for f in finals] == [12, 12]

    lead = [r for r in rows(out / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in lead] == list(range(1, 13))
    assert [r["ft_step"] for r in lead] == [1 + s for s in range(1, 13)]
    other = rows(out / "replica_1" / "metrics.jsonl")
    healed = [r for r in other if r.get("event") == "healed"]
    assert len(healed) == 1, healed
    at = healed[0]["step"]  # the donor's committed steps when the restarted group joined
    assert 5 <= at < 12  # after the kill, before the donor finished
    assert healed[0]["ft_step"] == 1 + at
    assert [r["participants"] for r in lead] == [2] * 5 + [1] * (at - 5) + [2] * (12 - at)
    # the ring all-reduce of the gradients (+ loss and weight) sends nothing with one participant
    assert all((r["comm_bytes"] > 0) == (r["participants"] == 2) for r in lead)
    assert all(r["comm_seconds"] >= 0 and r["retries"] == 0 for r in lead[:5])
    trained = [r["step"] for r in other if "loss" in r]
    assert trained == [1, 2, 3, 4, 5] + list(range(at + 1, 13))  # its first life, then on from the donor's step
    for r in (r for r in other if r.get("step", 0) > at and "loss" in r):  # after healing: the same averaged step
        assert r["loss"] == lead[r["step"] - 1]["loss"]


def test_data_parallel_under_torchft_matches_fsdp2_at_the_same_global_batch(tmp_path, corpus):
    # both split the same global batch into the same two slices and average their gradients (FSDP2 by
    # reduce-scatter, torchft by one all-reduce), so only the summation order differs
    import torch
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert main([*common(corpus, tmp_path / "ft", 4, batch=4), "--nproc", "2", "--fault-tolerant"]) == 0
    assert main([*common(corpus, tmp_path / "fsdp", 4, batch=4), "--nproc", "2"]) == 0
    dcp_to_torch_save(tmp_path / "fsdp" / "dcp" / "step_00000004", tmp_path / "fsdp.pt")
    fsdp = torch.load(tmp_path / "fsdp.pt")["model"]
    ft = load_file(tmp_path / "ft" / "checkpoints" / "step_00000004" / "model.safetensors")
    assert sorted(ft) == sorted(fsdp)
    for name in fsdp:
        torch.testing.assert_close(ft[name], fsdp[name], rtol=1e-5, atol=1e-6, msg=name)
    losses = [[r["loss"] for r in rows(tmp_path / run / "metrics.jsonl") if "loss" in r] for run in ("ft", "fsdp")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert [r["participants"] for r in rows(tmp_path / "ft" / "metrics.jsonl") if "loss" in r] == [2] * 4
