"""BLT byte patching (archc.runtime.patching): table-driven rules, the hash, masks, and transformers' BLT helpers.

- The hash against hand-computed values (size 2, no overflow: worked out in
  the comments) and against Python big-integer arithmetic with int64
  wrapping for the sizes whose powers overflow.
- Each patching rule on hand-worked entropy rows and byte strings: global
  threshold, approximate monotonic, combined (with the reference's position-3
  quirk), top-k, space (word runs, UTF-8 lead bytes, specials), static,
  max_patch_length; with and without the next token.
- The threshold rules are causal (a prefix's starts are the prefix of the starts).
- Patch ids, the decoder's one-patch shift and both cross-attention masks
  against Python loops; `masked_attention` against a per-row softmax.
- transformers 5.24's BLT (`models/blt/modeling_blt.py`) helper functions on
  the same inputs: the hash, the hashed embeddings, splitting long patches,
  entropy-threshold lengths (row by row: for rows with different patch counts
  its padding yields a length one too long and a −1), patch ids, the mask
  builder, the max-pool patch reduction, and the entropy.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from archc.runtime import patching as P

INT64 = 2**64


def wrap(x: int) -> int:
    return ((x + 2**63) % INT64) - 2**63


def python_hash(ids: list[int], size: int, prime: int, buckets: int) -> list[int]:
    padded = [0] * (size - 1) + ids
    out = []
    for t in range(len(ids)):
        total = 0
        for i, x in enumerate(padded[t:t + size]):
            total = wrap(total + wrap(x * wrap(prime**i)))
        out.append(total % buckets)
    return out


# ----------------------------------------------------------------------------- bytes and hash


def test_bytes_round_trip_with_specials():
    ids = P.encode_bytes("hé", eos=True)
    assert ids == [P.BOS_ID, ord("h") + 4, 0xC3 + 4, 0xA9 + 4, P.EOS_ID]
    assert P.decode_bytes(ids + [P.PAD_ID, P.BOE_ID]).decode() == "hé"
    assert P.BYTE_VOCAB == 260


@pytest.mark.parametrize("ids, size, function, buckets, expected", [
    # window [0, 5]: 5·p = 5000000035 ≡ 20035; [5, 7]: 5 + 7p = 7000000054 ≡ 10054; [7, 9]: 9000000070 ≡ 70
    ([5, 7, 9], 2, 0, 30000, [20035, 10054, 70]),
    ([5, 7, 9, 200, 4], 3, 0, 30000, [245, 20378, 10495, 12094, 21605]),
    ([5, 7, 9, 200, 4, 259], 8, 1, 500002, [189373, 417370, 179569, 209933, 30073, 491374]),
])
def test_hash_hand_computed(ids, size, function, buckets, expected):
    assert P.byte_ngram_hash(torch.tensor([ids]), size, function, buckets).tolist() == [expected]
    assert python_hash(ids, size, P.HASH_PRIMES[function], buckets) == expected


def test_hash_matches_wrapping_integer_arithmetic():
    ids = torch.randint(0, P.BYTE_VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    for size in range(3, 9):
        for function in range(3):
            got = P.byte_ngram_hash(ids, size, function, 500002).tolist()
            assert got == [python_hash(row, size, P.HASH_PRIMES[function], 500002) for row in ids.tolist()]


# ----------------------------------------------------------------------------- patching rules

H8 = [0.5, 2.0, 0.1, 3.0, 2.9, 0.2, 1.5, 4.0]  # H'_j = H[j + 1] decides position j + 2
H6 = [0.0, 0.1, 3.0, 3.1, 0.0, 0.0]

START_CASES = [
    # (entropies, keyword arguments, starts with the next token, starts without)
    (H8, {"threshold": 1.0}, [0, 1, 2, 4, 5, 7, 8], [0, 1, 2, 4, 5, 7]),
    (H8, {"threshold": 1.0, "monotonic": True}, [0, 1, 2, 4, 7, 8], [0, 1, 2, 4, 7]),
    (H8, {"threshold": 2.0, "threshold_add": 1.0}, [0, 1, 2, 4, 8], [0, 1, 2, 4]),
    (H6, {"threshold": 2.0}, [0, 1, 3, 4], [0, 1, 3, 4]),
    (H6, {"threshold": 1.0, "monotonic": True}, [0, 1, 2, 3], [0, 1, 2, 3]),
    (H6, {"threshold": 2.0, "threshold_add": 1.0}, [0, 1, 2], [0, 1, 2]),  # position 3 never starts
    (H8, {"threshold": None, "patch_size": 2}, [0, 1, 4, 8], [0, 1, 4]),  # top 8 // 2 - 2 = 2: H' 4.0 and 3.0
    ([0.7], {"threshold": 0.1}, [0, 1], [0]),
]


@pytest.mark.parametrize("entropies, kw, with_next, without_next", START_CASES)
def test_entropy_patch_starts(entropies, kw, with_next, without_next):
    e = torch.tensor([entropies])
    for include, expected in ((True, with_next), (False, without_next)):
        mask = P.patch_start_mask(e, include_next_token=include, **kw)
        assert mask.shape == (1, len(entropies) + include)
        assert mask[0].nonzero().flatten().tolist() == expected
        lengths = P.patch_lengths(entropies=e, include_next_token=include, **kw)
        starts = expected + [len(entropies) + include]
        assert lengths[0].tolist() == [b - a for a, b in itertools.pairwise(starts)]


@pytest.mark.parametrize("mean", [1.5, 4.0, 4.5, 10.0])
def test_threshold_for_mean_length_starts_one_in_mean_positions(mean):
    e = torch.rand(3, 200, generator=torch.Generator().manual_seed(0)) * 5
    threshold = P.threshold_for_mean_length(e, mean)
    starts = P.patch_start_mask(e, threshold=threshold)[:, 2:]  # the positions e[:, 1:] decides
    assert abs(int(starts.sum()) - starts.numel() / mean) <= 1
    assert int((e[:, 1:] > threshold).sum()) == int(starts.sum())  # e[:, 0] decides nothing
    decided = sorted(e[:, 1:].flatten().tolist(), reverse=True)
    assert decided[round(len(decided) / mean)] <= threshold <= decided[round(len(decided) / mean) - 2]


SPACE_CASES = [
    # bytes, starts (with the next token): a patch ends after a non-word byte that follows a word byte
    (b"ab  cd.e", [0, 1, 3, 7]),  # [a] [b ' '] [' ' c d .] [e <next>]
    (b"a\xc3\xa9b", [0, 1, 2]),  # the UTF-8 lead byte C3 ends a patch; the continuation A9 does not
    (b"a b", [0, 1, 2]),
    (b"x", [0, 1]),
]


@pytest.mark.parametrize("data, starts", SPACE_CASES)
def test_space_patch_starts(data, starts):
    ids = torch.tensor([P.encode_bytes(data, bos=False)])
    assert P.space_start_mask(ids)[0].nonzero().flatten().tolist() == starts
    assert P.space_start_mask(ids, include_next_token=False)[0].nonzero().flatten().tolist() == [
        s for s in starts if s < len(data)]


def test_space_patches_end_at_specials():
    ids = torch.tensor([[P.BOS_ID, ord("h") + 4, ord("i") + 4, P.EOS_ID, ord("a") + 4]])
    assert P.space_start_mask(ids)[0].nonzero().flatten().tolist() == [0, 1, 4]  # EOS (position 3) ends one


@pytest.mark.parametrize("T, include, size, expected", [(8, True, 4, [4, 4, 1]), (8, False, 4, [4, 4]),
                                                       (3, False, 5, [3])])
def test_static_patches(T, include, size, expected):
    ids = torch.zeros(2, T, dtype=torch.long)
    lengths = P.patch_lengths(mode="static", tokens=ids, patch_size=size, include_next_token=include)
    assert lengths.tolist() == [expected, expected]


@pytest.mark.parametrize("lengths, max_len, expected", [
    ([[1, 7, 3, 0], [2, 2, 2, 5]], 3, [[1, 3, 3, 1, 3], [2, 2, 2, 3, 2]]),
    ([[10, 0]], 4, [[4, 4, 2]]),
    ([[1, 2], [3, 0]], 5, [[1, 2], [3, 0]]),
])
def test_max_patch_length(lengths, max_len, expected):
    assert P.split_long_patches(torch.tensor(lengths), max_len).tolist() == expected


def test_ragged_batches_pad_with_zeros():
    e = torch.tensor([[0.0, 2, 2, 2, 2, 0, 0], [0.0, 0, 0, 2, 0, 0, 0]])
    lengths = P.patch_lengths(entropies=e, threshold=1.0, include_next_token=False)
    assert lengths.tolist() == [[1, 1, 1, 1, 1, 2], [1, 3, 3, 0, 0, 0]]
    assert P.patch_lengths(entropies=e, threshold=1.0, max_patch_length=2, include_next_token=False).tolist() == [
        [1, 1, 1, 1, 1, 2], [1, 2, 1, 2, 1, 0]]


@pytest.mark.parametrize("kw", [{"threshold": 1.0}, {"threshold": 0.5, "monotonic": True},
                                {"threshold": 1.0, "threshold_add": 0.2}])
def test_threshold_rules_are_causal(kw):
    e = 2 * torch.rand(3, 15, generator=torch.Generator().manual_seed(4))
    full = P.patch_start_mask(e, **kw)
    for t in range(1, 15):
        assert torch.equal(P.patch_start_mask(e[:, :t], **kw), full[:, :t + 1])


def test_bad_patching_arguments_are_named():
    with pytest.raises(ValueError, match="mode must be one of"):
        P.patch_lengths(mode="bpe", tokens=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="entropies"):
        P.patch_lengths(mode="entropy", tokens=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="patch_size"):
        P.patch_start_mask(torch.zeros(1, 4), threshold=None)
    with pytest.raises(ValueError, match="first patch"):
        P.decoder_patch_ids(torch.tensor([[2, 3]]), 4)


# ----------------------------------------------------------------------------- ids and masks

LENGTHS = torch.tensor([[1, 3, 2, 1, 2], [1, 1, 5, 2, 0], [1, 8, 0, 0, 0]])  # sums 9: 8 bytes + the next one
T = 8


def test_patch_ids_and_masks_against_loops():
    B, Pn = LENGTHS.shape
    ids = P.patch_ids_from_lengths(LENGTHS, T)
    dec = P.decoder_patch_ids(LENGTHS, T)
    for b in range(B):
        starts = [sum(LENGTHS[b, :j].tolist()) for j in range(Pn)]
        owner = [max(j for j in range(Pn) if starts[j] <= t and LENGTHS[b, j] > 0) for t in range(T)]
        assert ids[b].tolist() == owner
        for t in range(T):
            d = int(dec[b, t])
            end_of_d = starts[d] + int(LENGTHS[b, d]) - 1  # the last byte the global patch d has seen
            assert end_of_d <= t < end_of_d + int(LENGTHS[b, d + 1])  # reads a finished patch; t + 1 is later
    for k in (1, 2):
        for window in (None, 2):
            enc = P.encoder_cross_mask(ids, Pn, k, window)
            dmask = P.decoder_cross_mask(dec, Pn, k, window)
            assert enc.shape == (B, Pn * k, T) and dmask.shape == (B, T, Pn * k)
            for b in range(B):
                for q in range(Pn * k):
                    for t in range(T):
                        p, own = q // k, int(ids[b, t])
                        sees = p == own if window is None else own <= p < own + window
                        assert bool(enc[b, q, t]) == sees
                        p, own = q // k, int(dec[b, t])
                        sees = p == own if window is None else p <= own < p + window
                        assert bool(dmask[b, t, q]) == sees


def test_patch_reduce_and_unpatch_against_loops():
    B, Pn = LENGTHS.shape
    h = torch.randn(B, T, 4, generator=torch.Generator().manual_seed(2))
    ids = P.patch_ids_from_lengths(LENGTHS, T)
    pooled = P.patch_reduce(h, ids, Pn)
    back = P.unpatch(pooled, ids)
    for b in range(B):
        for p in range(Pn):
            members = [t for t in range(T) if ids[b, t] == p]
            want = h[b, members].amax(0) if members else torch.zeros(4)
            assert torch.equal(pooled[b, p], want)
        for t in range(T):
            assert torch.equal(back[b, t], pooled[b, ids[b, t]])


def test_masked_attention_against_a_loop():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 2, 6, 4, generator=g), torch.randn(2, 2, 6, 4,
                                                                                                     generator=g)
    mask = torch.rand(2, 5, 6, generator=g) > 0.5
    mask[0, 1] = False  # a query that sees nothing
    out = P.masked_attention(q, k, v, mask)
    for b in range(2):
        for h in range(2):
            for i in range(5):
                keys = mask[b, i].nonzero().flatten()
                if len(keys) == 0:
                    want = torch.zeros(4)
                else:
                    w = torch.softmax(q[b, h, i] @ k[b, h, keys].T / 2.0, dim=-1)
                    want = w @ v[b, h, keys]
                torch.testing.assert_close(out[b, h, i], want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- transformers' BLT

blt = pytest.importorskip("transformers.models.blt.modeling_blt")


def test_hash_and_embeddings_match_transformers():
    ids = torch.randint(0, P.BYTE_VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    for size in (3, 5, 8):
        for function in range(3):
            assert torch.equal(P.byte_ngram_hash(ids, size, function, 1009),
                               blt.byte_group_hash_function(ids, size, P.HASH_PRIMES[function], 1009))
    ours = P.HashNgramEmbedding(6, sizes=(3, 4, 5), functions=2, buckets=101)
    local = nn.Module()
    local.embed_tokens = nn.Embedding(P.BYTE_VOCAB, 6)
    nn.init.zeros_(local.embed_tokens.weight)
    theirs = blt.compute_hash_embeddings(ids, local, ours.table, 2, [3, 4, 5], 101)
    torch.testing.assert_close(ours(ids), theirs, rtol=0, atol=0)


def test_patching_matches_transformers():
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        e = 2 * torch.rand(1, 20, generator=g)
        theirs = blt.BltPatcher.patch_lengths_from_entropies(e, 20, patch_size=4, threshold=1.0)
        ours = P.patch_lengths(entropies=e, threshold=1.0, include_next_token=False)
        # transformers keeps a start on the byte after the sequence as a trailing 0-length patch
        assert ours[ours > 0].tolist() == theirs[theirs > 0].tolist() and (theirs >= 0).all()
        lengths = torch.randint(0, 11, (3, 6), generator=g)
        lengths[1, 4:] = 0
        assert torch.equal(P.split_long_patches(lengths, 3)[:, :blt.process_patch_lengths(lengths, 3).shape[1]],
                           blt.process_patch_lengths(lengths, 3))
    logits = torch.randn(2, 5, P.BYTE_VOCAB, generator=g)
    torch.testing.assert_close(P.entropy(logits), torch.distributions.Categorical(logits=logits).entropy())


def test_ids_masks_and_pooling_match_transformers():
    B, Pn = LENGTHS.shape
    ids = P.patch_ids_from_lengths(LENGTHS, T)
    assert torch.equal(ids, blt.BltModel._patch_ids_from_lengths(None, LENGTHS, T))
    dec = P.decoder_patch_ids(LENGTHS, T)
    assert torch.equal(dec, blt.BltModel._patch_ids_from_lengths(None, LENGTHS[:, 1:], T))
    for k in (1, 2):
        enc = blt._prepare_patch_cross_attention_mask(ids, Pn, T, patches_as_queries=True, cross_attn_k=k)
        assert torch.equal(P.encoder_cross_mask(ids, Pn, k), enc[:, 0] == 0)
        dmask = blt._prepare_patch_cross_attention_mask(dec, Pn, T, patches_as_queries=False, cross_attn_k=k)
        assert torch.equal(P.decoder_cross_mask(dec, Pn, k), dmask[:, 0] == 0)
    h = torch.randn(B, T, 4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(P.patch_reduce(h, ids, Pn), blt.BltLocalEncoder.patch_reduce(None, h, Pn, ids))
