"""The command line against careless and hostile input (issue 17, items 5-7): flags that used to do something
else silently, user mistakes that used to exit 3 ("internal error"), and resource bombs.

Every case runs `archc` through `archc.cli.main` and checks the exit code (1: a problem with an input or an
option, 2: a bad flag value caught by argparse; never 3, which is kept for bugs), that stderr holds no
traceback and no "internal error", that the message names the flag or file and what was expected, and that
nothing ran: no run directory got metrics or checkpoints, nothing was generated on stdout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SPECS

from archc.cli import main
from archc.compiler import resources
from archc.training import data as data_mod
from archc.training.config import TrainConfig

SPEC = str(SPECS / "llama.arch")
TINY = ["-D", "n_layers=1", "-D", "d_model=32", "-D", "d_ff=64"]
SMALL_RUN = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress"]


def defines(flags: list[str]) -> list[str]:
    """TINY's -D flags, less those `flags` set themselves (a name given twice is an error of its own)."""
    own = {flags[i + 1].partition("=")[0] for i, f in enumerate(flags) if f == "-D"}
    return [arg for d in TINY[1::2] if d.partition("=")[0] not in own for arg in ("-D", d)]


def run(capsys, argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse refuses a bad flag value with exit 2
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, out, err, expected_code, message):
    assert code == expected_code, (code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert re.search(message, err), err


def assert_nothing_trained(out_dir: Path):
    assert not (out_dir / "metrics.jsonl").exists() and not (out_dir / "checkpoints").exists()
    assert not (out_dir / "diloco").exists() and not (out_dir / "dcp").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished two-step run (its directory is copied by the cases that damage it)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", SPEC, *TINY, *SMALL_RUN, "--steps", "2", "--out-dir", str(out)]) == 0
    return out


def copy_run(trained: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(trained, target)
    (target / ".archc.lock").unlink(missing_ok=True)
    return target


def newest(run_dir: Path) -> Path:
    return sorted((run_dir / "checkpoints").glob("step_*"))[-1]


# ------------------------------------------------------------------ item 5: flags that did something else

# (case, extra train flags, exit code, what stderr must say)
TRAIN_FLAGS = [
    ("negative clip", ["--clip", "-1"], 1, r"--clip -1\.0: expected a finite number at least 0"),
    ("float16", ["--dtype", "float16"], 1, r"--dtype 'float16': expected one of float32, bfloat16"),
    ("int8", ["--dtype", "int8"], 1, r"--dtype 'int8': expected one of float32, bfloat16"),
    ("nproc 0", ["--nproc", "0"], 2, r"argument --nproc: expected an integer of at least 1, got '0'"),
    ("empty diloco", ["--diloco", ""], 1, r"--diloco '': expected KEY=VALUE"),
    ("nproc with diloco", ["--nproc", "2", "--diloco", "replicas=2,inner_steps=2"], 1,
     r"--nproc 2 with --diloco: DiLoCo runs one process per replica \(replicas=2\); drop --nproc"),
    ("lighthouse alone", ["--lighthouse", "http://127.0.0.1:1"], 1, r"--lighthouse and --replica-id go with --fault-tolerant"),
    ("replica-id alone", ["--replica-id", "0"], 1, r"--lighthouse and --replica-id go with --fault-tolerant"),
    ("nesterov maybe", ["--diloco", "replicas=2,inner_steps=2,nesterov=maybe"], 1, r"--diloco nesterov=maybe: expected true or false"),
    ("negative streaming", ["--diloco", "replicas=2,inner_steps=2,streaming=-3"], 1,
     r"--diloco streaming=-3: expected a number of fragments, at least 0"),
    ("negative outer lr", ["--diloco", "replicas=2,inner_steps=2,outer_lr=-1"], 1,
     r"--diloco outer_lr=-1\.0: expected a finite number above 0"),
    ("fp4 block 0", ["--diloco", "replicas=2,inner_steps=2,block=0"], 1, r"--diloco block=0: expected values per fp4 scale"),
    ("init-map alone", ["--init-map", "llama"], 1, r"--init-map goes with --init-from"),
    # item 6: user mistakes that exited 3
    ("seq-len 1", ["--seq-len", "1"], 1, r"--seq-len 1: expected an integer of at least 2"),
    ("lr nan", ["--lr", "nan"], 1, r"--lr nan: expected a finite number above 0"),
    ("device tpu", ["--device", "tpu"], 1, r"--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    ("seed 10**23", ["--seed", str(10**23)], 1, r"--seed 100000000000000000000000: expected an integer in \[0, 2\*\*63\)"),
    # item 7: resource bombs
    ("bpe 10**8", ["--tokenizer", "bpe:100000000"], 1, r"--tokenizer bpe:100000000: at most bpe:1048576"),
    ("d_model 10**12", ["-D", "d_model=1000000000000"], 1,
     r"training Llama \([0-9,]{30,} parameters.*needs at least [0-9.,]+ EiB.* free .*--no-memory-check"),
    ("activations", ["--batch-size", "100000", "--seq-len", "100000"], 1,
     r"needs at least [0-9.,]+ TiB \(weights .* activations [0-9.,]+ TiB\).*lower --batch-size or --seq-len"),
]


@pytest.mark.parametrize("case,flags,code,message", TRAIN_FLAGS, ids=[c[0] for c in TRAIN_FLAGS])
def test_train_flags_are_refused(capsys, tmp_path, case, flags, code, message):
    out_dir = tmp_path / "run"
    args = ["train", SPEC, *defines(flags), *SMALL_RUN, "--steps", "2", "--out-dir", out_dir, *flags]
    assert_refused(*run(capsys, args), code, message)
    assert_nothing_trained(out_dir)


def test_cuda_without_cuda_is_refused(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run(capsys, ["train", SPEC, *TINY, *SMALL_RUN, "--out-dir", tmp_path / "r", "--device", "cuda"])
    assert_refused(code, out, err, 1, r"--device cuda: CUDA is not available here .*use --device cpu or auto")
    assert_nothing_trained(tmp_path / "r")


# (case, argv, exit code, message): commands that compile only; nothing may be generated on stdout
COMPILE_FLAGS = [
    ("-D twice", ["check", SPEC, "-D", "d_model=64", "-D", "d_model=32"], 1,
     r"-D d_model is given twice \(64, then 32\); give it once"),
    ("--kernel twice", ["compile", SPEC, "--kernel", "attention=math", "--kernel", "attention=sdpa"], 1,
     r"--kernel attention is given twice \('math', then 'sdpa'\)"),
    ("--kernel matching nothing", ["compile", SPEC, "--kernel", "nosuch*=math"], 1,
     r"--kernel nosuch\*=math: the pattern matches no layer of this model\n.*layers\.0\.attn \(attention\)"),
    ("mixer kernel on attention-only model", ["compile", SPEC, "--kernel", "kda=chunked"], 1,
     r"--kernel kda=chunked: the pattern matches no layer"),
    ("summary depth -1", ["summary", SPEC, "--depth", "-1"], 2, r"argument --depth: expected an integer of at least 0"),
]


@pytest.mark.parametrize("case,argv,code,message", COMPILE_FLAGS, ids=[c[0] for c in COMPILE_FLAGS])
def test_compile_flags_are_refused(capsys, case, argv, code, message):
    code_, out, err = run(capsys, argv)
    assert_refused(code_, out, err, code, message)
    assert out == ""


def test_kernel_pattern_that_matches_still_works(capsys):
    code, out, _err = run(capsys, ["compile", str(SPECS / "kimi_linear.arch"), "--kernel", "layers.3*=math"])
    assert code == 0 and "class KimiLinear" in out


EVAL_FLAGS = [
    ("batches 0", ["--batches", "0"], r"argument --batches: expected an integer of at least 1, got '0'"),
    ("top-k 0", ["--prompt", "a", "--top-k", "0"], r"argument --top-k: expected an integer of at least 1"),
    ("top-p 5", ["--prompt", "a", "--top-p", "5"], r"argument --top-p: expected a number above 0, at most 1, got '5'"),
    ("temperature -1", ["--prompt", "a", "--temperature", "-1"], r"argument --temperature: expected a number at least 0 \(0: greedy\)"),
    ("max-new-tokens -3", ["--prompt", "a", "--max-new-tokens", "-3"], r"argument --max-new-tokens: expected an integer of at least 0"),
    ("seed 10**23", ["--seed", str(10**23)], r"argument --seed: expected an integer in \[0, 9223372036854775808\)"),
]


@pytest.mark.parametrize("case,flags,message", EVAL_FLAGS, ids=[c[0] for c in EVAL_FLAGS])
def test_eval_flags_are_refused(capsys, trained, case, flags, message):
    code, out, err = run(capsys, ["eval", SPEC, *TINY, "--checkpoint", trained, *flags])
    assert_refused(code, out, err, 2, message)
    assert out == ""


def test_negative_layer_count_is_a_located_error(capsys):
    code, out, err = run(capsys, ["check", SPEC, "-D", "n_layers=-2"])
    assert_refused(code, out, err, 1, r"repeat|n_layers")


# ------------------------------------------------------------------ item 6: user mistakes that exited 3


def _truncate_model(run_dir: Path) -> str:
    file = newest(run_dir) / "model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    return r"model\.safetensors has 100 bytes, the save wrote \d+"


def _meta_step_string(run_dir: Path) -> str:
    file = newest(run_dir) / "meta.json"
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "step": "two"}))
    return r"meta\.json: `step` is 'two'; archc writes a JSON integer there"


def _meta_params_list(run_dir: Path) -> str:
    file = newest(run_dir) / "meta.json"
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "params": [1, 2]}))
    return r"meta\.json: `params` is \[1, 2\]; archc writes a JSON object there"


def _meta_config_seq_len(run_dir: Path) -> str:
    file = newest(run_dir) / "meta.json"
    meta = json.loads(file.read_text())
    file.write_text(json.dumps({**meta, "config": {**meta["config"], "seq_len": "16"}}))
    return r"config\.seq_len = '16'; expected an integer of at least 2"


def _optimizer_json_type(run_dir: Path) -> str:
    file = newest(run_dir) / "optimizer.json"
    file.write_text(json.dumps({"class": "AdamW", "state_dict": 5}))
    return r"optimizer\.json has \d+ bytes, the save wrote \d+"


def _symlinked_metrics(run_dir: Path) -> str:
    victim = run_dir.parent / "victim.jsonl"
    victim.write_text('{"step": 0}\n')
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "metrics.jsonl").symlink_to(victim)
    return r"metrics\.jsonl is a symbolic link \(to .*victim\.jsonl\); archc does not follow links"


# (case, damage(run_dir) -> message, command): "resume" continues the run to step 3, "eval" evaluates it
DAMAGED = [
    ("truncated model.safetensors, resume", _truncate_model, "resume"),
    ("truncated model.safetensors, eval", _truncate_model, "eval-explicit"),
    ("meta.json step a string, resume", _meta_step_string, "resume"),
    ("meta.json step a string, eval", _meta_step_string, "eval"),
    ("meta.json params a list, eval", _meta_params_list, "eval"),
    ("meta.json config.seq_len a string, eval", _meta_config_seq_len, "eval"),
    ("optimizer.json of the wrong type, resume", _optimizer_json_type, "resume"),
    ("symlinked metrics.jsonl, resume", _symlinked_metrics, "resume"),
]


@pytest.mark.parametrize("case,damage,command", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_damaged_run_directories_are_named(capsys, trained, tmp_path, case, damage, command):
    run_dir = copy_run(trained, tmp_path)
    message = damage(run_dir)
    before = {p: p.read_bytes() for p in run_dir.parent.rglob("*") if p.is_file() and not p.is_symlink()}
    if command == "resume":
        argv = ["train", SPEC, *TINY, *SMALL_RUN, "--steps", "3", "--resume", "--out-dir", run_dir]
    else:
        where = newest(run_dir) if command == "eval-explicit" else run_dir
        argv = ["eval", SPEC, *TINY, "--checkpoint", where, "--batches", "1"]
    assert_refused(*run(capsys, argv), 1, message)
    after = {p: p.read_bytes() for p in run_dir.parent.rglob("*") if p.is_file() and not p.is_symlink()}
    assert {p: b for p, b in after.items() if p.name != ".archc.lock"} == \
        {p: b for p, b in before.items() if p.name != ".archc.lock"}  # nothing written, the link's target included


def test_resume_with_fewer_steps_than_the_checkpoint(capsys, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path)
    argv = ["train", SPEC, *TINY, *SMALL_RUN, "--resume", "--out-dir", run_dir]
    assert_refused(*run(capsys, [*argv, "--steps", "1"]), 1,
                   r"--resume: the newest checkpoint in .* is at step 2, beyond --steps 1; pass --steps above 2")
    # --steps equal to the checkpoint's: a run killed while finishing; it reports what it logged and trains nothing
    code, out, _err = run(capsys, [*argv, "--steps", "2"])
    assert code == 0 and out.startswith("trained 2 steps")
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


# (case, file maker(tmp_path) -> --data path, exit code, message)
def _npy_negative(tmp_path):
    np.save(tmp_path / "neg.npy", np.array([5, -1, 7] * 100, dtype=np.int64))
    return tmp_path / "neg.npy", r"neg\.npy' has token id -1; token ids are 0 or more"


def _one_byte(tmp_path):
    (tmp_path / "one.txt").write_text("a")
    return tmp_path / "one.txt", r"one\.txt': the validation split has 0 token\(s\); evaluation needs at least 2"


def _fifo(tmp_path):
    os.mkfifo(tmp_path / "fifo.txt")
    return tmp_path / "fifo.txt", r"fifo\.txt' is not a regular file or a directory"


DATA = [("negative token ids", _npy_negative), ("one-byte corpus", _one_byte), ("FIFO", _fifo)]


@pytest.mark.parametrize("case,make", DATA, ids=[c[0] for c in DATA])
def test_bad_data_files_are_named(capsys, tmp_path, case, make):
    data, message = make(tmp_path)
    out_dir = tmp_path / "run"
    argv = ["train", SPEC, *TINY, *SMALL_RUN, "--steps", "1", "--data", data, "--out-dir", out_dir]
    if case == "FIFO":  # a regression would block on open(): run it where it can be killed
        proc = subprocess.run([sys.executable, "-m", "archc", *map(str, argv)], capture_output=True, text=True,
                              timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert_refused(proc.returncode, proc.stdout, proc.stderr, 1, message)
    else:
        assert_refused(*run(capsys, argv), 1, message)
    assert_nothing_trained(out_dir)


def test_eval_on_a_corpus_too_short_to_score(capsys, trained, tmp_path):
    (tmp_path / "one.txt").write_text("a")
    code, out, err = run(capsys, ["eval", SPEC, *TINY, "--checkpoint", trained, "--data", tmp_path / "one.txt"])
    assert_refused(code, out, err, 1, r"one\.txt': the validation split has 0 token\(s\)")


def test_unreachable_lighthouse_times_out_with_a_message(tmp_path):
    pytest.importorskip("torchft")
    import socket

    from archc.training.config import TrainError
    from archc.training.distributed.ft import FTConfig
    from archc.training.train import train

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = TrainConfig(batch_size=2, seq_len=16, steps=1, eval_batches=1, sample_tokens=0, progress=False,
                      out_dir=str(tmp_path / "ft"))
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(TrainError, match=rf"--lighthouse {url}: no torchft lighthouse answered within 2 s"):
        train(SPEC, cfg, {"n_layers": 1, "d_model": 32, "d_ff": 64},
              fault_tolerant=FTConfig(lighthouse=url, replica_id=0, connect_timeout=2.0))
    assert time.monotonic() - start < 60


HF_CONFIGS = [
    ("zero heads", {"num_attention_heads": 0}, r"config\.json num_attention_heads=0: expected a positive integer"),
    ("hidden_size a string", {"hidden_size": "64"},
     r"config\.json hidden_size='64': expected an integer \(it sets the spec's int parameter d_model\)"),
    ("eps a string", {"rms_norm_eps": "x"}, r"config\.json rms_norm_eps='x': expected a number"),
    ("81 TiB", {"hidden_size": 2**16, "intermediate_size": 2**20, "num_hidden_layers": 100, "num_attention_heads": 2**12,
                "num_key_value_heads": 2**12},
     r"building Llama needs at least 81\.3 TiB \(22,333,853,597,696 parameters x 4 bytes\).*--no-memory-check"),
]


@pytest.mark.parametrize("case,edit,message", HF_CONFIGS, ids=[c[0] for c in HF_CONFIGS])
def test_hf_configs_are_refused(capsys, tmp_path, hf_checkpoints, case, edit, message):
    from hf_checkpoints import corrupt

    src, _hf = hf_checkpoints("llama")
    bad = corrupt(src, tmp_path / "bad", config_edit=lambda c: c.update(edit))
    target = tmp_path / "out.safetensors"
    code, out, err = run(capsys, ["convert", SPEC, "--from-hf", bad, "-o", target])
    assert_refused(code, out, err, 1, message)
    assert not target.exists()


# ------------------------------------------------------------------ item 7: resource bombs (outside the lowering)

SWEEPS = [
    ("range of 10**10", ["-m", "n_layers=range(1,10000000001)"], r"-m: the grid has 10,000,000,000 points"),
    ("product of two axes", ["-m", "n_layers=range(1,101)", "-m", "n_heads=range(1,101)"],
     r"-m: the grid has 10,000 points \(100 \(n_layers\) x 100 \(n_heads\)\); a sweep runs at most 1,000"),
    ("empty range", ["-m", "n_layers=range(10,1)"], r"-m 'n_layers=range\(10,1\)': the range is empty"),
    ("swept and set", ["-m", "d_model=32,64", "-D", "d_model=32"], r"-m d_model: also set with -D d_model=32"),
]


@pytest.mark.parametrize("case,flags,message", SWEEPS, ids=[c[0] for c in SWEEPS])
def test_sweep_grids_are_bounded(capsys, tmp_path, case, flags, message):
    start = time.monotonic()
    argv = ["sweep", SPEC, "-D", "n_layers=1" if "n_layers" not in str(flags) else "d_ff=64", *SMALL_RUN,
            "--steps", "1", "--out-dir", tmp_path / "sw", *flags]
    assert_refused(*run(capsys, argv), 1, message)
    assert time.monotonic() - start < 30  # counted, never listed
    assert not (tmp_path / "sw").exists()


def test_swept_strings_stay_inside_the_out_dir(capsys, tmp_path):
    spec = tmp_path / "tagged.arch"
    spec.write_text(Path(SPEC).read_text().replace("param vocab: int = 256", 'param vocab: int = 256\nparam tag: str = "a"'))
    out_dir = tmp_path / "deep" / "sweep"
    code, out, err = run(capsys, ["sweep", spec, *TINY, *SMALL_RUN, "--steps", "1", "--out-dir", out_dir,
                                  "-m", "tag=../../escape,x/y"])
    assert code == 0, err
    made = sorted(p.name for p in out_dir.iterdir())
    assert len(made) == 2 and all("/" not in name and ".." != name for name in made)
    assert made[0].startswith("tag=.._.._escape-") and made[1].startswith("tag=x_y-")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deep", "tagged.arch"]  # nothing written beside it
    assert all((out_dir / name / "metrics.jsonl").is_file() for name in made)


def test_memory_estimate_parts_and_override(capsys, tmp_path, monkeypatch):
    import archc
    from archc.training.memory import training_bytes

    compiled = archc.compile(SPEC, {"n_layers": 1, "d_model": 32, "d_ff": 64})
    cfg = TrainConfig(batch_size=2, seq_len=16)
    parts = training_bytes(compiled, cfg, rows=2)
    n = compiled.num_params()
    assert parts["weights"] == parts["gradients"] == 4 * n and parts["adamw state"] == 8 * n
    assert training_bytes(compiled, cfg, rows=4)["activations"] == pytest.approx(2 * parts["activations"], rel=1e-3)
    assert training_bytes(compiled, cfg, rows=2, shards=2)["weights"] == 2 * n
    # pretend this machine has 100 KB free: the tiny model (about 100K parameters) is refused, unless overridden
    monkeypatch.setattr(resources, "available_bytes", lambda device=None: (100_000, "test"))
    argv = ["train", SPEC, *TINY, *SMALL_RUN, "--steps", "1", "--out-dir", tmp_path / "r"]
    assert_refused(*run(capsys, argv), 1, r"needs at least .* but this machine has 97\.7 KiB free \(test\)")
    assert_nothing_trained(tmp_path / "r")
    code, out, err = run(capsys, [*argv, "--no-memory-check"])
    assert code == 0 and out.startswith("trained 1 steps"), err


def test_use_of_a_foreign_file_does_not_quote_it(capsys, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("password=hunter2\n")
    spec = tmp_path / "m.arch"
    spec.write_text(f'use "{secret}"\n' + Path(SPEC).read_text())
    code, out, err = run(capsys, ["check", spec])
    assert code == 1 and "hunter2" not in err, err


def test_bpe_bound_holds_before_the_tokenizers_library():
    with pytest.raises(data_mod.DataError, match=r"at most bpe:1048576"):
        data_mod.make_tokenizer("bpe:1048577", ["text"])
    assert data_mod.make_tokenizer("bpe:300", ["some text to train on"]).vocab_size <= 300


def test_train_api_refuses_bad_process_counts(tmp_path):
    from archc.training.config import TrainError
    from archc.training.distributed.diloco import parse_diloco
    from archc.training.train import train

    cfg = TrainConfig(out_dir=str(tmp_path / "r"), steps=1)
    with pytest.raises(TrainError, match=r"--nproc 0: expected a number of processes, at least 1"):
        train(SPEC, cfg, nproc=0)
    with pytest.raises(TrainError, match=r"--nproc 3 with --diloco: DiLoCo runs one process per replica"):
        train(SPEC, cfg, nproc=3, diloco=parse_diloco("replicas=2,inner_steps=4"))
    assert not (tmp_path / "r").exists()
