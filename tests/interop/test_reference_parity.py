"""BERT, ViT, T5 (and ALBERT) written in the language compute what transformers' reference models compute.

Each reference is built from a tiny random config (no download), its vectors randomised so a mis-mapped
bias or norm shows, saved with `save_pretrained` (safetensors) and read back from disk; a key map local
to this test (regex -> archc's canonical names, the unfused ones `archc inspect SPEC weights` lists)
renames its weights, and `archc.interop.weights.load_canonical` loads them strictly (every weight of the
archc model filled, none left over). Logits (and losses) must agree within 1e-4 in fp32.

Two things of the references the specs leave out, on purpose and by configuration rather than as a gap
of the language: dropout (compared in eval mode) and HF's extra outputs (hidden states, attentions).
What the language cannot say yet, for these models: nothing — T5's relative position bias, its
unscaled attention, padding masks, the shared embedding and the shifted labels are all in specs/t5.arch.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import archc
from archc.interop.weights import load_canonical

transformers = pytest.importorskip("transformers")

SPECS = Path(__file__).resolve().parents[2] / "specs"
ATOL = RTOL = 1e-4

BERT_KEYS = [
    (r"bert\.embeddings\.(word|token_type|position)_embeddings\.weight", r"\1_embeddings.weight"),
    (r"bert\.embeddings\.LayerNorm\.", "embeddings_norm."),
    (r"bert\.encoder\.layer\.(\d+)\.attention\.self\.query\.", r"layers.\1.attention.q."),
    (r"bert\.encoder\.layer\.(\d+)\.attention\.self\.key\.", r"layers.\1.attention.k."),
    (r"bert\.encoder\.layer\.(\d+)\.attention\.self\.value\.", r"layers.\1.attention.v."),
    (r"bert\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o."),
    (r"bert\.encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.", r"layers.\1.attention_norm."),
    (r"bert\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.intermediate."),
    (r"bert\.encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.output."),
    (r"bert\.encoder\.layer\.(\d+)\.output\.LayerNorm\.", r"layers.\1.output_norm."),
    (r"cls\.predictions\.transform\.dense\.", "transform."),
    (r"cls\.predictions\.transform\.LayerNorm\.", "transform_norm."),
    (r"cls\.predictions\.bias", "decoder.bias"),  # the decoder's weight is the word embeddings'
]

VIT_KEYS = [
    (r"vit\.embeddings\.cls_token", "cls_token"),
    (r"vit\.embeddings\.position_embeddings", "position_embeddings"),
    (r"vit\.embeddings\.patch_embeddings\.projection\.", "patch_embeddings."),
    (r"vit\.encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q."),
    (r"vit\.encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k."),
    (r"vit\.encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v."),
    (r"vit\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o."),
    (r"vit\.encoder\.layer\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.layernorm_\2."),
    (r"vit\.encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc."),
    (r"vit\.encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.proj."),
    (r"vit\.layernorm\.", "layernorm."),
    (r"classifier\.", "classifier."),
]

T5_KEYS = [
    (r"shared\.weight", "shared_embedding.weight"),
    (r"(encoder|decoder)\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
     r"\1_position_bias.weight"),
    (r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"\1.\2.self_attention.\3."),
    (r"(encoder|decoder)\.block\.(\d+)\.layer\.0\.layer_norm\.", r"\1.\2.layer_norm."),
    (r"decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.([qkvo])\.", r"decoder.\1.cross_attention.\2."),
    (r"decoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"decoder.\1.cross_norm."),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wo)\.", r"encoder.\1.ff.\2."),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"encoder.\1.ff.layer_norm."),
    (r"decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(wi|wo)\.", r"decoder.\1.ff.\2."),
    (r"decoder\.block\.(\d+)\.layer\.2\.layer_norm\.", r"decoder.\1.ff.layer_norm."),
    (r"(encoder|decoder)\.final_layer_norm\.", r"\1_norm."),
]

ALBERT_LAYER = r"albert\.encoder\.albert_layer_groups\.0\.albert_layers\.0\."
ALBERT_KEYS = [
    (r"albert\.embeddings\.(word|token_type|position)_embeddings\.weight", r"\1_embeddings.weight"),
    (r"albert\.embeddings\.LayerNorm\.", "embeddings_norm."),
    (r"albert\.encoder\.embedding_hidden_mapping_in\.", "embedding_hidden_mapping_in."),
    (ALBERT_LAYER + r"attention\.query\.", "layer.attention.q."),
    (ALBERT_LAYER + r"attention\.key\.", "layer.attention.k."),
    (ALBERT_LAYER + r"attention\.value\.", "layer.attention.v."),
    (ALBERT_LAYER + r"attention\.dense\.", "layer.attention.o."),
    (ALBERT_LAYER + r"attention\.LayerNorm\.", "layer.attention_norm."),
    (ALBERT_LAYER + r"(ffn|ffn_output|full_layer_layer_norm)\.", r"layer.\1."),
    (r"predictions\.dense\.", "dense."),
    (r"predictions\.LayerNorm\.", "predictions_norm."),
    (r"predictions\.bias", "decoder.bias"),
]


def rename(key: str, rules) -> str:
    for pattern, replacement in rules:
        if re.fullmatch(pattern + (".*" if pattern.endswith("\\.") else ""), key):
            return re.sub("^" + pattern, replacement, key)
    raise AssertionError(f"no rule maps the reference's {key}")


def from_reference(hf_model, compiled, rules, tmp_path):
    """The reference's weights, saved and read back from disk, renamed and loaded strictly into archc's model."""
    with torch.no_grad():  # norms away from 1 and biases away from 0, so a mis-mapped vector shows
        for name, p in hf_model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in name.lower() else p.normal_(0.0, 0.1)
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    model = compiled.build().eval()
    load_canonical(model, compiled, {rename(k, rules): v for k, v in state.items()})
    return model


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
    model = from_reference(reference, compiled, BERT_KEYS, tmp_path)
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
    model = from_reference(reference, compiled, VIT_KEYS, tmp_path)
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
    model = from_reference(reference, compiled, T5_KEYS, tmp_path)
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
    model = from_reference(reference, compiled, ALBERT_KEYS, tmp_path)
    tokens = torch.randint(0, p["vocab"], (2, 9))
    types = torch.randint(0, 2, (2, 9))
    labels = torch.where(torch.rand(2, 9) < 0.3, tokens, torch.full_like(tokens, -100))
    labels[0, 0] = tokens[0, 0]
    with torch.no_grad():
        want = reference(input_ids=tokens, token_type_ids=types, labels=labels)
        got = model(tokens, types, labels)
    _close(got["logits"], want.logits)
    _close(got["loss"], want.loss)
