"""`archc train --init-from DIR`: training starts from a Hugging Face checkpoint's weights, in every mode.

The check is the first step's loss, which the trainer computes before its first update: on batch 0 (a pure
function of the seed) it must equal the loss transformers computes for the same tokens, and differ from a
run that starts from archc's own initialisation. The validation loss logged at step 0 is checked the same way.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SPECS

from archc.cli import main
from archc.training import data as data_mod

SPEC = str(SPECS / "llama.arch")
RUN = ["--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--sample-tokens", "0", "--no-progress"]


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    """A random transformers Llama with the byte tokenizer's 256 ids, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    from hf_checkpoints import COMMON, ROPE, randomise

    torch.manual_seed(11)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                      rope_parameters=ROPE, **{**COMMON, "vocab_size": 256})
    hf = transformers.LlamaForCausalLM(config).eval()
    randomise(hf)
    with torch.no_grad():
        hf.lm_head.weight.mul_(30)  # confident logits: a loss far from ln(256), where any random model starts
    directory = tmp_path_factory.mktemp("hf_llama")
    hf.save_pretrained(directory)
    return directory, hf


def _hf_losses(hf) -> tuple[float, float]:
    """transformers' loss on training batch 0 and on the first validation window (the run's defaults: pydoc,
    bytes, seed 0)."""
    dataset = data_mod.make_dataset("pydoc", "byte", seed=0)
    batch = data_mod.Batches(dataset.train, 2, 16, seed=0).get(0)
    window = next(data_mod.eval_windows(dataset.val, 2, 16, max_windows=1))
    with torch.no_grad():
        return hf(batch, labels=batch).loss.item(), hf(window, labels=window).loss.item()


def _defines(out_dir) -> list[str]:
    """-D flags for the spec parameters a run in `out_dir` was compiled with."""
    params = json.loads((out_dir / "config.json").read_text())["params"]
    return [a for k, v in params.items() for a in ("-D", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]


def _metrics(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())}


def test_init_from_starts_at_the_hf_models_loss(tmp_path, capsys, hf_llama):
    directory, hf = hf_llama
    train_loss, val_loss = _hf_losses(hf)
    out = tmp_path / "init"
    assert main(["train", SPEC, "--init-from", str(directory), *RUN, "--steps", "1", "--out-dir", str(out)]) == 0
    rows = _metrics(out)
    assert abs(train_loss - 5.545) > 1 and abs(val_loss - 5.545) > 1
    assert rows[1]["loss"] == pytest.approx(train_loss, rel=1e-5)
    assert rows[0]["val_loss"] == pytest.approx(val_loss, rel=1e-5)
    saved = json.loads((out / "config.json").read_text())
    assert saved["params"]["d_model"] == 64 and saved["params"]["n_layers"] == 2  # from the HF config.json
    assert saved["config"]["init_from"] == str(directory)
    # the same spec parameters from archc's own initialisation start elsewhere
    plain = tmp_path / "plain"
    assert main(["train", SPEC, *_defines(out), *RUN, "--steps", "1", "--out-dir", str(plain)]) == 0
    assert abs(_metrics(plain)[1]["loss"] - train_loss) > 1
    capsys.readouterr()


def test_init_from_refuses_parameters_the_checkpoint_does_not_have(tmp_path, capsys, hf_llama):
    directory, _hf = hf_llama
    out = tmp_path / "r"
    code = main(["train", SPEC, "--init-from", str(directory), "-D", "d_model=32", *RUN, "--steps", "1",
                 "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "the checkpoint is not this model (d_model: config.json gives 64, the model has 32)" in err
    assert not (out / "metrics.jsonl").exists()


def test_init_from_resume_keeps_its_own_weights(tmp_path, capsys, hf_llama):
    """A resumed run takes its weights from its checkpoint, not from --init-from again; its loss continues."""
    directory, _hf = hf_llama
    out = tmp_path / "r"
    argv = ["train", SPEC, "--init-from", str(directory), *RUN, "--checkpoint-every", "1", "--out-dir", str(out)]
    assert main([*argv, "--steps", "3"]) == 0
    whole = _metrics(out)
    (out / "checkpoints" / "step_00000003").rename(out / "checkpoints" / ".gone")  # as if killed after step 2
    assert main([*argv, "--steps", "3", "--resume"]) == 0
    assert _metrics(out)[3]["loss"] == whole[3]["loss"]
    # the same parameters without --init-from: refused like any changed option that shapes the run
    code = main([*argv[:2], *_defines(out), *argv[4:], "--steps", "4", "--resume"])
    err = capsys.readouterr().err
    assert code == 1 and f"--init-from None (the run has '{directory}')" in err


@pytest.mark.slow
def test_init_from_under_fsdp2(tmp_path, capsys, hf_llama):
    """Two FSDP2 processes load the weights before sharding: the mean of their losses is the HF model's."""
    directory, hf = hf_llama
    train_loss, _val = _hf_losses(hf)
    out = tmp_path / "fsdp"
    assert main(["train", SPEC, "--init-from", str(directory), *RUN, "--steps", "1", "--nproc", "2",
                 "--out-dir", str(out)]) == 0
    assert _metrics(out)[1]["loss"] == pytest.approx(train_loss, rel=1e-5)
    capsys.readouterr()
