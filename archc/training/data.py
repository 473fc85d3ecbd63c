"""Data for ``archc train``: tokenizers, corpora, train/val splits, batches.

Next-token language modelling, nanoGPT style: a corpus becomes one long
stream of token ids per split, and training draws random windows from it.

Design choices:

- No downloads. Built-in corpora come from what CPython ships; sizes measured
  on CPython 3.11.7 (they change with the Python version):

  =============  ========================================  ============  ========
  name           what                                      UTF-8 bytes   docs
  =============  ========================================  ============  ========
  ``pydoc``      ``pydoc_data.topics.topics`` (help texts)       466,117        79
  ``stdlib``     standard-library ``*.py`` sources          11,354,162       674
  ``reasoning``  synthetic DAG arithmetic (``synthetic``)    1,290,606    10,000
  =============  ========================================  ============  ========

  ``stdlib`` skips ``site-packages``, ``test``/``tests`` and ``idlelib`` and
  stops before ``max_bytes`` (20 MB); ``reasoning`` takes ``reasoning:N`` for
  N problems (default 10,000, seed 0; about 1.5 s to generate).
- Paths: a ``.txt`` file (one document), a directory of ``.txt`` files (one
  each, recursive, sorted), a ``.jsonl`` file (field ``"text"``), or token ids
  already made: ``.bin`` (raw uint16, nanoGPT's format) or ``.npy``, mapped
  with ``numpy.memmap`` / ``np.load(mmap_mode="r")`` and never copied.
- Tokenizers: bytes (256 ids, lossless for any text) or byte-level BPE from
  the ``tokenizers`` package, with ``<|endoftext|>`` as id 0 (text that spells
  it out stays ordinary text). BPE is trained on the training documents only
  (a seeded sample of at most ``max_chars`` characters), saved as JSON.
  Cost on 2 CPU cores: ``pydoc`` with bpe:2048 about 1 s; ``stdlib`` with
  bpe:4096 about 7 s to train and 20-40 s to encode the 11 MB.
- Documents are joined with ``tokenizer.separator``: the BPE end-of-text id,
  or two newlines for bytes (256 byte values leave no spare id). Each
  document is followed by one separator.
- The split is by whole documents: a ``random.Random(seed)`` shuffle of the
  document order, the last ``val_fraction`` of it is validation, so no
  validation text is ever trained on. A corpus of one document (or token ids)
  has no documents to split: its last ``val_fraction`` of tokens is val.
- ``Batches.get(step)`` depends only on (seed, step): a torch.Generator seeded
  with a hash of both picks the window starts. Resuming needs only the step;
  the state dict is a few ints, JSON-able.
- Windows are ``[B, T]``: the model reads tokens ``0..T-2`` and is scored on
  predicting ``1..T-1`` (targets = the window shifted by one). Evaluation
  uses the same convention over non-overlapping consecutive windows that cover
  the val tokens exactly once; the first token of each window is context
  only, so perplexity = exp(total NLL / scored tokens) over the scored ones.
- Nothing is cached on disk except a tokenizer file when asked for one.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import numpy as np
import torch

from archc.training import synthetic

CORPORA = ("pydoc", "stdlib", "reasoning")
TOKEN_SUFFIXES = (".bin", ".npy")
EOS = "<|endoftext|>"
MAX_BPE_VOCAB = 1 << 20  # bpe:N is refused above this, before the tokenizers library sees it
_CORPUS_HELP = "corpora: pydoc, stdlib, reasoning, or a path to .txt/.jsonl/.bin/.npy"


class DataError(Exception):
    """A corpus or tokenizer that cannot be used; the message says what to do."""


# --- tokenizers ---------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes: 256 ids, no training, no unknown tokens."""

    name = "byte"
    vocab_size = 256
    eos_id = None
    separator = [10, 10]  # "\n\n"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def byte_lengths(self) -> list[int]:
        """The UTF-8 bytes each id stands for (bits per byte divide by their sum)."""
        return [1] * self.vocab_size


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenization) from the ``tokenizers`` package."""

    def __init__(self, tok):
        tok.encode_special_tokens = True  # "<|endoftext|>" inside text is just text
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOS)
        self.separator = [self.eos_id]
        self.name = f"bpe:{self.vocab_size}"

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, seed: int = 0,
              max_chars: int = 5_000_000) -> BPETokenizer:
        """Train on ``texts`` (a seeded sample of whole texts past ``max_chars``)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise DataError(f"BPE vocab_size must be at least 257 (256 bytes + {EOS}); "
                            f"got {vocab_size}; use 'byte' for a 256-id vocabulary")
        texts = list(texts)
        if sum(map(len, texts)) > max_chars:
            order = random.Random(seed).sample(range(len(texts)), len(texts))
            kept, total = [], 0
            for i in order:
                if total + len(texts[i]) > max_chars and kept:
                    continue
                kept.append(i)
                total += len(texts[i])
            texts = [texts[i] for i in sorted(kept)]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    def save(self, path) -> None:
        Path(path).write_text(self._tok.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, path) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_str(Path(path).read_text(encoding="utf-8")))
        except Exception as e:  # OSError, or the tokenizers parser's plain Exception
            raise DataError(f"cannot read tokenizer {str(path)!r} ({e}); "
                            "pass a file written by BPETokenizer.save") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # no offsets
        return [e.ids for e in encode(list(texts))]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def byte_lengths(self) -> list[int]:
        """The UTF-8 bytes each id stands for: a byte-level token's characters are one byte each; the separator
        between documents stands for none."""
        return [0 if i == self.eos_id else len(self._tok.id_to_token(i) or "") for i in range(self.vocab_size)]


def make_tokenizer(name, texts: Sequence[str] = (), seed: int = 0):
    """``"byte"``, ``"bpe:N"`` (trained on ``texts``), a saved BPE ``.json``, or a tokenizer."""
    if not isinstance(name, (str, os.PathLike)):
        return name
    name = str(name)
    if name == "byte":
        return ByteTokenizer()
    if name.startswith("bpe:"):
        try:
            size = int(name[4:])
        except ValueError:
            raise DataError(f"bad tokenizer {name!r}; write bpe:N with N the vocabulary "
                            "size, e.g. bpe:4096") from None
        if size > MAX_BPE_VOCAB:
            raise DataError(f"--tokenizer {name}: at most bpe:{MAX_BPE_VOCAB} (the largest vocabularies in use "
                            "have about 256K tokens; far larger sizes abort the tokenizers library)")
        texts = list(texts)
        if not texts:
            raise DataError(f"{name} needs text to train on; pre-tokenized corpora need "
                            "'byte' or a saved tokenizer .json")
        return BPETokenizer.train(texts, size, seed=seed)
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise DataError(f"no such tokenizer file {name!r}")
        return BPETokenizer.load(name)
    raise DataError(f"unknown tokenizer {name!r}; tokenizers: byte, bpe:N, "
                    "or a tokenizer .json saved by an earlier run")


# --- corpora --------------------------------------------------------------------------


def load_corpus(name, *, max_bytes: int = 20_000_000, seed: int = 0):
    """Documents (``list[str]``), or token ids (a 1-D numpy array) for ``.bin``/``.npy``."""
    name = str(name)
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [topics[k] for k in sorted(topics)]
    if name == "stdlib":
        return _stdlib_sources(max_bytes)
    if name == "reasoning" or name.startswith("reasoning:"):
        try:
            n = int(name.partition(":")[2] or 10_000)
        except ValueError:
            raise DataError(f"bad corpus {name!r}; write reasoning:N, e.g. reasoning:20000") from None
        return synthetic.reasoning_corpus(n, seed=seed)
    path = Path(name)
    if not path.exists():
        if os.sep in name or "/" in name or path.suffix:
            raise DataError(f"no such file or directory {name!r}; {_CORPUS_HELP}")
        close = difflib.get_close_matches(name, CORPORA, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise DataError(f"no such corpus {name!r}; {hint}{_CORPUS_HELP}")
    if not path.is_dir() and not path.is_file():
        raise DataError(f"{name!r} is not a regular file or a directory (a FIFO, device or socket could block "
                        f"or never end); {_CORPUS_HELP}")
    try:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not files:
                raise DataError(f"no .txt files in directory {name!r}; {_CORPUS_HELP}")
            return [p.read_text(encoding="utf-8", errors="replace") for p in files]
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return [path.read_text(encoding="utf-8", errors="replace")]
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".bin":
            if path.stat().st_size % 2:
                raise DataError(f"{name!r} has an odd number of bytes; .bin files hold "
                                "uint16 token ids (numpy tofile)")
            return np.memmap(path, dtype=np.uint16, mode="r")
        if suffix == ".npy":
            tokens = np.load(path, mmap_mode="r", allow_pickle=False)
            if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
                raise DataError(f"{name!r} holds {tokens.dtype} with shape {tokens.shape}; "
                                "save a 1-D integer array of token ids")
            return tokens
    except OSError as e:
        raise DataError(f"cannot read {name!r} ({e.strerror or e}); check the path "
                        "and its permissions") from None
    except ValueError as e:
        raise DataError(f"cannot read {name!r} ({e}); {_CORPUS_HELP}") from None
    raise DataError(f"unsupported corpus file {name!r}; {_CORPUS_HELP}")


def _stdlib_sources(max_bytes: int) -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        paths += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    docs, total = [], 0
    for p in sorted(paths):
        text = p.read_text(encoding="utf-8", errors="replace")
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            break
        docs.append(text)
        total += size
    return docs


def _read_jsonl(path: Path) -> list[str]:
    docs = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not JSON ({e.msg}); write one object "
                                'per line, like {"text": "..."}') from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f'{path}:{lineno}: no string field "text"; write one object '
                                'per line, like {"text": "..."}')
            docs.append(record["text"])
    return docs


# --- datasets -------------------------------------------------------------------------


@attrs.frozen
class Dataset:
    name: str
    tokenizer: object
    train: object  # 1-D int64 torch.Tensor, or a numpy memmap of token ids
    val: object
    documents: tuple[int, int] = (0, 0)  # (train, val); (0, 0): the token stream was split

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def summary(self) -> str:
        docs = f"{self.documents[0]:,}/{self.documents[1]:,} docs, " if any(self.documents) else ""
        return (f"{self.name}: {docs}{len(self.train):,} train / {len(self.val):,} val tokens, "
                f"{self.tokenizer.name} vocab {self.vocab_size:,}")


def encode_documents(tokenizer, docs: Sequence[str]) -> torch.Tensor:
    """All documents as one int64 stream, each followed by ``tokenizer.separator``."""
    if isinstance(tokenizer, ByteTokenizer):
        sep = bytes(tokenizer.separator)
        data = b"".join(d.encode("utf-8") + sep for d in docs)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    ids: list[int] = []
    for doc in tokenizer.encode_batch(docs):
        ids += doc
        ids += tokenizer.separator
    return torch.tensor(ids, dtype=torch.long)


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and val document indices (each in corpus order) from a seeded shuffle."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if val_fraction > 0 else 0
    return sorted(order[: n - n_val]), sorted(order[n - n_val:])


def make_dataset(corpus="pydoc", tokenizer="byte", val_fraction: float = 0.05, seed: int = 0,
                 *, max_bytes: int = 20_000_000, save_tokenizer=None) -> Dataset:
    """Load, tokenize and split a corpus (a name, a path, or a list of documents)."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if isinstance(corpus, (str, os.PathLike)):
        name, docs = str(corpus), load_corpus(corpus, max_bytes=max_bytes)
    else:
        name, docs = "documents", list(corpus)
    if len(docs) == 0:
        raise DataError(f"corpus {name!r} is empty; give it some text")
    if isinstance(docs, np.ndarray):  # token ids: no documents, split the stream
        tok = make_tokenizer(tokenizer, seed=seed)
        top = int(docs.max())
        if docs.dtype.kind == "i" and (low := int(docs.min())) < 0:
            raise DataError(f"{name!r} has token id {low}; token ids are 0 or more")
        if top >= tok.vocab_size:
            raise DataError(f"{name!r} has token id {top} but tokenizer {tok.name} has "
                            f"{tok.vocab_size} ids; pass the tokenizer .json it was made with")
        cut = len(docs) - int(len(docs) * val_fraction)
        return _finish(Dataset(name, tok, docs[:cut], docs[cut:]), save_tokenizer)
    if len(docs) == 1:  # one document: split its token stream
        tok = make_tokenizer(tokenizer, docs, seed=seed)
        tokens = encode_documents(tok, docs)
        cut = len(tokens) - int(len(tokens) * val_fraction)
        return _finish(Dataset(name, tok, tokens[:cut], tokens[cut:]), save_tokenizer)
    train_idx, val_idx = split_documents(len(docs), val_fraction, seed)
    train_docs, val_docs = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
    tok = make_tokenizer(tokenizer, train_docs, seed=seed)
    train, val = encode_documents(tok, train_docs), encode_documents(tok, val_docs)
    return _finish(Dataset(name, tok, train, val, (len(train_docs), len(val_docs))), save_tokenizer)


def check_val(ds: Dataset) -> None:
    """Refuse a validation split too short to score a single token (a window reads one and predicts the next)."""
    if len(ds.val) < 2:
        raise DataError(f"corpus {ds.name!r}: the validation split has {len(ds.val)} token(s); evaluation needs at "
                        "least 2 (one read, one predicted); use a bigger corpus")


def _finish(ds: Dataset, save_tokenizer) -> Dataset:
    if save_tokenizer is not None:
        if not isinstance(ds.tokenizer, BPETokenizer):
            raise DataError(f"tokenizer {ds.tokenizer.name} has no file to save; "
                            "only bpe:N tokenizers are saved")
        ds.tokenizer.save(save_tokenizer)
    return ds


# --- batches --------------------------------------------------------------------------


def _windows(tokens, starts, length: int) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens[torch.as_tensor(starts)[:, None] + torch.arange(length)].long()
    rows = [np.asarray(tokens[s: s + length], dtype=np.int64) for s in starts.tolist()]
    return torch.from_numpy(np.stack(rows))


class Batches:
    """Random training windows that depend only on (seed, step).

    ``get(step)`` -> LongTensor[batch_size, seq_len]; iterating yields
    ``get(self.step)`` and advances ``self.step`` (the next step to draw).
    """

    def __init__(self, tokens, batch_size: int, seq_len: int, seed: int = 0):
        if len(tokens) < seq_len:
            raise DataError(f"{len(tokens):,} tokens is fewer than seq_len={seq_len}; "
                            "use a shorter sequence length or a bigger corpus")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.step = 0

    def get(self, step: int) -> torch.Tensor:
        digest = hashlib.blake2b(f"{self.seed},{step}".encode(), digest_size=8).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
        starts = torch.randint(0, len(self.tokens) - self.seq_len + 1, (self.batch_size,),
                               generator=gen)
        return _windows(self.tokens, starts, self.seq_len)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            batch = self.get(self.step)
            self.step += 1
            yield batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "num_tokens": len(self.tokens)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("batch_size", "seq_len", "num_tokens"):
            if key in state and state[key] != self.state_dict()[key]:
                raise DataError(f"checkpoint has {key}={state[key]} but this run has "
                                f"{self.state_dict()[key]}; resume with the same corpus, "
                                "batch size and sequence length, or start a fresh run")
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_windows(tokens, batch_size: int, seq_len: int,
                 max_windows: int | None = None) -> Iterator[torch.Tensor]:
    """Consecutive non-overlapping windows over ``tokens``, ``batch_size`` at a time.

    Together the windows cover every token exactly once (up to ``max_windows``
    windows); a last partial window comes alone, as ``[1, r]`` with ``r <
    seq_len``. Score tokens ``1..T-1`` of each window (the first is context).
    """
    n = len(tokens)
    starts = list(range(0, n - seq_len + 1, seq_len))
    tail = starts[-1] + seq_len if starts else 0
    if max_windows is not None:
        starts = starts[:max_windows]
    for i in range(0, len(starts), batch_size):
        yield _windows(tokens, np.array(starts[i: i + batch_size]), seq_len)
    if tail < n and (max_windows is None or len(starts) < max_windows):
        yield _windows(tokens, np.array([tail]), n - tail)
