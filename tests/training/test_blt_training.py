"""Training byte models: bits per byte, the BLT's two stages (entropy model, then the BLT with it frozen),
--entropy-checkpoint, resuming each stage, and patch-length metrics."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import SPECS

import archc
from archc.compiler import analysis
from archc.training.checkpoint import latest_checkpoint, load_checkpoint
from archc.training.data import BPETokenizer, ByteTokenizer
from archc.training.stages import train_flops
from archc.training.train import TrainConfig, TrainError, train


def config(tmp_path, corpus, name, **kw):
    base = dict(data=corpus, batch_size=2, seq_len=32, steps=2, eval_every=2, eval_batches=2, checkpoint_every=1,
                sample_tokens=0, progress=False, out_dir=str(tmp_path / name), lr=3e-3)
    return TrainConfig(**{**base, **kw})


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def entropy_weights(run_dir, spec="blt_entropy.arch"):
    model = archc.compile(SPECS / spec).build()
    load_checkpoint(run_dir, model, restore_rng=False)
    return {k: v for k, v in model.state_dict().items() if k.startswith("entropy_model.")}


def test_byte_llama_reports_bits_per_byte(tmp_path, corpus):
    result = train(SPECS / "byte_llama.arch", config(tmp_path, corpus, "llama"), {"n_layers": 1, "d_model": 32})
    last = records(result.out_dir)[-1]
    assert last["val_bits_per_byte"] == pytest.approx(last["val_loss"] / math.log(2))  # one byte per token


def test_bits_per_byte_counts_the_bytes_of_bpe_tokens():
    text = "def train(spec):\n    return spec  # ünïcode\n"
    tok = BPETokenizer.train([text * 20], 300)
    lengths = tok.byte_lengths()
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))
    assert lengths[tok.eos_id] == 0 and ByteTokenizer().byte_lengths() == [1] * 256


def test_blt_trains_its_entropy_model_first_then_itself_with_it_frozen(tmp_path, corpus):
    result = train(SPECS / "blt.arch", config(tmp_path, corpus, "blt", entropy_steps=3))
    out = result.out_dir
    first = records(out / "entropy")
    assert [r["step"] for r in first if "loss" in r] == [1, 2, 3] and "val_bits_per_byte" in first[-1]
    assert int(json.loads((latest_checkpoint(out / "entropy") / "meta.json").read_text())["step"]) == 3
    last = records(out)[-1]
    assert last["step"] == 2 and last["val_patch_length_mean"] >= 1.0
    histogram = last["val_patch_length_histogram"]
    assert histogram[0] == 0 and sum(n * i for i, n in enumerate(histogram)) == pytest.approx(
        last["val_patch_length_mean"] * sum(histogram))
    # the BLT's entropy model is stage 1's, unchanged by stage 2
    trained = entropy_weights(out / "entropy")
    blt = archc.compile(SPECS / "blt.arch").build()
    load_checkpoint(out, blt, restore_rng=False)
    for key, value in trained.items():
        torch.testing.assert_close(blt.state_dict()[key], value, rtol=0, atol=0)


def test_entropy_checkpoint_skips_stage_one_and_resume_continues_each_stage(tmp_path, corpus):
    first = train(SPECS / "blt_entropy.arch", config(tmp_path, corpus, "first", steps=1))
    # a stage 1 that stopped at step 1 of 2 resumes; stage 2 then starts
    staged = config(tmp_path, corpus, "staged", entropy_steps=2, steps=1)
    (tmp_path / "staged").mkdir()
    import shutil

    shutil.copytree(first.out_dir, tmp_path / "staged" / "entropy")
    train(SPECS / "blt.arch", staged, resume=True)
    assert [r["step"] for r in records(tmp_path / "staged" / "entropy") if "loss" in r] == [1, 2]
    assert [r["step"] for r in records(tmp_path / "staged") if "loss" in r] == [1]
    # stage 1 finished: resuming with more steps continues stage 2 only
    train(SPECS / "blt.arch", config(tmp_path, corpus, "staged", entropy_steps=2, steps=2), resume=True)
    assert [r["step"] for r in records(tmp_path / "staged" / "entropy") if "loss" in r] == [1, 2]
    assert [r["step"] for r in records(tmp_path / "staged") if "loss" in r] == [1, 2]
    # a given entropy checkpoint: no stage 1 here, its weights in the BLT
    given = train(SPECS / "blt.arch", config(tmp_path, corpus, "given", steps=1,
                                              entropy_checkpoint=str(first.out_dir)))
    assert not (given.out_dir / "entropy").exists()
    blt = archc.compile(SPECS / "blt.arch").build()
    load_checkpoint(given.out_dir, blt, restore_rng=False)
    for key, value in entropy_weights(first.out_dir).items():
        torch.testing.assert_close(blt.state_dict()[key], value, rtol=0, atol=0)


def test_a_missing_entropy_checkpoint_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(TrainError, match="--entropy-checkpoint"):
        train(SPECS / "blt.arch", config(tmp_path, corpus, "bad", entropy_checkpoint=str(tmp_path / "nowhere")))


def test_the_command_line_trains_both_byte_specs(tmp_path, corpus, capsys):
    from archc.cli import main

    common = ["--data", corpus, "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--eval-batches", "1",
              "--sample-tokens", "4", "--no-progress"]
    assert main(["train", str(SPECS / "byte_llama.arch"), *common, "--out-dir", str(tmp_path / "llama"),
                 "-D", "n_layers=1"]) == 0
    assert main(["train", str(SPECS / "blt.arch"), *common, "--out-dir", str(tmp_path / "blt")]) == 0
    out = capsys.readouterr().out
    assert out.count("trained 1 steps") == 2 and (tmp_path / "blt" / "entropy" / "checkpoints").is_dir()
    assert len((tmp_path / "blt" / "sample.txt").read_bytes()) > 0  # generated byte by byte, the model re-run
    assert main(["train", str(SPECS / "blt.arch"), *common, "--out-dir", str(tmp_path / "again"),
                 "--entropy-checkpoint", str(tmp_path / "missing")]) == 1
    assert "--entropy-checkpoint" in capsys.readouterr().err


def test_staged_training_runs_on_one_process(tmp_path, corpus):
    with pytest.raises(TrainError, match="runs on one process"):
        train(SPECS / "blt.arch", config(tmp_path, corpus, "multi"), nproc=2)


def test_the_entropy_model_takes_the_used_file_s_overrides_in_both_stages(tmp_path, corpus):
    sizes = {"blt_entropy.e_dim": 32, "blt_entropy.e_layers": 1, "blt_entropy.e_hidden": 64}
    result = train(SPECS / "blt.arch", config(tmp_path, corpus, "small", entropy_steps=1, steps=1), sizes)
    out = result.out_dir
    first = archc.compile(SPECS / "blt_entropy.arch", {"e_dim": 32, "e_layers": 1, "e_hidden": 64}).build()
    load_checkpoint(out / "entropy", first, restore_rng=False)  # stage 1 trained the small entropy model
    blt = archc.compile(SPECS / "blt.arch", sizes).build()
    load_checkpoint(out, blt, restore_rng=False)
    assert blt.entropy_model.tok_embeddings.weight.shape[1] == 32
    torch.testing.assert_close(blt.entropy_model.tok_embeddings.weight, first.entropy_model.tok_embeddings.weight,
                               rtol=0, atol=0)


def test_train_flops_counts_the_frozen_entropy_model_forward_only():
    blt = archc.compile(SPECS / "blt.arch", {"global_layers": 1, "decoder_layers": 1})
    sizes = analysis.sizes_for(blt.ir, 2, 64, {"P": 20})
    costs = {n.id: analysis.node_cost(blt.ir, n, sizes)[1] for n in blt.ir.nodes()}
    entropy_model = sum(c for i, c in costs.items() if blt.ir.node(i).scope.split(".")[0] == "entropy_model")
    assert entropy_model > 0
    assert train_flops(blt, 2, 64, {"P": 20}) == 3 * sum(costs.values()) - 2 * entropy_model
    llama = archc.compile(SPECS / "byte_llama.arch", {"n_layers": 1})
    assert train_flops(llama, 2, 64) == 3 * llama.flops(2, 64)
