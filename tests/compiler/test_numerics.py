"""Differential tests: each generated module against a hand-written PyTorch reference.

The references (tests/reference_models.py) are plain, obviously-right models
with Hugging Face semantics and key names; weights travel from them to the
generated modules through the HF key map, and so do gradients (the map is
linear: renames, transposes and splits). Both run in float64, but the
reference takes softmax and RMSNorm through float32 as Hugging Face does, so
agreement is to float32 rounding; a semantic slip shows at 1e-2.
"""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS
from reference_models import GPT2, GPT2Config, Llama, LlamaConfig, next_token_loss

import archc
from archc.interop.hf import convert_state_dict
from archc.interop.weights import load_canonical, to_canonical

CASES = {
    "gpt2": (dict(vocab=96, max_len=32, d_model=48, n_layers=2, n_heads=4),
             lambda p: GPT2(GPT2Config(vocab_size=p["vocab"], n_positions=p["max_len"], n_embd=p["d_model"],
                                       n_layer=p["n_layers"], n_head=p["n_heads"]))),
    "llama": (dict(vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, rope_theta=5000.0),
              lambda p: Llama(LlamaConfig(vocab_size=p["vocab"], hidden_size=p["d_model"],
                                          intermediate_size=p["d_ff"], num_hidden_layers=p["n_layers"],
                                          num_attention_heads=p["n_heads"], num_key_value_heads=p["n_kv_heads"],
                                          rope_theta=p["rope_theta"]))),
    "llama_mqa_tied": (dict(vocab=96, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=96,
                            tie_embeddings=True),
                       lambda p: Llama(LlamaConfig(vocab_size=p["vocab"], hidden_size=p["d_model"],
                                                   intermediate_size=p["d_ff"], num_hidden_layers=p["n_layers"],
                                                   num_attention_heads=p["n_heads"], num_key_value_heads=1,
                                                   tie_word_embeddings=True))),
}


def _pair(case: str, **compile_kw):
    params, make_reference = CASES[case]
    arch = case.split("_")[0]
    torch.manual_seed(0)
    reference = make_reference(params).double()
    with torch.no_grad():  # norm weights away from 1 so a missed norm weight shows
        for name, p in reference.named_parameters():
            if "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    compiled = archc.compile(str(SPECS / f"{arch}.arch"), params, **compile_kw)
    model = compiled.build().double()
    tied = params.get("tie_embeddings", False)
    load_canonical(model, compiled, convert_state_dict(arch, reference.state_dict(), params["n_layers"],
                                                       tie_embeddings=tied))
    return arch, params, reference, compiled, model


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_match_reference(case, fused):
    arch, params, reference, compiled, model = _pair(case, disable=() if fused else ("fuse_projections",))
    tokens = torch.randint(0, params["vocab"], (3, 11))
    out = model(tokens)
    logits = reference(tokens)
    torch.testing.assert_close(out["logits"], logits, rtol=1e-5, atol=1e-6)
    ref_loss = next_token_loss(logits, tokens)
    torch.testing.assert_close(out["loss"], ref_loss, rtol=1e-5, atol=1e-6)

    out["loss"].backward()
    ref_loss.backward()
    ours = to_canonical(compiled, {n: p.grad for n, p in model.named_parameters()})
    theirs = convert_state_dict(arch, {n: p.grad for n, p in reference.named_parameters()}, params["n_layers"],
                                tie_embeddings=params.get("tie_embeddings", False))
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-7, msg=name)


def test_math_kernel_matches_reference_too():
    _arch, params, reference, _compiled, model = _pair("llama", kernels={"attention": "math"})
    tokens = torch.randint(0, params["vocab"], (2, 9))
    torch.testing.assert_close(model(tokens)["logits"], reference(tokens), rtol=1e-5, atol=1e-6)


def test_length_one_sequence():
    _arch, params, reference, _compiled, model = _pair("gpt2")
    tokens = torch.randint(0, params["vocab"], (2, 1))
    torch.testing.assert_close(model(tokens)["logits"], reference(tokens), rtol=1e-5, atol=1e-6)
