"""Run history and checkpoints survive careless and hostile use: a used --out-dir is refused (or cleared with
--overwrite), a run directory is locked, metrics.jsonl is rewritten atomically and a torn last line is dropped,
damaged checkpoints fall back to the newest good one, NaN weights and changed options are refused, a replaced
DCP `.metadata` pickle is never loaded, and SIGKILLs during saves and resumes lose no step."""

from __future__ import annotations

import json
import os
import pickle
import random
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, SPECS

from archc.cli import main
from archc.training import run_dir
from archc.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from archc.training.config import TrainConfig, TrainError
from archc.training.train import train

SPEC = str(SPECS / "llama.arch")
TINY = {"n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 1, "d_ff": 48}
DEFINES = [arg for k, v in TINY.items() for arg in ("-D", f"{k}={v}")]


def config(tmp_path, corpus, name="run", **kw):
    base = {"data": corpus, "batch_size": 2, "seq_len": 32, "steps": 4, "eval_every": 2, "eval_batches": 2,
            "checkpoint_every": 2, "sample_tokens": 0, "progress": False, "out_dir": str(tmp_path / name), "lr": 3e-3}
    return TrainConfig(**{**base, **kw})


def argv(out, corpus, *extra, steps=4):
    return ["train", SPEC, *DEFINES, "--data", corpus, "--batch-size", "2", "--seq-len", "32", "--steps", str(steps),
            "--eval-every", "2", "--eval-batches", "2", "--checkpoint-every", "2", "--sample-tokens", "0",
            "--no-progress", "--out-dir", str(out), *extra]


def steps(out):
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


# ------------------------------------------------------------------------------------ the run directory


def test_a_used_out_dir_is_refused_unless_resume_or_overwrite(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(argv(out, corpus)) == 0
    capsys.readouterr()
    assert main(argv(out, corpus, steps=2)) == 1
    err = capsys.readouterr().err
    assert f"--out-dir {out} already holds a run" in err and "--overwrite" in err and "Traceback" not in err
    assert steps(out) == [0, 1, 2, 3, 4]  # untouched
    assert main(argv(out, corpus, "--resume", "--overwrite")) == 1
    assert "choose one" in capsys.readouterr().err
    (out / "notes.txt").write_text("mine")
    assert main(argv(out, corpus, "--overwrite", steps=1)) == 0
    assert steps(out) == [0, 1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000001"]  # step 2 and 4 are gone
    assert (out / "notes.txt").read_text() == "mine"  # only what archc writes is deleted


def test_a_locked_out_dir_is_refused(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    with run_dir.lock(out):  # as if another `archc train` were training into it
        assert main(argv(out, corpus)) == 1
        err = capsys.readouterr().err
        assert f"--out-dir {out} is in use by another archc run (pid {os.getpid()}" in err
    assert main(argv(out, corpus, steps=1)) == 0  # released


def test_changed_options_on_resume_are_refused_and_steps_may_grow(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(argv(out, corpus)) == 0
    before = (out / "config.json").read_text()
    capsys.readouterr()
    assert main(argv(out, corpus, "--resume", "--lr", "1.0", steps=6)) == 1
    err = capsys.readouterr().err
    assert "--resume: --lr 1.0 (the run has 0.003)" in err and "Traceback" not in err
    assert (out / "config.json").read_text() == before  # nothing written
    assert main(argv(out, corpus, "--resume", steps=6)) == 0
    assert steps(out) == list(range(7))
    assert json.loads((out / "config.json").read_text())["config"]["steps"] == 6


# ------------------------------------------------------------------------------------ metrics.jsonl


def test_metrics_log_rewrites_atomically_and_drops_only_a_torn_last_line(tmp_path, capsys):
    log = run_dir.MetricsLog(tmp_path / "metrics.jsonl")
    log.fresh()
    for step in range(5):
        log.append({"step": step, "loss": 1.0})
    with open(log.path, "a") as f:
        f.write('{"step": 5, "lo')  # a kill in the middle of an append
    log.resume(3)
    assert [r["step"] for r in log.records()] == [0, 1, 2, 3]
    assert "dropped a torn last line" in capsys.readouterr().err
    assert log.path.read_text().endswith("}\n")
    with open(log.path, "a") as f:
        f.write('{"step": 4, "loss": 2.0}')  # whole, only its newline missing: kept
    log.resume(4)
    assert [r["step"] for r in log.records()] == [0, 1, 2, 3, 4] and "torn" not in capsys.readouterr().err
    assert not list(tmp_path.glob(".metrics.jsonl.tmp-*"))
    log.path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(TrainError, match=r"metrics.jsonl:2: not a metrics record"):
        log.resume(2)


def test_resume_after_a_torn_metrics_line(tmp_path, corpus, capsys):
    cfg = config(tmp_path, corpus)
    train(SPEC, cfg, TINY)
    full = losses(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 4.')
    train(SPEC, config(tmp_path, corpus, steps=6), TINY, resume=True)
    assert "dropped a torn last line" in capsys.readouterr().err
    assert steps(tmp_path / "run") == list(range(7)) and losses(tmp_path / "run")[:5] == full


# ------------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("damage", ["no meta.json", "truncated weights", "changed byte"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_good_one(tmp_path, corpus, capsys, damage):
    cfg = config(tmp_path, corpus, "straight")
    train(SPEC, cfg, TINY)
    cut = config(tmp_path, corpus, "cut")
    train(SPEC, cut, TINY)
    newest = tmp_path / "cut" / "checkpoints" / "step_00000004"
    weights = newest / "model.safetensors"
    if damage == "no meta.json":
        (newest / "meta.json").unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0x01
        weights.write_bytes(bytes(data))
    capsys.readouterr()
    train(SPEC, cut, TINY, resume=True)  # continues from step 2 and saves step 4 again
    err = capsys.readouterr().err
    assert f"skipped checkpoint {newest}" in err and "step_00000002" in err
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight")
    assert weights.read_bytes() == (tmp_path / "straight" / "checkpoints" / "step_00000004" /
                                    "model.safetensors").read_bytes()


def test_nan_weights_are_refused_on_load_naming_the_file(tmp_path):
    import archc

    model = archc.compile(SPECS / "llama.arch", TINY).build()
    name = next(n for n, p in model.named_parameters() if p.ndim == 2 and n.startswith("layers.0."))
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = float("nan")
    path = save_checkpoint(tmp_path, 1, model)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: `{name}` holds NaN or infinite"):
        load_checkpoint(tmp_path, archc.compile(SPECS / "llama.arch", TINY).build())
    assert str(path) in str(pytest.raises(CheckpointError, load_checkpoint, path, model).value)


# ------------------------------------------------------------------------------------ DCP


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling it creates the marker file


@pytest.mark.slow
def test_a_replaced_dcp_metadata_pickle_is_refused_before_it_is_unpickled(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert main(argv(out, corpus, "--nproc", "1", steps=2)) == 0
    dcp_dir = out / "dcp" / "step_00000002"
    marker = tmp_path / "PWNED"
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))))
    capsys.readouterr()
    assert main(argv(out, corpus, "--nproc", "1", "--resume")) == 1
    err = capsys.readouterr().err
    assert f"refusing to load DCP checkpoint {dcp_dir}: damaged: .metadata has " in err  # its size tells first
    assert "unpickles .metadata" in err and "Traceback" not in err
    size = json.loads((dcp_dir / "trainer.json").read_text())["files"][".metadata"]["bytes"]
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_Payload(str(marker))).ljust(size, b"\0"))  # same size
    assert main(argv(out, corpus, "--nproc", "1", "--resume")) == 1
    err = capsys.readouterr().err
    assert f"{dcp_dir}: changed: .metadata differs from the file the save wrote (sha256 mismatch)" in err
    assert not marker.exists()
    (dcp_dir / "trainer.json").unlink()  # no digest record: never loaded either
    assert main(argv(out, corpus, "--nproc", "1", "--resume")) == 1
    assert "no finished DCP checkpoint" in capsys.readouterr().err and not marker.exists()


# ------------------------------------------------------------------------------------ SIGKILL loops


def _start(out, corpus, *extra, steps):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = argv(out, corpus, *extra, steps=steps)
    args[args.index("--checkpoint-every") + 1] = "1"
    return subprocess.Popen([sys.executable, "-m", "archc", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_sigkill_during_saves_and_resumes_loses_no_step(tmp_path, corpus):
    n = 30
    straight = tmp_path / "straight"
    assert _start(straight, corpus, steps=n).wait(timeout=600) == 0
    out, rng = tmp_path / "killed", random.Random(0)
    metrics = out / "metrics.jsonl"

    def lines():
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    kills = 0
    # three kills while training and saving (a checkpoint every step), two while a resume starts up
    for phase in ["train", "train", "resume", "train", "resume"]:
        has_checkpoint = any((out / "checkpoints").glob("step_*"))
        proc = _start(out, corpus, "--resume" if has_checkpoint else "--overwrite", steps=n)
        if phase == "train":
            reached = lines() + 3
            ready = _wait_for(lambda reached=reached: lines() >= reached, proc)
            time.sleep(rng.uniform(0, 0.3))
        else:
            ready = _wait_for(lambda: (out / run_dir.LOCK).exists() and (out / run_dir.LOCK).stat().st_size, proc)
            time.sleep(rng.uniform(0, 1.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        assert ready or proc.returncode == 0, proc.stderr.read()[-2000:]
        if metrics.exists():  # whole lines only, steps in order, no step twice
            got = steps(out)
            assert got == list(range(len(got)))
    assert kills >= 3
    proc = _start(out, corpus, "--resume" if any((out / "checkpoints").glob("step_*")) else "--overwrite", steps=n)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()[-2000:]
    assert steps(out) == list(range(n + 1))
    assert losses(out) == losses(straight)  # bit for bit
    final = f"checkpoints/step_{n:08d}/model.safetensors"
    assert (out / final).read_bytes() == (straight / final).read_bytes()
    assert not list((out / "checkpoints").glob(".step_*"))  # crashed saves were swept
