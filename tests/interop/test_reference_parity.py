"""BERT, ViT, T5 (and ALBERT) written in the language compute what transformers' reference models compute.

Each reference is built from a tiny random config (no download), its vectors randomised so a mis-mapped
bias or norm shows, saved with `save_pretrained` (safetensors) and loaded by `load_hf` through the
built-in map of its family (archc/interop/families/bert.py, vit.py, t5.py, albert.py): spec parameters
from config.json, every archc weight filled, none left over. Logits (and losses) must agree within 1e-4
in fp32, and the export back to the family's layout must hold the reference's tensors exactly.

Two things of the references the specs leave out, on purpose and by configuration rather than as a gap
of the language: dropout (compared in eval mode) and HF's extra outputs (hidden states, attentions).
What the language cannot say yet, for these models: nothing — T5's relative position bias, its
unscaled attention, padding masks, the shared embedding and the shifted labels are all in specs/t5.arch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import archc
from archc.interop.hf import load_hf, save_hf

transformers = pytest.importorskip("transformers")

SPECS = Path(__file__).resolve().parents[2] / "specs"
ATOL = RTOL = 1e-4

def from_reference(hf_model, spec, tmp_path):
    """The reference saved with `save_pretrained`, loaded through archc's built-in map for its family
    (archc/interop/families/), and exported back: the export holds the reference's tensors, bit for bit,
    under the same names, and loads back into an equal archc model."""
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a mis-mapped vector shows
        for name, p in hf_model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in name.lower() else p.normal_(0.0, 0.1)
    hf_model.save_pretrained(tmp_path / "reference")
    compiled, model = load_hf(SPECS / spec, tmp_path / "reference")
    config = json.loads((tmp_path / "reference" / "config.json").read_text())
    save_hf(compiled, model, tmp_path / "exported", config["model_type"], base_config=config)
    original = load_file(tmp_path / "reference" / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)
    _again, model2 = load_hf(SPECS / spec, tmp_path / "exported")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    return compiled, model


def _close(ours, theirs):
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=RTOL)


def _eager(model):
    model.set_attn_implementation("eager")  # the plainest reference: explicit scores, softmax, sum
    return model.eval()


def test_bert_for_masked_lm(tmp_path):
    torch.manual_seed(0)
    compiled = archc.compile(SPECS / "bert.arch")
    p = compiled.params
    config = transformers.BertConfig(vocab_size=p["vocab"], hidden_size=p["d_model"], num_hidden_layers=p["n_layers"],
                                     num_attention_heads=p["n_heads"], intermediate_size=p["d_ff"],
                                     max_position_embeddings=p["max_len"], type_vocab_size=p["type_vocab"],
                                     hidden_act="gelu", layer_norm_eps=p["eps"])
    reference = _eager(transformers.BertForMaskedLM(config))
    _, model = from_reference(reference, "bert.arch", tmp_path)
    tokens = torch.randint(0, p["vocab"], (2, 11))
    types = torch.randint(0, 2, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 7:] = False  # padding
    labels = torch.where(torch.rand(2, 11) < 0.3, tokens, torch.full_like(tokens, -100))
    labels[0, 0] = tokens[0, 0]
    with torch.no_grad():
        want = reference(input_ids=tokens, token_type_ids=types, attention_mask=mask.long(), labels=labels)
        got = model(tokens, types, mask, labels)
    _close(got["logits"], want.logits)
    _close(got["loss"], want.loss)


def test_vit_for_image_classification(tmp_path):
    torch.manual_seed(0)
    compiled = archc.compile(SPECS / "vit.arch")
    p = compiled.params
    config = transformers.ViTConfig(image_size=p["image_size"], patch_size=p["patch"], num_channels=p["channels"],
                                    hidden_size=p["d_model"], num_hidden_layers=p["n_layers"],
                                    num_attention_heads=p["n_heads"], intermediate_size=p["d_ff"],
                                    hidden_act="gelu", layer_norm_eps=p["eps"], num_labels=p["n_labels"],
                                    qkv_bias=True)
    reference = _eager(transformers.ViTForImageClassification(config))
    _, model = from_reference(reference, "vit.arch", tmp_path)
    image = torch.randn(3, p["channels"], p["image_size"], p["image_size"])
    labels = torch.randint(0, p["n_labels"], (3,))
    with torch.no_grad():
        want = reference(pixel_values=image, labels=labels)
        got = model(image, labels)
    _close(got["logits"], want.logits)
    _close(got["loss"], want.loss)


def test_t5_for_conditional_generation(tmp_path):
    torch.manual_seed(0)
    compiled = archc.compile(SPECS / "t5.arch")
    p = compiled.params
    config = transformers.T5Config(vocab_size=p["vocab"], d_model=p["d_model"], d_kv=p["d_kv"], d_ff=p["d_ff"],
                                   num_layers=p["n_layers"], num_decoder_layers=p["n_decoder_layers"],
                                   num_heads=p["n_heads"], relative_attention_num_buckets=p["buckets"],
                                   relative_attention_max_distance=p["max_distance"], layer_norm_epsilon=p["eps"],
                                   feed_forward_proj="relu", tie_word_embeddings=True, pad_token_id=p["pad"],
                                   decoder_start_token_id=p["pad"])
    reference = _eager(transformers.T5ForConditionalGeneration(config))
    _, model = from_reference(reference, "t5.arch", tmp_path)
    # long enough that distances reach the logarithmic buckets
    input_ids = torch.randint(1, p["vocab"], (2, 40))
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 30:] = False
    labels = torch.randint(1, p["vocab"], (2, 25))
    labels[1, 20:] = -100
    with torch.no_grad():
        want = reference(input_ids=input_ids, attention_mask=mask.long(), labels=labels)
        got = model(input_ids, mask, labels)
    _close(got["logits"], want.logits)
    _close(got["loss"], want.loss)


def test_albert_for_masked_lm_shares_its_layer_as_the_reference_does(tmp_path):
    torch.manual_seed(0)
    compiled = archc.compile(SPECS / "albert.arch")
    p = compiled.params
    config = transformers.AlbertConfig(vocab_size=p["vocab"], embedding_size=p["d_embed"], hidden_size=p["d_model"],
                                       num_hidden_layers=p["n_layers"], num_attention_heads=p["n_heads"],
                                       intermediate_size=p["d_ff"], max_position_embeddings=p["max_len"],
                                       type_vocab_size=p["type_vocab"], hidden_act="gelu_new",
                                       layer_norm_eps=p["eps"], hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0)
    reference = _eager(transformers.AlbertForMaskedLM(config))
    _, model = from_reference(reference, "albert.arch", tmp_path)
    tokens = torch.randint(0, p["vocab"], (2, 9))
    types = torch.randint(0, 2, (2, 9))
    labels = torch.where(torch.rand(2, 9) < 0.3, tokens, torch.full_like(tokens, -100))
    labels[0, 0] = tokens[0, 0]
    with torch.no_grad():
        want = reference(input_ids=tokens, token_type_ids=types, labels=labels)
        got = model(tokens, types, labels)
    _close(got["logits"], want.logits)
    _close(got["loss"], want.loss)


def _t5_v11(tmp_path):
    """A T5 v1.1 (gated-gelu) reference as transformers 5 makes it: head tied, decoder output not scaled."""
    torch.manual_seed(1)
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                   decoder_start_token_id=0)
    reference = _eager(transformers.T5ForConditionalGeneration(config))
    assert reference.config.scale_decoder_outputs is False
    return reference


def _t5_outputs(model, reference, vocab=96):
    input_ids = torch.randint(1, vocab, (2, 30))
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 25:] = False
    labels = torch.randint(1, vocab, (2, 12))
    with torch.no_grad():
        want = reference(input_ids=input_ids, attention_mask=mask.long(), labels=labels)
        got = model(input_ids, mask, labels)
    _close(got["logits"], want.logits)
    _close(got["loss"], want.loss)


def test_t5_v1_1_gated_gelu_without_output_scaling(tmp_path):
    reference = _t5_v11(tmp_path)
    compiled, model = from_reference(reference, "t5.arch", tmp_path)
    p = compiled.params
    assert (p["ff"], p["tie_embeddings"], p["scale_decoder_output"], p["n_decoder_layers"]) == ("gated-gelu", True,
                                                                                               False, 3)
    _t5_outputs(model, reference)


def test_a_released_flan_t5_layout_has_its_own_head(tmp_path):
    """Flan-T5's files: `tie_word_embeddings: false`, no `scale_decoder_outputs`, a stored lm_head.weight."""
    reference = _t5_v11(tmp_path)
    reference.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["tie_word_embeddings"] = False
    del config["scale_decoder_outputs"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "hf" / "model.safetensors")
    state["lm_head.weight"] = state["shared.weight"].clone()  # equal values: the reference's logits still hold
    save_file(state, tmp_path / "hf" / "model.safetensors")
    compiled, model = load_hf(SPECS / "t5.arch", tmp_path / "hf")
    assert not compiled.params["tie_embeddings"] and not compiled.params["scale_decoder_output"]
    assert model.lm_head.weight.data_ptr() != model.shared_embedding.weight.data_ptr()
    _t5_outputs(model, reference)
