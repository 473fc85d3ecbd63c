"""`archc train` on objectives beyond next-token: BERT's masked LM on text, ViT's classification of the digits.

The masking is checked against its definition (15% chosen, 80/10/10), the held-out metrics against a
direct computation, and both specs train from the CLI's entry point with the loss going down."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import archc
from archc.training import data as data_mod
from archc.training.classify_source import classifier_inputs
from archc.training.config import TrainError
from archc.training.masked_source import IGNORE, MaskedTextSource, _generator, mask_tokens, masked_lm_inputs
from archc.training.sources import source_kind
from archc.training.train import TrainConfig, train

SPECS = Path(__file__).resolve().parents[2] / "specs"


def test_masking_follows_bert():
    tokens = torch.randint(0, 50, (400, 250), generator=torch.Generator().manual_seed(0))
    corrupted, labels = mask_tokens(tokens, mask_id=50, vocab=50, gen=torch.Generator().manual_seed(1))
    chosen = labels != IGNORE
    assert torch.equal(labels[chosen], tokens[chosen])  # the targets are the original tokens
    assert torch.equal(corrupted[~chosen], tokens[~chosen])  # nothing else changes
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    masked = (corrupted == 50) & chosen
    kept = (corrupted == tokens) & chosen
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # kept: the 10% left alone plus the random draws that hit the original token (1 in 50 of 10%)
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 50)) < 0.01
    assert not ((corrupted == 50) & ~chosen).any()


def test_every_row_has_a_position_to_predict():
    tokens = torch.zeros(64, 2, dtype=torch.long)  # 2 positions: P(none chosen) = 0.72 per row
    _, labels = mask_tokens(tokens, 5, 5, torch.Generator().manual_seed(0))
    assert ((labels != IGNORE).sum(dim=1) >= 1).all()


def test_sources_are_chosen_by_the_spec_inputs():
    assert source_kind(archc.compile(SPECS / "llama.arch")) == "text"
    assert source_kind(archc.compile(SPECS / "bert.arch")) == "masked"
    assert source_kind(archc.compile(SPECS / "albert.arch")) == "masked"
    assert source_kind(archc.compile(SPECS / "vit.arch")) == "classify"
    assert source_kind(archc.compile(SPECS / "dit.arch")) == "diffusion"
    roles = masked_lm_inputs(archc.compile(SPECS / "bert.arch"))
    assert (roles.tokens, roles.labels, roles.segments, roles.masks) == ("tokens", "labels", ("token_types",),
                                                                         ("mask",))
    assert classifier_inputs(archc.compile(SPECS / "vit.arch")).shape == (3, 32, 32)
    with pytest.raises(TrainError, match=r"t5\.arch: archc train feeds .* input_ids: long \['B', 'S'\]"):
        source_kind(archc.compile(SPECS / "t5.arch"))  # labels of another length: a seq2seq model


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_bert_trains_as_a_masked_lm_and_its_metrics_are_the_direct_ones(tmp_path, corpus):
    cfg = TrainConfig(data=corpus, batch_size=8, seq_len=32, steps=40, eval_every=40, checkpoint_every=40,
                      eval_batches=4, progress=False, lr=2e-3, warmup=0, out_dir=str(tmp_path / "run"))
    result = train(str(SPECS / "bert.arch"), cfg, {"n_layers": 1, "d_model": 32, "n_heads": 2,
                                                    "dropout_rate": 0.0})
    rows = _rows(tmp_path / "run")
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["val_loss"] < first["val_loss"] - 0.5, (first, last)
    assert 0.0 <= last["val_masked_accuracy"] <= 1.0 and result.val_loss == last["val_loss"]
    assert "[" in (tmp_path / "run" / "sample.txt").read_text()  # guesses for the masked tokens

    # the reported metrics are the masked-token loss and accuracy computed directly
    dataset = data_mod.make_dataset(corpus, cfg.tokenizer, seed=cfg.seed)
    compiled = archc.compile(SPECS / "bert.arch", {"n_layers": 1, "d_model": 32, "n_heads": 2,
                                                   "vocab": dataset.tokenizer.vocab_size + 1})
    source = MaskedTextSource(dataset, compiled, cfg)
    model = compiled.build().eval()
    got = source.evaluate(model, torch.device("cpu"))
    total, correct, count = 0.0, 0, 0
    windows = data_mod.eval_windows(dataset.val, cfg.batch_size, cfg.seq_len, max_windows=cfg.eval_batches)
    for i, tokens in enumerate(windows):
        corrupted, labels = mask_tokens(tokens, source.mask_id, source.vocab, _generator(cfg.seed, i, "val"))
        with torch.no_grad():
            logits = model(corrupted, torch.zeros_like(tokens), torch.ones_like(tokens, dtype=torch.bool),
                           labels)["logits"]
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                if labels[b, t] != IGNORE:
                    total -= torch.log_softmax(logits[b, t], -1)[labels[b, t]].item()
                    correct += int(logits[b, t].argmax() == labels[b, t])
                    count += 1
    assert got["val_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["val_masked_accuracy"] == pytest.approx(correct / count)


def test_vit_trains_on_the_digits(tmp_path):
    cfg = TrainConfig(batch_size=64, steps=60, eval_every=60, checkpoint_every=60, progress=False, lr=3e-3,
                      warmup=0, out_dir=str(tmp_path / "run"))
    train(str(SPECS / "vit.arch"), cfg, {"image_size": 8, "channels": 1, "patch": 4, "n_layers": 1,
                                         "d_model": 32, "n_heads": 2})
    rows = _rows(tmp_path / "run")
    assert rows[0]["val_accuracy"] < 0.3 and rows[-1]["val_accuracy"] > 0.5, (rows[0], rows[-1])


def test_a_classifier_for_other_images_is_told_its_size(tmp_path):
    cfg = TrainConfig(steps=1, progress=False, out_dir=str(tmp_path / "run"))
    with pytest.raises(TrainError, match=r"1×8×8 .* 3×32×32; .* -D image_size=8 -D channels=1 -D patch=4"):
        train(str(SPECS / "vit.arch"), cfg, {})
    with pytest.raises(TrainError, match="10 classes but the spec's logits have 4; .* -D n_labels=10"):
        train(str(SPECS / "vit.arch"), cfg, {"image_size": 8, "channels": 1, "patch": 4, "n_labels": 4})
