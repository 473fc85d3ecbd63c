"""FSDP2 on 2 gloo processes trains like one process; DCP checkpoints saved on 2 resume on 1; CLI flags."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import SPECS

from archc.cli import main
from archc.training.train import TrainConfig, train

pytestmark = pytest.mark.slow

TINY = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)
SPEC = str(SPECS / "llama.arch")


def config(tmp_path, corpus, name, **kw):
    base = dict(data=corpus, batch_size=4, seq_len=32, steps=4, eval_every=2, eval_batches=2, checkpoint_every=100,
                sample_tokens=0, progress=False, out_dir=str(tmp_path / name), lr=3e-3)
    return TrainConfig(**{**base, **kw})


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows(run_dir)]


def assert_same_curve(a, b, tol):
    assert [s for s, *_ in a] == [s for s, *_ in b]
    for (_, la, va), (_, lb, vb) in zip(a, b):
        for x, y in ((la, lb), (va, vb)):
            assert (x is None) == (y is None)
            if x is not None:
                assert abs(x - y) <= tol, (a, b)


def test_fsdp2_on_two_processes_matches_single_process(tmp_path, corpus):
    single = train(SPEC, config(tmp_path, corpus, "single"), TINY)
    two = train(SPEC, config(tmp_path, corpus, "two"), TINY, nproc=2)
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "single"), 1e-5)
    assert abs(two.final_loss - single.final_loss) < 1e-5
    logged = rows(tmp_path / "two")
    assert all(r["comm_bytes"] > 0 for r in logged[1:])


def test_dcp_checkpoint_saved_on_two_processes_resumes_on_one(tmp_path, corpus):
    two = train(SPEC, config(tmp_path, corpus, "two", checkpoint_every=2), TINY, nproc=2)
    # DCP: saved by 2 processes at steps 2 and 4; drop step 4 and resume on 1 process from step 2
    assert (tmp_path / "two" / "dcp" / "step_00000002" / "trainer.json").exists()
    shutil.rmtree(tmp_path / "two" / "dcp" / "step_00000004")
    full = curve(tmp_path / "two")
    resumed = train(SPEC, config(tmp_path, corpus, "two", checkpoint_every=2), TINY, nproc=1,
                                resume=True)
    assert_same_curve(curve(tmp_path / "two"), full, 1e-5)
    assert abs(resumed.final_loss - two.final_loss) < 1e-5


def test_diloco_one_replica_h1_outer_sgd_lr1_equals_plain_training(tmp_path, corpus):
    from archc.training.distributed.diloco import parse_diloco

    plain = train(SPEC, config(tmp_path, corpus, "plain", steps=5), TINY)
    diloco = parse_diloco("replicas=1,inner_steps=1,outer_lr=1,outer_momentum=0")
    one = train(SPEC, config(tmp_path, corpus, "diloco", steps=5), TINY, diloco=diloco)
    assert_same_curve(curve(tmp_path / "diloco"), curve(tmp_path / "plain"), 1e-6)
    assert abs(one.final_loss - plain.final_loss) <= 1e-6


def test_cli_streaming_diloco_two_replicas_logs_bytes_and_schedule(tmp_path, corpus, capsys):
    out = tmp_path / "stream"
    code = main(["train", SPEC, *sum((["-D", f"{k}={v}"] for k, v in TINY.items()), []), "--data", corpus,
                 "--batch-size", "2", "--seq-len", "32", "--steps", "8", "--eval-every", "8", "--eval-batches", "2",
                 "--sample-tokens", "0", "--no-progress", "--out-dir", str(out),
                 "--diloco", "replicas=2,inner_steps=4,streaming=2,tau=1,fp4=e3m0"])
    assert code == 0, capsys.readouterr()
    logged = rows(out)
    sent = [r["comm_bytes"] for r in logged[1:]]
    assert [s > 0 for s in sent] == [False, True, False, True, False, True, False, True]  # a fragment every 2 steps
    assert all("comm_seconds" in r for r in logged[1:]) and logged[-1]["val_loss"] > 0
    schedule = json.loads((out / "sync_schedule.json").read_text())
    starts = {(s, f) for s, f, kind in schedule if kind == "start"}
    applies = {(s, f) for s, f, kind in schedule if kind == "apply"}
    assert starts == {(2, 0), (6, 0), (4, 1), (8, 1)}
    assert applies == {(3, 0), (7, 0), (5, 1), (8, 1)}  # tau = 1 later; the last one is drained at the end


def test_cli_bad_diloco_keys_are_one_line_errors(capsys):
    assert main(["train", SPEC, "--diloco", "replicas=2,inner_stpes=4"]) == 1
    err = capsys.readouterr().err
    assert "unknown key `inner_stpes`" in err and "did you mean `inner_steps`" in err and err.count("\n") == 1
    assert main(["train", SPEC, "--diloco", "replicas=2,fp4=e3m1"]) == 1
    assert "did you mean" in capsys.readouterr().err


def test_muon_on_fsdp2_shards_matches_single_process_muon(tmp_path, corpus):
    # fused q;k;v and gate;up matrices carry row_splits whose blocks straddle the two shards
    single = train(SPEC, config(tmp_path, corpus, "single", optimizer="muon"), TINY)
    two = train(SPEC, config(tmp_path, corpus, "two", optimizer="muon"), TINY, nproc=2)
    assert_same_curve(curve(tmp_path / "two"), curve(tmp_path / "single"), 1e-5)
    assert abs(two.final_loss - single.final_loss) < 1e-5


def _muon_shards(rank, world):
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from archc.training.optim import Muon

    torch.manual_seed(0)
    # 7 rows over 2 ranks: uneven (padded) shards; row_splits [3, 4] straddle them; 1 row: one rank holds none
    shapes, splits = [(7, 5), (1, 6), (4, 9)], [[3, 4], None, None]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    module = torch.nn.ParameterList(params)
    fully_shard(module, mesh=init_device_mesh("cpu", (world,)))
    sharded = Muon([{"params": list(module), "row_splits": splits}], lr=0.05)
    plain = Muon([{"params": reference, "row_splits": splits}], lr=0.05)
    for step_grads in grads:
        for p, q, g in zip(module, reference, step_grads):
            from torch.distributed.tensor import distribute_tensor
            p.grad = distribute_tensor(g, p.device_mesh, p.placements)
            q.grad = g.clone()
        sharded.step()
        plain.step()
    return max((p.full_tensor() - q).abs().max().item() for p, q in zip(module, reference))


def test_muon_step_on_uneven_shards_matches_the_full_matrix_step():
    from archc.training.distributed.launch import spawn

    assert spawn(_muon_shards, 2) < 1e-6


def test_diloco_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, corpus):
    from safetensors.torch import load_file

    from archc.training.distributed.diloco import parse_diloco

    # step 4 is mid-period for fragment 0 (local != global) and fragment 1's sync started at 4 is in flight
    # (tau=1): the checkpoint must carry local and global copies, inner and outer state and the pending sync
    diloco = parse_diloco("replicas=2,inner_steps=4,streaming=2,tau=1")
    whole = train(SPEC, config(tmp_path, corpus, "whole", steps=8, batch_size=2), TINY, diloco=diloco)
    cut = config(tmp_path, corpus, "cut", steps=8, batch_size=2, checkpoint_every=4)
    train(SPEC, cut, TINY, diloco=diloco)
    for r in range(2):  # the run "died" after its checkpoint at step 4
        shutil.rmtree(tmp_path / "cut" / "diloco" / f"replica_{r}" / "checkpoints" / "step_00000008")
    resumed = train(SPEC, cut, TINY, diloco=diloco, resume=True)
    assert curve(tmp_path / "cut") == curve(tmp_path / "whole")  # exact: same batches, same state, same order
    assert resumed.val_loss == whole.val_loss
    for r in range(2):
        for name in ("model.safetensors", "optimizer.safetensors"):  # local model; inner + outer state
            a, b = (load_file(str(tmp_path / run / "diloco" / f"replica_{r}" / "checkpoints" / "step_00000008" / name))
                    for run in ("whole", "cut"))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (r, name)


def test_diloco_resume_needs_a_checkpoint_of_every_replica(tmp_path, corpus):
    from archc.training.distributed.diloco import parse_diloco
    from archc.training.train import TrainError

    with pytest.raises(TrainError, match="no DiLoCo checkpoint saved by all 2 replicas"):
        train(SPEC, config(tmp_path, corpus, "none", steps=2), TINY,
                          diloco=parse_diloco("replicas=2,inner_steps=2"), resume=True)
