"""Engram memory (archc.runtime.engram) against plain references.

- Hashing: the batched torch hash equals a per-position Python loop over Python
  integers (suffix n-grams with pad before the start, products with the
  layer's multipliers, XOR, modulo each head's prime); indices stay in bounds.
- Table sizes: the demo's shared prime search on a hand-computed example;
  multipliers odd, bounded so no product overflows, per-layer.
- Tokenizer compression: the demo's normaliser merges case, accents,
  width and whitespace variants and keeps partial-UTF-8 tokens apart.
- The module: gate in (0, 1); the short convolution is causal; prefetched rows
  give the same output; decoding one token at a time (and a prompt, then
  steps) equals the whole sequence, with and without lanes.
- Sparse rows: `sparse=True` gives the same gradient as the dense table, as
  a sparse row gradient; SparseRowAdam equals torch.optim.Adam / AdamW when
  every row is touched, leaves untouched rows and moments alone, and a row
  touched on some steps follows dense Adam run on that row's own steps.
"""

from __future__ import annotations

import pytest
import torch

from archc.runtime.engram import (
    Engram,
    SparseRowAdam,
    compression_table,
    hash_multipliers,
    is_prime,
    ngram_hashes,
    table_sizes,
)

VOCAB, D = 50, 16


def python_hash(ids: list[list[int]], multipliers: list[int], orders, sizes, pad: int) -> list[list[list[int]]]:
    """The demo's hash one position at a time, in Python integers (no wrapping)."""
    out = []
    for row in ids:
        out_row = []
        for t in range(len(row)):
            heads = []
            for i, n in enumerate(orders):
                mix = 0
                for k in range(n):
                    token = row[t - k] if t - k >= 0 else pad
                    mix ^= token * multipliers[k]
                heads += [mix % p for p in sizes[i]]
            out_row.append(heads)
        out.append(out_row)
    return out


def test_hash_equals_a_per_position_loop():
    g = torch.Generator().manual_seed(0)
    orders, vocab = (2, 3, 5), 1000
    sizes = table_sizes([4, 9], [101, 211, 307], heads=3)[9]
    m = hash_multipliers(max(orders), vocab, layer_id=9, seed=3)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    got = ngram_hashes(ids, m, orders, torch.tensor(sizes), pad_id=7)
    want = python_hash(ids.tolist(), m.tolist(), orders, sizes, pad=7)
    assert got.tolist() == want
    bounds = torch.tensor([p for ps in sizes for p in ps])
    assert (got >= 0).all() and (got < bounds).all()
    # with a carried context the hash of the continuation is the tail of the whole sequence's
    tail = ngram_hashes(ids[:, 6:], m, orders, torch.tensor(sizes), pad_id=7, history=ids[:, 2:6])
    assert torch.equal(tail, got[:, 6:])


def test_table_sizes_hand_computed():
    # layer 0: order bases 10, 20 -> 11 13 17 | 23 29 31; layer 1 skips the primes already taken
    assert table_sizes([0, 1], [10, 20], heads=3) == {0: [[11, 13, 17], [23, 29, 31]], 1: [[19, 37, 41], [43, 47, 53]]}
    assert [n for n in range(60) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]
    assert is_prime(646_403) and not is_prime(646_400)  # around the demo's 5·129280


def test_multipliers_are_odd_bounded_and_per_layer():
    vocab = 129_280
    a, b = hash_multipliers(3, vocab, 1), hash_multipliers(3, vocab, 15)
    assert (a % 2 == 1).all() and (b % 2 == 1).all()
    assert not torch.equal(a, b) and torch.equal(a, hash_multipliers(3, vocab, 1))
    assert all(vocab * int(x) < 2**63 for x in torch.cat((a, b)))


def test_compression_table_merges_like_the_demo():
    texts = ["Hello", "hello", " hello", "HELLO\n", "café", "cafe", "Ａ", "a", "  ", "\n\n", " ", "", "x\ufffd", "y\ufffd"]
    table, size = compression_table(lambda ids: texts[ids[0]], len(texts))
    t = table.tolist()
    assert t[0] == t[1] == t[2] == t[3]  # case and surrounding whitespace
    assert t[4] == t[5]  # accents stripped
    assert t[6] == t[7]  # NFKC folds the fullwidth letter
    assert t[8] == t[9] == t[10]  # whitespace runs: one space
    assert len({t[11], t[12], t[13], t[0], t[4], t[6], t[8]}) == 7  # "" keeps itself; partial UTF-8 stays apart
    assert size == len(set(t)) == max(t) + 1


def make_engram(lanes=1, **kw):
    torch.manual_seed(0)
    return Engram(D, VOCAB, orders=(2, 3), heads=2, slots=37, dim=8, lanes=lanes, layer_id=2, layer_ids=(2, 6), **kw)


def stream(lanes, B=2, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, T, D) if lanes == 1 else (B, T, lanes, D)
    return torch.randn(*shape, generator=g), torch.randint(0, VOCAB, (B, T), generator=g)


@pytest.mark.parametrize("lanes", [1, 4])
def test_gate_range_causality_and_prefetch(lanes):
    mod = make_engram(lanes)
    h, tok = stream(lanes)
    out = mod(h, tok)
    assert out.shape == h.shape
    torch.testing.assert_close(mod(h, tok, rows=mod.prefetch(tok)), out, rtol=0, atol=0)
    h2, tok2 = h.clone(), tok.clone()
    h2[:, 5:] += 1.0
    tok2[:, 5:] = (tok2[:, 5:] + 1) % VOCAB
    torch.testing.assert_close(mod(h2, tok2)[:, :5], out[:, :5], rtol=0, atol=0)  # causal
    assert not torch.allclose(mod(h2, tok2)[:, 5:], out[:, 5:])
    e = mod.prefetch(tok)
    q = h if lanes > 1 else h.unsqueeze(-2)
    z = (mod.key_norms[0](mod.keys[0](e)) * mod.query_norms[0](q[..., 0, :])).sum(-1) / D**0.5
    gate = torch.sigmoid(z.sign() * z.abs().clamp_min(1e-6).sqrt())
    assert ((gate > 0) & (gate < 1)).all()


@pytest.mark.parametrize("lanes", [1, 4])
def test_decoding_token_by_token_equals_the_whole_sequence(lanes):
    mod = make_engram(lanes)
    h, tok = stream(lanes, T=11)
    whole = mod(h, tok)
    mod.start()
    steps = [mod(h[:, :4], tok[:, :4])] + [mod(h[:, t:t + 1], tok[:, t:t + 1]) for t in range(4, 11)]
    assert mod.length == 11
    mod.stop()
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-6, atol=1e-6)
    assert mod._ids is None and mod._conv is None


def test_sparse_table_gradient_equals_the_dense_one():
    h, tok = stream(1)
    grads = []
    for sparse in (False, True):
        mod = make_engram(sparse=sparse)
        mod(h, tok).square().sum().backward()
        grads.append(mod.table.weight.grad)
    assert not grads[0].is_sparse and grads[1].is_sparse
    torch.testing.assert_close(grads[1].to_dense(), grads[0])
    touched = grads[1].coalesce().indices()[0]
    assert len(touched) <= 2 * 9 * 4 < mod.table.num_embeddings  # at most B·T·(orders·heads) of the rows


def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(torch.tensor([rows]), values, shape, check_invariants=True)


def test_sparse_row_adam_equals_dense_adam_when_every_row_is_touched():
    g = torch.Generator().manual_seed(0)
    for dense_cls, wd in ((torch.optim.Adam, 0.0), (torch.optim.AdamW, 0.1)):
        w0 = torch.randn(6, 3, generator=g)
        a, b = w0.clone().requires_grad_(), w0.clone().requires_grad_()
        sparse_opt = SparseRowAdam([a], lr=0.1, weight_decay=wd)
        dense_opt = dense_cls([b], lr=0.1, weight_decay=wd, foreach=False)
        for _ in range(4):
            grad = torch.randn(6, 3, generator=g)
            a.grad = _sparse([5, 0, 3, 1, 4, 2, 0], torch.cat((grad[[5, 0, 3, 1, 4, 2]], torch.zeros(1, 3))), (6, 3))
            b.grad = grad
            sparse_opt.step()
            dense_opt.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_sparse_row_adam_touches_only_the_rows_a_step_reads():
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(5, 2, generator=g)
    w = w0.clone().requires_grad_()
    opt = SparseRowAdam([w], lr=0.05)
    touches = [[0, 2], [2, 2, 4], [0], [1, 2]]  # duplicates are summed
    grads = []
    for rows in touches:
        values = torch.randn(len(rows), 2, generator=g)
        grads.append((rows, values))
        w.grad = _sparse(rows, values, (5, 2))
        before = w.detach().clone()
        opt.step()
        untouched = [r for r in range(5) if r not in rows]
        assert torch.equal(w.detach()[untouched], before[untouched])
    assert torch.equal(w.detach()[3], w0[3])
    assert torch.equal(opt.state[w]["steps"], torch.tensor([2, 1, 3, 0, 1]))
    # each row follows dense Adam run on the steps that touched it
    for row in range(5):
        ref = w0[row].clone().requires_grad_()
        dense = torch.optim.Adam([ref], lr=0.05, foreach=False)
        for rows, values in grads:
            if row in rows:
                ref.grad = values[[i for i, r in enumerate(rows) if r == row]].sum(0)
                dense.step()
        torch.testing.assert_close(w.detach()[row], ref.detach(), rtol=1e-6, atol=1e-7)


def test_sparse_row_adam_refuses_dense_gradients():
    w = torch.zeros(3, 2, requires_grad=True)
    w.grad = torch.ones(3, 2)
    with pytest.raises(TypeError, match="sparse row gradients"):
        SparseRowAdam([w]).step()


def test_memory_and_compute_parameters_are_separated():
    mod = make_engram(lanes=2)
    counts = mod.parameter_counts()
    assert counts["memory"] == mod.table.weight.numel() == int(mod.sizes.sum()) * 4
    assert counts["memory"] + counts["compute"] == sum(p.numel() for p in mod.parameters())
    assert counts["active_memory_per_token"] == 2 * 8
    assert mod.memory_parameters() == [mod.table.weight]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="multiple of heads"):
        Engram(D, VOCAB, dim=10, heads=4)
    with pytest.raises(ValueError, match="layer_ids"):
        Engram(D, VOCAB, layer_id=3, layer_ids=(1, 2))
    with pytest.raises(ValueError, match="orders"):
        Engram(D, VOCAB, orders=(2, 2))
    mod = make_engram()
    with pytest.raises(ValueError, match=r"\[B, T, 16\]"):
        mod(torch.randn(2, 5, 4, D), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens"):
        mod(torch.randn(2, 5, D), torch.zeros(2, 4, dtype=torch.long))


def test_a_compression_map_set_later_hashes_as_one_given_when_built():
    from archc.training.data import ByteTokenizer

    table, count = compression_table(ByteTokenizer().decode, 256)
    kw = dict(orders=(2, 3), heads=2, slots=61, dim=8, pad_id=ord("A"))
    torch.manual_seed(0)
    built = Engram(16, 256, compression=table, **kw).double()
    loaded = Engram(16, 256, **kw).double()
    assert loaded.pad_id == ord("A")
    loaded.load_state_dict(built.state_dict())  # a checkpoint carries the map: the pad id follows it
    assert torch.equal(loaded.compression, table) and loaded.pad_id == int(table[ord("A")]) != ord("A")
    later = Engram(16, 256, **kw).double()
    later.load_state_dict({k: v for k, v in built.state_dict().items() if k not in ("compression", "multipliers")},
                          strict=False)
    later.use_compression(table)
    assert later.compressed_vocab == count and torch.equal(later.multipliers, built.multipliers)
    h, tokens = torch.randn(2, 9, 16, dtype=torch.float64), torch.randint(ord("a"), ord("z") + 1, (2, 9))
    torch.testing.assert_close(later(h, tokens), built(h, tokens), rtol=0, atol=0)
    assert torch.equal(later.indices(tokens - 32), later.indices(tokens))  # the same text in capitals: same rows
