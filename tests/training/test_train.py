"""The training loop: it learns, resumes bit for bit, stops on NaN, and refuses bad input."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from conftest import SPECS

from archc.cli import main
from archc.training.checkpoint import latest_checkpoint
from archc.training.train import TrainConfig, TrainError, train

TINY = dict(n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)


def config(tmp_path, name, **kw):
    base = dict(data="pydoc", batch_size=2, seq_len=32, steps=6, eval_every=3, eval_batches=2,
                checkpoint_every=3, sample_tokens=8, progress=False, out_dir=str(tmp_path / name), lr=3e-3)
    return TrainConfig(**{**base, **kw})


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows]


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_bit_exact(tmp_path, optimizer):
    spec = str(SPECS / "llama.arch")
    straight = train(spec, config(tmp_path, "straight", optimizer=optimizer), TINY)

    def kill_after_3(record):
        if record["step"] == 3:
            raise KeyboardInterrupt  # as if the job were killed right after its step-3 checkpoint

    interrupted = config(tmp_path, "interrupted", optimizer=optimizer)
    with pytest.raises(KeyboardInterrupt):
        train(spec, interrupted, TINY, on_step=kill_after_3)
    resumed = train(spec, interrupted, TINY, resume=True)
    assert losses(tmp_path / "interrupted") == losses(tmp_path / "straight")
    assert resumed.final_loss == straight.final_loss
    a = (tmp_path / "straight" / "checkpoints" / "step_00000006" / "model.safetensors").read_bytes()
    b = (tmp_path / "interrupted" / "checkpoints" / "step_00000006" / "model.safetensors").read_bytes()
    assert a == b


def test_training_lowers_validation_perplexity_and_writes_artifacts(tmp_path):
    result = train(str(SPECS / "llama.arch"), config(tmp_path, "run", steps=30, eval_every=15), TINY)
    assert result.val_perplexity < result.initial_val_perplexity * 0.5
    for name in ("metrics.jsonl", "config.json", "loss.png", "sample.txt"):
        assert (tmp_path / "run" / name).exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(31))
    assert all(0 < r["mfu"] for r in rows[1:]) and all(r["tokens_per_second"] > 0 for r in rows[1:])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = config(tmp_path, "nan", steps=3, checkpoint_every=1)
    train(str(SPECS / "llama.arch"), cfg, TINY)
    good = (latest_checkpoint(tmp_path / "nan") / "model.safetensors").read_bytes()
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainError, match="the loss is nan"):
        train(str(SPECS / "llama.arch"), attrs.evolve(cfg, steps=6), TINY, resume=True)
    assert latest_checkpoint(tmp_path / "nan").name == "step_00000003"
    assert (latest_checkpoint(tmp_path / "nan") / "model.safetensors").read_bytes() == good


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    spec = str(SPECS / "llama.arch")
    no_loss = tmp_path / "noloss.arch"
    no_loss.write_text("param n_layers: int = 1\nmodel M(tokens: Tokens[B, T]) { x = embedding(tokens, 256, 8)\n return x }\n")
    cases = [
        (["train", str(no_loss)], "returns no `loss`"),
        (["train", spec, "--data", str(tmp_path / "missing.txt")], "missing.txt"),
        (["train", spec, "--optimizer", "adamww"], "adamw"),
        (["train", spec, "--out-dir", str(tmp_path / "nothing"), "--resume"], "no checkpoint"),
    ]
    for argv, needle in cases:
        out = [] if "--out-dir" in argv else ["--out-dir", str(tmp_path / "run")]
        code = main(argv + out + ["--steps", "1", "--no-progress", "-D", "n_layers=1"])
        err = capsys.readouterr().err
        assert code == 1, argv
        assert needle in err and "Traceback" not in err, err


def test_checkpoint_from_another_spec_is_refused(tmp_path, capsys):
    train(str(SPECS / "llama.arch"), config(tmp_path, "llama", steps=1), TINY)
    code = main(["eval", str(SPECS / "gpt2.arch"), "--checkpoint", str(tmp_path / "llama")])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err


def test_cli_train_and_eval_end_to_end(tmp_path, capsys):
    out = str(tmp_path / "cli")
    argv = ["train", str(SPECS / "gpt2.arch"), "--steps", "4", "--batch-size", "2", "--seq-len", "32",
            "--eval-every", "2", "--eval-batches", "2", "--no-progress", "--out-dir", out,
            "-D", "n_layers=1", "-D", "d_model=32", "-D", "n_heads=2", "-D", "max_len=64"]
    assert main(argv) == 0
    assert "val perplexity" in capsys.readouterr().out
    assert main(["eval", str(SPECS / "gpt2.arch"), "--checkpoint", out, "--batches", "2", "--prompt", "The ",
                 "--max-new-tokens", "5", "--pass-at-k", "--n", "2", "--k", "1,2", "--problems", "1",
                 "--depths", "1"]) == 0
    text = capsys.readouterr().out
    assert "perplexity on pydoc" in text and "pass@1" in text and "most confident mistakes" in text


def test_sweep_prints_a_table(tmp_path, capsys):
    argv = ["sweep", str(SPECS / "llama.arch"), "-m", "d_ff=32,64", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", "--no-progress", "--out-dir", str(tmp_path / "sweep"),
            "--sample-tokens", "0", "-D", "n_layers=1", "-D", "d_model=32", "-D", "n_heads=2", "-D", "n_kv_heads=1"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "d_ff=32" in text and "d_ff=64" in text and "val ppl" in text
    torch.manual_seed(0)


def test_example_research_script_runs(tmp_path):
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("sweep_tweaks", ROOT / "examples" / "sweep_tweaks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(steps=2, out=str(tmp_path))
    assert len(rows) == 3 and all(r[2] > 0 for r in rows)


def test_bfloat16_autocast_and_grad_accumulation_train(tmp_path):
    result = train(str(SPECS / "llama.arch"), config(tmp_path, "bf16", steps=2, dtype="bfloat16", grad_accum=2,
                                                     optimizer="muon", schedule="wsd"), TINY)
    assert result.final_loss == result.final_loss  # finite, not NaN
    rows = [json.loads(line) for line in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 2


def test_moe_training_logs_router_statistics(tmp_path):
    moe = dict(n_layers=2, d_model=32, n_heads=2, d_ff=64, n_experts=8, top_k=2, n_shared=1, d_expert=16,
               groups=2, top_groups=1)
    train(str(SPECS / "deepseek_moe.arch"), config(tmp_path, "moe", steps=2), moe)
    rows = [json.loads(line) for line in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    stats = rows[-1]["moe"]["layers.1.moe.router"]
    assert len(stats["load"]) == 8 and sum(stats["load"]) == 2 * 32 * 2
    assert stats["max_over_mean_load"] >= 1.0 and stats["dropped_fraction"] == 0.0
