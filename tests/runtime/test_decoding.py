"""Decoding call by call (KV caches, RoPE and learned-position offsets, mixer states) equals running the whole sequence.

`generate_recurrent` feeds the prompt once and then one token per call; the
logits it returns must be those of one call on the whole sequence, for every
kind of time mixer: full attention (RoPE and learned positions), grouped-query,
sliding windows with sinks, MLA, and hybrids of attention and linear-attention
mixers. Layers that cannot decode are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import archc
from archc.runtime.decoding import KVCache
from archc.runtime.mixers import generate_recurrent, recurrent
from archc.runtime.rope import InterleavedRotaryEmbedding, RotaryEmbedding

SPECS = Path(__file__).resolve().parents[2] / "specs"

CASES = {
    "llama": dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2),
    "gpt2": dict(d_model=32, n_layers=2, n_heads=2),
    "sliding_window": dict(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=48, window=4, sinks=1,
                           global_every=2),
    "deepseek_v3": {},
    "kimi_linear": dict(d_model=32, n_heads=2, head_dim=16, d_ff=32, n_experts=4, d_expert=16),
}


@pytest.mark.parametrize("spec", list(CASES))
def test_token_by_token_decoding_equals_full_sequence_logits(spec):
    compiled = archc.compile(SPECS / f"{spec}.arch", **CASES[spec])
    torch.manual_seed(0)
    model = compiled.build().double().eval()
    prompt = torch.randint(0, 200, (2, 9))
    tokens, logits = generate_recurrent(model, prompt, steps=7, temperature=1.0, seed=1)
    assert tokens.shape == (2, 16) and logits.shape[:2] == (2, 15)
    with torch.no_grad():
        full = model(tokens[:, :-1])["logits"]
    # Linear-attention kernels compute in fp32 whatever the model's dtype.
    tol = 1e-5 if spec == "kimi_linear" else 1e-10
    torch.testing.assert_close(logits, full, rtol=tol, atol=tol)
    # Leaving decoding empties every cache: a plain call is unaffected.
    assert all(not m.active and m.k is None for m in model.modules() if isinstance(m, KVCache))


def test_pieces_of_any_length_continue_the_sequence():
    """Calls of several tokens after a non-empty cache need the causal mask aligned at the end."""
    model = archc.compile(SPECS / "sliding_window.arch", **CASES["sliding_window"]).build().double().eval()
    tokens = torch.randint(0, 256, (1, 23))
    with torch.no_grad():
        full = model(tokens)["logits"]
        with recurrent(model):
            pieces = [model(tokens[:, :5])["logits"], model(tokens[:, 5:6])["logits"],
                      model(tokens[:, 6:17])["logits"], model(tokens[:, 17:])["logits"]]
            # windowed layers keep the sink and the last window - 1 keys; full layers keep all 23
            cached = [layer.attn.kv_cache.k.shape[-2] for layer in model.layers]
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-10, atol=1e-10)
    assert cached == [4, 23, 4, 23]  # global_every=2: layers 1 and 3 are full attention


SPEC_BIDIRECTIONAL = """
model Encoder(tokens: Tokens[B, T]) {
    x = embedding(tokens, 32, 16)
    x += attention(x, heads=2, causal=false) as attn
    logits = linear(x, 32)
    return logits
}
"""


def test_layers_that_cannot_decode_are_refused_by_name():
    model = archc.compile(SPEC_BIDIRECTIONAL).build()
    with pytest.raises(NotImplementedError, match=r"cannot decode call by call: Attention \(not causal"):
        generate_recurrent(model, [1, 2, 3], steps=2)


def test_learned_positions_past_the_table_are_a_clear_error():
    model = archc.compile(SPECS / "gpt2.arch", **CASES["gpt2"], max_len=8).build().eval()
    with pytest.raises(ValueError, match="exceed the table's max_len=8"):
        generate_recurrent(model, list(range(6)), steps=4)


@pytest.mark.parametrize("rope", [RotaryEmbedding, InterleavedRotaryEmbedding])
def test_rope_offset_rotates_as_the_same_positions_of_the_whole_sequence(rope):
    emb = rope(8)
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 1, 10, 8)
    whole_q, whole_k = emb(q, k)
    part_q, part_k = emb(q[:, :, 6:], k[:, :, 6:], offset=6)
    torch.testing.assert_close(part_q, whole_q[:, :, 6:])
    torch.testing.assert_close(part_k, whole_k[:, :, 6:])


def test_nsa_decodes_by_recomputing_over_the_prefix():
    """Long enough that compression, selection (top_n of 4 blocks) and the window all cut in."""
    model = archc.compile(SPECS / "nsa.arch", n_layers=2).build().double().eval()
    prompt = torch.randint(0, 256, (1, 70))
    tokens, logits = generate_recurrent(model, prompt, steps=12, temperature=1.0, seed=2)
    with torch.no_grad():
        full = model(tokens[:, :-1])["logits"]
    # The NSA kernels pick blocks and chunk by length, in fp32 whatever the model's dtype.
    torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spec", ["llama", "kimi_linear"])
def test_sampling_with_the_cache_picks_the_tokens_rerunning_picks(spec, monkeypatch):
    from archc.runtime import mixers
    from archc.training import evaluate

    model = archc.compile(SPECS / f"{spec}.arch", **CASES[spec]).build().double()
    kwargs = dict(temperature=1.0, top_k=20, num_samples=3, seed=4)
    lengths = []
    hook = model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    cached = evaluate.generate(model, [5, 6, 7, 8], 12, **kwargs)
    hook.remove()
    assert lengths == [4] + [1] * 11  # the prompt once, then one token per call
    monkeypatch.setattr(mixers, "can_decode", lambda model: False)
    rerun = evaluate.generate(model, [5, 6, 7, 8], 12, **kwargs)
    assert cached == rerun and len(cached[0]) == 12
