"""The specs of issue "A language, not a menu" — BERT (masked LM and a classifier), ViT, T5, ALBERT,
LayerScale / ReZero and DiT blocks — compile, say what their papers say, and train.

`archc train` feeds one `Tokens[B, T]` input and reads the model's `loss`, so of these only
specs/layerscale.arch trains from the command line (on the built-in text); the others take labels,
masks, images or regression targets, and train here with a plain PyTorch loop on a fixed batch
(the loss must fall by a margin)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SPECS

import archc
from archc.cli import main


def _batch(name: str, compiled, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = compiled.params
    B, T = 4, 12
    if name in ("bert", "albert"):
        tokens = torch.randint(0, p["vocab"], (B, T), generator=g)
        labels = torch.full((B, T), -100)
        masked = torch.rand(B, T, generator=g) < 0.3
        labels[masked] = tokens[masked]
        if p.get("head") == "classify":
            labels[:, 0] = torch.randint(0, p["n_labels"], (B,), generator=g)
        batch = {"tokens": tokens, "token_types": torch.randint(0, 2, (B, T), generator=g), "labels": labels}
        if name == "bert":
            batch["mask"] = torch.ones(B, T, dtype=torch.bool)
            batch["mask"][0, -3:] = False
        return batch
    if name == "t5":
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, -4:] = False
        return {"input_ids": torch.randint(0, p["vocab"], (B, T), generator=g), "mask": mask,
                "labels": torch.randint(0, p["vocab"], (B, 7), generator=g)}
    if name == "vit":
        return {"image": torch.randn(B, p["channels"], p["image_size"], p["image_size"], generator=g),
                "labels": torch.randint(0, p["n_labels"], (B,), generator=g)}
    if name == "dit_block":
        return {"x": torch.randn(B, p["n_tokens"], p["in_dim"], generator=g),
                "t_freq": torch.randn(B, p["freq_dim"], generator=g),
                "label": torch.randint(0, p["n_classes"] + 1, (B,), generator=g),
                "target": torch.randn(B, p["n_tokens"], p["in_dim"], generator=g)}
    return {"tokens": torch.randint(0, p["vocab"], (B, T), generator=g)}


CASES = [("bert", {}), ("bert", {"head": "classify"}), ("albert", {}), ("t5", {}), ("vit", {}), ("dit_block", {}),
         ("layerscale", {}), ("layerscale", {"rezero": True})]


@pytest.mark.parametrize("name, overrides", CASES, ids=[f"{n}{'-' + '-'.join(o) if o else ''}" for n, o in CASES])
def test_spec_trains_on_a_fixed_batch(name, overrides):
    torch.manual_seed(0)
    compiled = archc.compile(SPECS / f"{name}.arch", overrides)
    model = compiled.build()
    assert sum(p.numel() for p in model.parameters()) == compiled.num_params()
    batch = _batch(name, compiled)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60 if name == "t5" else 25):  # T5 has dropout 0.1 throughout
        loss = model(**batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.7 * losses[0], losses


def test_layerscale_trains_from_the_command_line_on_built_in_text(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(SPECS / "layerscale.arch"), "--steps", "12", "--batch-size", "4", "--seq-len", "32",
                 "--eval-every", "12", "--eval-batches", "2", "--sample-tokens", "0", "--lr", "3e-3",
                 "--out-dir", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_perplexity"] < 0.5 * records[0]["val_perplexity"]


@pytest.mark.parametrize("name", ["t5", "dit_block"])
def test_specs_no_source_can_feed_are_refused_by_archc_train_by_name(name, tmp_path, capsys):
    # (BERT, ALBERT and ViT train: tests/training/test_supervised_sources.py)
    assert main(["train", str(SPECS / f"{name}.arch"), "--steps", "1", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{name}.arch: archc train feeds a next-token model" in err and "this model's inputs are" in err


def test_albert_shares_one_layer_across_its_steps():
    four = archc.compile(SPECS / "albert.arch")
    one = archc.compile(SPECS / "albert.arch", n_layers=1)
    assert four.num_params() == one.num_params()
    assert "for _ in range(4):\n            x = self.layer(x)" in four.source
    assert not any(k.startswith("layers.") for k in four.build().state_dict())


def test_t5_shares_its_embedding_between_encoder_decoder_and_head():
    compiled = archc.compile(SPECS / "t5.arch")
    names = list(compiled.build().state_dict())
    assert [n for n in names if "embedding" in n] == ["shared_embedding.weight"]
    assert "logits = F.linear(y, self.shared_embedding.weight)" in compiled.source
    # the decoder reads the labels shifted right, -100 read as the pad id
    model = compiled.build()
    seen = {}
    model.shared_embedding.register_forward_hook(lambda m, args, out: seen.update({len(seen): args[0]}))
    labels = torch.tensor([[5, 6, -100, -100]])
    model(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.bool), labels)
    assert seen[1].tolist() == [[0, 5, 6, 0]]


def test_dit_blocks_start_as_the_identity_and_predict_zeros():
    compiled = archc.compile(SPECS / "dit_block.arch")
    model = compiled.build()
    batch = _batch("dit_block", compiled)
    assert torch.equal(model(**batch)["pred"], torch.zeros_like(batch["target"]))  # adaLN-Zero
    h = torch.randn(2, 16, 64)
    c = torch.randn(2, 64)
    torch.testing.assert_close(model.blocks[0](h, c), h)  # gates start at zero


def test_vit_puts_a_cls_token_in_front_of_the_patches():
    compiled = archc.compile(SPECS / "vit.arch")
    shapes = {n.name: n.shape for n in compiled.ir.nodes()}
    assert shapes["patch_embeddings"] == ("B", 64, 4, 4)
    x = next(n for n in compiled.ir.nodes() if n.op == "concat")
    assert x.shape == ("B", 17, 64)  # 16 patches + [CLS]


def test_bert_next_token_loss_would_be_reported():
    text = (SPECS / "bert.arch").read_text().replace(
        "loss = cross_entropy(logits, labels, ignore_index=-100)", "loss = next_token_loss(logits, tokens)")
    (warning,) = archc.compile(text, name="bert.arch").warnings
    assert "bidirectional self-attention" in warning.message
