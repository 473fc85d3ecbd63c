"""Fault-tolerant DiLoCo on torchft: a replica group SIGKILLed mid-run is restarted, heals from its live peer,
and every group ends with bit-identical global parameters, each sync committed exactly once."""

from __future__ import annotations

import json

import pytest

from archc.cli import main
from conftest import SPECS

pytest.importorskip("torchft", reason="torchft==0.2.0 is not installed (pip install torchft==0.2.0)")

TINY = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)
SPEC = str(SPECS / "llama.arch")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text((SPECS.parent / "archc" / "runtime" / "train.py").read_text() * 3)
    return str(path)


def args(corpus, out, steps, diloco, *extra):
    return ["train", SPEC, *sum((["-D", f"{k}={v}"] for k, v in TINY.items()), []), "--data", corpus,
            "--batch-size", "2", "--seq-len", "32", "--steps", str(steps), "--eval-every", str(steps),
            "--eval-batches", "2", "--sample-tokens", "0", "--no-progress", "--out-dir", str(out),
            "--diloco", diloco, "--fault-tolerant", *extra]


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_killed_replica_group_heals_and_all_end_with_identical_global_parameters(tmp_path, corpus, monkeypatch,
                                                                                 capsys):
    # replica 1 is SIGKILLed after inner step 5 (between the syncs at 4 and 6); replica 0 keeps going alone
    # (syncs 6 and 8 with one participant) and waits before step 9 until replica 1's restart is up (the
    # ordering torchft's tests force with barriers), so the restart heals at the sync after step 10 — or,
    # if its quorum request reaches the lighthouse after replica 0's, at the one after step 12.
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
    assert len(healed) == 1 and healed[0]["step"] in (10, 12)
    at = healed[0]["step"]
    assert healed[0]["ft_step"] == 1 + at // 2  # it finished the donor's open sync with it
    assert [r["participants"] for r in lead if r["step"] % 2 == 0] == [2, 2, 1, 1] + [2 if s >= at else 1
                                                                                       for s in (10, 12)]
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
    no_diloco = [a for a in bad if a not in ("--diloco", "replicas=2,inner_steps=2", "--replica-id", "1")]
    assert main(no_diloco) == 1 and "needs --diloco" in capsys.readouterr().err


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
