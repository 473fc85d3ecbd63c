"""Byte patching in the language: specs/blt.arch against a hand-written BLT forward (loops over rows, patches
and bytes, attention by hand) with the same weights and patch boundaries, and the ops' checks."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECS

import archc
from archc.dsl.diagnostics import SpecError
from archc.runtime.patching import HASH_PRIMES, entropy

SMALL = {"d_local": 16, "local_heads": 2, "local_hidden": 24, "d_global": 24, "global_heads": 2, "global_hidden": 32,
         "buckets": 37, "max_patch_length": 3, "window": 4}


def _hash(ids: list[int], t: int, size: int, function: int, buckets: int) -> int:
    """The n-gram hash by Python integers, wrapped to int64 as torch computes it."""
    window = [0] * max(0, size - 1 - t) + ids[max(0, t - size + 1):t + 1]
    total = sum(x * pow(HASH_PRIMES[function], i, 2**64) for i, x in enumerate(window)) % 2**64
    total = total - 2**64 if total >= 2**63 else total
    return total % buckets


def _attend(module, x: torch.Tensor, memory: torch.Tensor, heads: int) -> torch.Tensor:
    """One PatchCrossAttention by hand: RMSNorm'd queries from x [n, D] over memory [m, D]; nothing to see: 0."""
    q = module.q(module.q_norm(x))
    if memory.shape[0] == 0:
        return torch.zeros_like(x)
    kv = module.k_norm(memory)
    k, v = module.k(kv), module.v(kv)
    hd = q.shape[-1] // heads
    out = []
    for h in range(heads):
        part = slice(h * hd, (h + 1) * hd)
        weights = torch.softmax(q[:, part] @ k[:, part].T / math.sqrt(hd), dim=-1)
        out.append(weights @ v[:, part])
    return module.o(torch.cat(out, dim=-1))


def _reference(m, bytes_: torch.Tensor, lengths: torch.Tensor, k: int, heads: int, sizes, buckets: int):
    """The BLT forward with loops: per row, each patch pooled and cross-attended over its own bytes, the latent
    layers, then each byte reading the patch that ends at or before it."""
    ids = bytes_ + 4
    B, T = ids.shape
    table = m.hash_embeddings.table.weight
    rows = []
    for b in range(B):
        row = ids[b].tolist()
        h = m.tok_embeddings(ids[b])
        for t in range(T):
            for i, size in enumerate(sizes):
                h[t] = h[t] + table[i * buckets + _hash(row, t, size, 0, buckets)]
        h = h[None]
        for layer in m.encoder_layers:
            h = layer(h)
        h = h[0]
        ends = torch.cumsum(lengths[b], 0).tolist()
        starts = [0, *ends[:-1]]
        D = h.shape[-1]
        patches = []
        for s, e in zip(starts, ends):
            mine = h[s:min(e, T)]
            pooled = mine.max(dim=0).values if len(mine) else torch.zeros(D, dtype=h.dtype)
            queries = m.patch_embedding_projection(pooled).view(k, D)
            patches.append((queries + _attend(m.encoder_cross_attention, queries, mine, heads)).reshape(-1))
        g = m.token_embedding_projection(torch.stack(patches))[None]
        for layer in m.global_layers:
            g = layer(g)
        z = m.decoder_patch_projection(g)[0].view(len(patches), k, D)
        last_byte = [e - 1 for e in ends]
        for layer in m.decoder_layers:
            read = [max(j for j, last in enumerate(last_byte) if last <= t) for t in range(T)]
            cross = torch.stack([_attend(layer.cross_attention, h[t:t + 1], z[read[t]], heads)[0] for t in range(T)])
            h = layer.layer((h + cross)[None])[0]
        rows.append(m.output(m.norm(h))[..., 4:])
    return torch.stack(rows)


def _blt(**overrides):
    return archc.compile(SPECS / "blt.arch", {**SMALL, **overrides}, disable=("fuse_projections",))


def test_blt_forward_equals_a_hand_written_reference():
    torch.manual_seed(0)
    bytes_ = torch.randint(0, 256, (3, 11))
    probe = _blt().build().double()
    # a threshold at the median entropy of this (random) entropy model: patches of several lengths per row
    with torch.no_grad():
        h = entropy(probe.entropy_model(bytes_))
    threshold = float(h[:, 1:].median())
    compiled = _blt(threshold=threshold)
    model = compiled.build().double()
    model.load_state_dict(probe.state_dict())
    with torch.no_grad():
        out = model(bytes_)
        lengths = out["lengths"]
        # the boundaries: the first byte alone, then a start wherever the entropy before exceeds the threshold
        for b in range(3):
            starts = [0, 1] + [t for t in range(2, 12) if h[b, t - 1] > threshold]
            pieces = []
            for s, e in zip(starts, [*starts[1:], 12]):
                pieces += [3] * ((e - s) // 3) + ([(e - s) % 3] if (e - s) % 3 else [])
            assert lengths[b].tolist() == pieces + [0] * (lengths.shape[1] - len(pieces))
        assert len({int((lengths[b] > 0).sum()) for b in range(3)}) > 1  # ragged: rows padded with empty patches
        want = _reference(model, bytes_, lengths, k=2, heads=2, sizes=[3, 4, 5, 6, 7, 8], buckets=37)
    torch.testing.assert_close(out["logits"], want, rtol=1e-9, atol=1e-9)


def test_the_decoder_never_sees_the_byte_it_predicts():
    # changing byte t + 1 onwards leaves the logits at 0..t unchanged (the patches up to t as well)
    torch.manual_seed(1)
    model = _blt(threshold=5.5).build().double().eval()
    a = torch.randint(0, 256, (1, 12))
    b = a.clone()
    b[0, 7:] = torch.randint(0, 256, (5,))
    with torch.no_grad():
        torch.testing.assert_close(model(a)["logits"][:, :7], model(b)["logits"][:, :7], rtol=0, atol=1e-12)


def test_static_and_space_patching_compile_and_run():
    spec = """
model M(bytes: Tokens[B, T]) {
    h = embedding(bytes + 4, 260, 8) + hash_ngrams(bytes + 4, sizes=[3], buckets=11, dim=8)
    lengths = patch(bytes + 4, mode="MODE", patch_size=3)
    p = patch_pool(h, lengths)
    y = h + unpatch(p, lengths, like=bytes)
    return y, lengths
}
"""
    x = torch.tensor([list(b"ab cd, ef")])
    static = archc.compile(spec.replace("MODE", "static")).build()(x)
    assert static["lengths"].tolist() == [[1, 3, 3, 3]]  # the first byte alone, then 3 bytes (the last 3: 2 + next)
    space = archc.compile(spec.replace("MODE", "space")).build()(x)
    assert space["lengths"].sum().item() == 10 and space["y"].shape == (1, 9, 8)
    top_k = archc.compile(spec.replace("MODE", "top_k").replace("bytes + 4, mode", "bytes + 4, h[..., 0], mode"))
    lengths = top_k.build()(x)["lengths"]
    assert lengths.sum().item() == 10 and lengths.shape[1] == 2 + 9 // 3 - 2  # positions 0, 1 and the top 1


@pytest.mark.parametrize(("call", "message"), [
    ('patch(ids, e, mode="entropi")', 'did you mean "entropy"'),
    ("patch(ids)", 'mode "entropy" needs the entropies'),
    ('patch(ids, e, mode="static")', 'mode "static" does not read entropies'),
    ("patch(ids, e, monotonic=true, threshold_add=0.1)", "choose one"),
    ("patch(ids, e, max_patch_length=0)", "`max_patch_length` must be positive"),
    ('patch(ids, e, mode="top_k", monotonic=true)', 'go with mode "entropy"'),
    ("patch_pool(h, ids)", "needs the patch lengths"),
])
def test_bad_patching_arguments_are_located(call, message):
    spec = f"""
model M(bytes: Tokens[B, T]) {{
    ids = bytes + 4
    h = embedding(ids, 260, 8)
    e = entropy(linear(h, 260))
    out = {call}
    return out
}}
"""
    with pytest.raises(SpecError) as info:
        archc.compile(spec)
    assert message in str(info.value) and info.value.span is not None and info.value.span.line == 6


def test_hash_ngrams_and_patch_attention_shapes_are_checked():
    bad_k = """
model M(bytes: Tokens[B, T]) {
    h = embedding(bytes, 260, 8)
    lengths = patch(bytes, mode="static")
    p = patch_pool(h, lengths)
    y = patch_attention(linear(p, 12), h, lengths, heads=2, k=5)
    return y
}
"""
    with pytest.raises(SpecError, match="does not split into k=5"):
        archc.compile(bad_k)
    with pytest.raises(SpecError, match="n-gram sizes"):
        archc.compile("model M(b: Tokens[B, T]) {\n    return hash_ngrams(b, sizes=[0, 3], dim=4)\n}\n")
    with pytest.raises(SpecError, match="integer byte ids"):
        archc.compile("model M(x: Tensor[B, T, 4]) {\n    return hash_ngrams(x, dim=4)\n}\n")


def test_generation_decides_patches_on_the_fly_as_rerunning_the_whole_sequence_does():
    from archc.training.byte_generation import generate_bytes

    torch.manual_seed(2)
    prompt = list(b"def f(x):")
    probe = _blt().build().double()
    with torch.no_grad():
        h = entropy(probe.entropy_model(torch.tensor([prompt])))
    compiled = _blt(threshold=float(h.median()))
    model = compiled.build().double()
    model.load_state_dict(probe.state_dict())
    out = generate_bytes(compiled, model, prompt, 8, temperature=0)
    x = torch.tensor([prompt + out.new])
    with torch.no_grad():
        whole = model(x)
    # each byte was drawn from the logits the whole model gives at its position, with the same patches
    torch.testing.assert_close(out.logits, whole["logits"][0, len(prompt) - 1:-1], rtol=1e-9, atol=1e-9)
    assert out.new == whole["logits"][0, len(prompt) - 1:-1].argmax(-1).tolist()
    decided = [n for n in whole["lengths"][0].tolist() if n > 0]
    # the patches decided on the way: the whole sequence's, the last one still growing when generation stopped
    n = len(out.lengths)
    assert out.lengths[:-1] == decided[:n - 1] and out.lengths[-1] <= decided[n - 1]
    assert sum(out.lengths) == len(x[0])  # up to the position after the last byte it drew from
    assert len(set(decided)) > 1


def test_summary_prices_flops_per_byte_by_mean_patch_length():
    from archc.compiler import analysis
    from archc.compiler.api import patching_costs

    compiled = _blt()
    graph = compiled.ir
    costs = [patching_costs(graph, 2, 64, m) for m in (1, 2, 4, 8)]
    per_byte = [c[0] for c in costs]
    assert per_byte == sorted(per_byte, reverse=True) and all(0 < c[1] < 1 for c in costs)
    # at mean length 4: 1 + 64 / 4 patches, the FLOPs of the whole model at that patch count
    assert per_byte[2] * 2 * 64 == analysis.forward_flops(graph, 2, 64, {"P": 17})
    assert "forward FLOPs per byte by mean patch length at T=64: 1: " in compiled.summary(seq=64)
    assert "P=17 patches above" in compiled.summary(seq=64, dims={"P": 17})
