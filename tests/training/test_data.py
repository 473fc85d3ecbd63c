"""Data layer for `archc train`: tokenizers, corpora, splits, batches, eval windows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from archc.training.data import (
    Batches,
    BPETokenizer,
    ByteTokenizer,
    DataError,
    Dataset,
    encode_documents,
    eval_windows,
    load_corpus,
    make_dataset,
    make_tokenizer,
    split_documents,
)

TEXT = "Grüße, 世界! naïve café — emoji 🎉\n\ttabs and <|endoftext|> literal"


@pytest.fixture(scope="module")
def small_docs():
    return load_corpus("pydoc")[:20]


@pytest.fixture(scope="module")
def bpe(small_docs):
    return BPETokenizer.train(small_docs, 400)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8")) and max(ids) < tok.vocab_size == 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(torch.tensor(ids)) == TEXT
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte char does not raise


def test_bpe_train_save_load_round_trip(bpe, small_docs, tmp_path):
    assert bpe.vocab_size == 400 and bpe.eos_id == 0 and bpe.separator == [0]
    ids = bpe.encode(TEXT)
    assert bpe.decode(ids) == TEXT and 0 not in ids  # the literal stays text
    assert len(bpe.encode(small_docs[0])) < 0.7 * len(small_docs[0].encode())  # it compresses
    path = tmp_path / "tok.json"
    bpe.save(path)
    json.loads(path.read_text())  # plain JSON
    again = BPETokenizer.load(path)
    assert again.vocab_size == 400 and again.encode(TEXT) == ids and again.decode(ids) == TEXT
    assert make_tokenizer(str(path)).encode(TEXT) == ids
    assert BPETokenizer.train(small_docs, 400)._tok.to_str() == bpe._tok.to_str()  # deterministic
    assert bpe.encode_batch(["ab", TEXT]) == [bpe.encode("ab"), ids]


def test_make_tokenizer(small_docs):
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    assert make_tokenizer("bpe:300", small_docs).vocab_size == 300
    for bad, msg in [("bpe:x", "bpe:N"), ("bpe:100", "at least 257"), ("word", "byte, bpe:N"),
                     ("missing.json", "no such tokenizer")]:
        with pytest.raises(DataError, match=msg):
            make_tokenizer(bad, small_docs)
    with pytest.raises(DataError, match="needs text"):
        make_tokenizer("bpe:300")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        BPETokenizer.load(__file__)


def test_builtin_corpora():
    pydoc = load_corpus("pydoc")
    assert len(pydoc) > 50 and all(isinstance(d, str) and d for d in pydoc)
    stdlib = load_corpus("stdlib", max_bytes=300_000)
    assert stdlib and sum(len(d.encode()) for d in stdlib) <= 300_000
    assert any("def " in d for d in stdlib)
    reasoning = load_corpus("reasoning:40")
    assert len(reasoning) == 40 and all("####" in d for d in reasoning)
    assert load_corpus("reasoning:40") == reasoning


def test_split_is_by_whole_documents_and_seeded():
    docs = [f"<doc {i:03d}> " + "text " * (i % 7) for i in range(200)]
    ds = make_dataset(docs, "byte", val_fraction=0.1, seed=3)
    assert ds.documents == (180, 20)
    train, val = (ByteTokenizer().decode(t.tolist()) for t in (ds.train, ds.val))
    in_train = {d for d in docs if d + "\n\n" in train}
    in_val = {d for d in docs if d + "\n\n" in val}
    assert len(in_train) == 180 and len(in_val) == 20 and in_train | in_val == set(docs)
    assert ds.train.dtype == torch.long and ds.train.ndim == 1
    assert torch.equal(make_dataset(docs, "byte", 0.1, seed=3).val, ds.val)
    assert not torch.equal(make_dataset(docs, "byte", 0.1, seed=4).val, ds.val)
    tr, va = split_documents(10, 0.05, 0)
    assert len(va) == 1 and sorted(tr + va) == list(range(10))
    assert split_documents(10, 0.0, 0) == (list(range(10)), [])


def test_make_dataset_pydoc_and_bpe(tmp_path):
    ds = make_dataset("pydoc")
    assert isinstance(ds, Dataset) and ds.vocab_size == 256 and ds.name == "pydoc"
    assert len(ds.val) > 1000 and len(ds.train) > 10 * len(ds.val)
    assert "pydoc" in ds.summary()
    docs = load_corpus("pydoc")[:30]
    path = tmp_path / "bpe.json"
    bpe = make_dataset(docs, "bpe:300", save_tokenizer=path)
    assert bpe.vocab_size == 300 and int(bpe.train.max()) < 300 and path.exists()
    assert (bpe.train == bpe.tokenizer.eos_id).sum() == bpe.documents[0]
    with pytest.raises(DataError, match="only bpe"):
        make_dataset(docs, "byte", save_tokenizer=tmp_path / "x.json")


def test_paths_txt_dir_jsonl(tmp_path):
    (tmp_path / "one.txt").write_text("hello world " * 50)
    ds = make_dataset(tmp_path / "one.txt", val_fraction=0.2)
    assert len(ds.train) + len(ds.val) == 602 and len(ds.val) == 120
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / ("sub" if i % 2 else "") / f"{i}.txt").write_text(f"document {i}")
    assert sorted(load_corpus(folder)) == [f"document {i}" for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": f"doc {i}", "id": i}) for i in range(4)) + "\n\n")
    assert load_corpus(jsonl) == [f"doc {i}" for i in range(4)]


def test_token_files_are_memmapped(tmp_path):
    ids = (np.arange(5000) * 7 % 300).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    np.save(tmp_path / "t.npy", ids.astype(np.int32))
    got = load_corpus(tmp_path / "t.bin")
    assert isinstance(got, np.memmap) and np.array_equal(got, ids)
    npy = load_corpus(tmp_path / "t.npy")
    assert isinstance(npy, np.memmap) and np.array_equal(npy, ids)
    with pytest.raises(DataError, match="token id 299"):
        make_dataset(tmp_path / "t.bin", "byte")
    tok = tmp_path / "tok.json"
    BPETokenizer.train(load_corpus("pydoc")[:10], 300).save(tok)
    ds = make_dataset(tmp_path / "t.bin", str(tok), val_fraction=0.1)
    assert len(ds.train) == 4500 and len(ds.val) == 500 and ds.documents == (0, 0)
    batch = Batches(ds.train, 4, 16, seed=0).get(0)
    assert batch.dtype == torch.long and batch.shape == (4, 16)
    starts = [int(np.flatnonzero(ids == int(row[0]))[0]) for row in batch]  # ids repeat every 300
    assert all(np.array_equal(ids[s:s + 16], row.numpy()) for s, row in zip(starts, batch))
    windows = list(eval_windows(ds.val, 8, 64))
    assert np.array_equal(torch.cat([w.flatten() for w in windows]).numpy(), ids[4500:])


@pytest.mark.parametrize("name, match", [
    ("pydocs", "did you mean 'pydoc'"),
    ("nonsense", "no such corpus 'nonsense'; corpora: pydoc"),
    ("missing/dir", "no such file or directory"),
    ("missing.txt", "no such file or directory"),
    ("reasoning:many", "reasoning:N"),
])
def test_bad_corpus_names(name, match):
    with pytest.raises(DataError, match=match) as info:
        load_corpus(name)
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = {
        "empty": "no .txt files",
        "a.jsonl": 'no string field "text"',
        "b.jsonl": "not JSON",
        "c.bin": "odd number of bytes",
        "d.npy": "1-D integer",
        "e.csv": "unsupported corpus file",
    }
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    (tmp_path / "b.jsonl").write_text("{not json\n")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01\x02")
    np.save(tmp_path / "d.npy", np.zeros((2, 3), np.float32))
    (tmp_path / "e.csv").write_text("a,b\n")
    for name, match in cases.items():
        with pytest.raises(DataError, match=match):
            load_corpus(tmp_path / name)
    with pytest.raises(DataError, match="a.jsonl:2"):
        load_corpus(tmp_path / "a.jsonl")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="val_fraction"):
        make_dataset(tmp_path / "blank.txt", val_fraction=1.0)


@pytest.fixture(scope="module")
def tokens():
    return encode_documents(ByteTokenizer(), load_corpus("pydoc")[:10])


def test_batches_are_a_function_of_seed_and_step(tokens):
    a, b = Batches(tokens, 8, 32, seed=1), Batches(tokens, 8, 32, seed=1)
    assert a.get(5).shape == (8, 32) and a.get(5).dtype == torch.long
    assert torch.equal(a.get(5), b.get(5))
    assert torch.equal(a.get(5), a.get(5))  # no hidden state
    assert not torch.equal(a.get(5), a.get(6))
    assert not torch.equal(a.get(5), Batches(tokens, 8, 32, seed=2).get(5))
    text = ByteTokenizer().decode(tokens.tolist()).encode()
    assert all(bytes(row.tolist()) in text for row in a.get(3))  # real windows


def test_batches_state_round_trip(tokens):
    run = Batches(tokens, 4, 16, seed=7)
    it = iter(run)
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(run.state_dict()))
    assert state["step"] == 3
    resumed = Batches(tokens, 4, 16, seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed)), next(it)) and resumed.step == 4
    assert torch.equal(first[1], run.get(1))
    with pytest.raises(DataError, match="batch_size=4"):
        Batches(tokens, 8, 16).load_state_dict(state)
    with pytest.raises(DataError, match="fewer than seq_len"):
        Batches(tokens[:10], 4, 16)


@pytest.mark.parametrize("n, batch_size, seq_len, max_windows",
                         [(1000, 4, 64, None), (1024, 4, 64, None), (63, 2, 64, None),
                          (1000, 3, 100, 5), (1000, 3, 100, 10)])
def test_eval_windows_cover_val_once(n, batch_size, seq_len, max_windows):
    val = torch.arange(n)
    windows = list(eval_windows(val, batch_size, seq_len, max_windows))
    flat = torch.cat([w.flatten() for w in windows])
    covered = min(n, max_windows * seq_len) if max_windows else n
    assert torch.equal(flat, val[:covered])  # consecutive, non-overlapping, each token once
    assert all(w.shape[0] <= batch_size and w.dtype == torch.long for w in windows)
    assert all(w.shape[1] == seq_len for w in windows[:-1])
    assert list(eval_windows(val[:0], 2, 8)) == []
