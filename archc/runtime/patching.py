"""Byte patching for the Byte Latent Transformer (BLT, arXiv 2412.09871): algorithms.md §6.

What generated code calls for `hash_ngrams(...)`, `patch(...)` and `unpatch(...)`;
the rules and constants are those of the reference (facebookresearch/blt,
`bytelatent/data/patcher.py`, `bytelatent/model/blt.py`) and of transformers'
port (`models/blt/modeling_blt.py`), against which the tests check them.

Bytes. Ids 0..3 are specials (BOE 0, BOS 1, EOS 2, BPE delimiter 3), byte b
is b + 4 (`OFFSET`), padding −1; 260 ids.

Hashed byte n-grams (`byte_ngram_hash`, `HashNgramEmbedding`). For n-gram size
n and hash function f: the window of the n ids ending at t (zeros — BOE —
before the start), hash = Σ_i id_{t−n+1+i} · p_f^i in int64 arithmetic that
wraps as torch's does, then mod `buckets` (non-negative). The byte embedding
of the local encoder is added to Σ_{f, n} E_{f,n}[hash]; the tables are one
embedding, function-major then size, as in both references.

Entropy (`entropy`): of the small byte LM's next-byte distribution, in nats.

Patch starts. Positions 0 and 1 always start a patch (the first patch is one
byte). The entropy that decides whether position t ≥ 2 starts a patch is the
one computed at t − 1 (its prediction of byte t); call it H'_j = H_{j+1}
for j = t − 2:
- global threshold: start iff H'_j > θ (default θ = 1.335442066192627);
- approximate monotonic: position 2 starts, then iff H'_j − H'_{j−1} > θ;
- combined (θ and `threshold_add` θ_a): position 2 starts, position 3 never
  (the reference's "previous was not a start" tests its initial mask, in
  which only position 2 is set), then iff H'_j − H'_{j−1} > θ_a and H'_j > θ;
- no threshold: the T // patch_size − 2 largest H' (torch.topk) are starts;
- space: a patch ends after a byte that is not a letter, digit or UTF-8
  continuation byte, unless the byte before also was such (runs of spaces
  stay together, with the next word), and after every special id;
- static: patches of `patch_size` bytes, the last one shorter (with
  `first_alone`, the first byte alone and then patches of `patch_size`, so
  that the decoder's one-patch shift stays causal, as every other rule's).
With `include_next_token` (as the BLT forward uses it) the positions run to
T inclusive: the last entropy decides whether the byte after the sequence
starts a patch, and the lengths sum to T + 1. The threshold rules are causal
— a prefix's starts are the prefix of the starts — so generation can decide
patches on the fly; top-k is not.
`max_patch_length` splits longer patches into pieces of that length (the
last piece shorter). Lengths are [B, P], right-padded with zeros.

Patch ids and the cross-attention masks. `patch_ids[b, t]` is the patch of
byte t (positions past the last patch get the id P, a patch with no
queries). The encoder's queries are `k` per patch, initialised from the
max-pooled byte states (`patch_reduce`); a patch's queries see only its own
bytes: `encoder_cross_mask` [B, P·k, T]. The decoder shifts by one patch:
its ids come from the lengths without the first patch, so byte t reads the
global output of the patch that ends at or before t — the last byte of patch
j and the bytes of patch j + 1 but its last read patch j — and the byte it
predicts, t + 1, is never inside what it reads: `decoder_cross_mask`
[B, T, P·k]. Both masks optionally widen to the last `window` patches.
Rows that see nothing (patches of length 0, bytes past the end) must give
zeros: `masked_attention` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BOE_ID", "BOS_ID", "BPE_ID", "BYTE_VOCAB", "DEFAULT_THRESHOLD", "EOS_ID", "HASH_PRIMES", "MODES", "OFFSET",
    "PAD_ID", "HashNgramEmbedding", "Patcher", "byte_ngram_hash", "decode_bytes", "decoder_cross_mask",
    "decoder_patch_ids", "encode_bytes", "encoder_cross_mask", "entropy", "masked_attention", "patch_ids_from_lengths",
    "patch_lengths", "patch_lengths_from_starts", "patch_reduce", "patch_start_mask", "space_start_mask",
    "split_long_patches", "static_patch_lengths", "unpatch",
]

BOE_ID, BOS_ID, EOS_ID, BPE_ID = 0, 1, 2, 3
OFFSET = 4  # byte b is id b + OFFSET
PAD_ID = -1
BYTE_VOCAB = 256 + OFFSET
DEFAULT_THRESHOLD = 1.335442066192627  # the reference's PatcherArgs.threshold (transformers' patching_threshold)
HASH_PRIMES = (1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899, 9576890767, 3628273133,
               2860486313, 5463458053, 3367900313)
MODES = ("entropy", "space", "static")


# ----------------------------------------------------------------------------- bytes


def encode_bytes(text: str | bytes, *, bos: bool = True, eos: bool = False) -> list[int]:
    """UTF-8 bytes as ids (b + 4), with BOS / EOS ids around them."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return [BOS_ID] * bos + [b + OFFSET for b in data] + [EOS_ID] * eos


def decode_bytes(ids) -> bytes:
    """The bytes of ids, dropping specials and padding."""
    return bytes(int(i) - OFFSET for i in ids if OFFSET <= int(i) < BYTE_VOCAB)


# ----------------------------------------------------------------------------- hashed n-grams


def byte_ngram_hash(ids: torch.Tensor, size: int, function: int = 0, buckets: int = 30000) -> torch.Tensor:
    """[B, T] ids -> [B, T] bucket of the `size`-gram ending at each position (hash function `function`)."""
    if size < 1 or buckets < 1:
        raise ValueError(f"byte_ngram_hash: size and buckets must be positive, got {size}, {buckets}")
    prime = torch.tensor(HASH_PRIMES[function % len(HASH_PRIMES)], dtype=torch.int64, device=ids.device)
    with torch.no_grad():
        padded = torch.cat((ids.new_zeros(ids.shape[0], size - 1), ids.long()), dim=1)
        windows = padded.unfold(1, size, 1)  # [B, T, size], oldest first
        powers = prime ** torch.arange(size, device=ids.device)  # int64, wrapping as the references'
        return (windows * powers).sum(dim=-1) % buckets


class HashNgramEmbedding(nn.Module):
    """Σ over hash functions f and n-gram sizes n of E_{f,n}[hash_{f,n}(ids)]: [B, T] -> [B, T, dim].

    One table of functions·len(sizes)·buckets rows, function-major: the layout of
    transformers' `encoder_hash_tok_embedding` (and the reference's ModuleList, concatenated)."""

    def __init__(self, dim: int, sizes=(3, 4, 5, 6, 7, 8), functions: int = 1, buckets: int = 500002) -> None:
        super().__init__()
        self.sizes, self.functions, self.buckets = tuple(int(s) for s in sizes), int(functions), int(buckets)
        self.table = nn.Embedding(self.functions * len(self.sizes) * self.buckets, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        total = None
        for i, (function, size) in enumerate((f, n) for f in range(self.functions) for n in self.sizes):
            rows = self.table(byte_ngram_hash(ids, size, function, self.buckets) + i * self.buckets)
            total = rows if total is None else total + rows
        return total

    def extra_repr(self) -> str:
        return f"sizes={list(self.sizes)}, functions={self.functions}, buckets={self.buckets}"


# ----------------------------------------------------------------------------- entropy and patch starts


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """−Σ_v p log p of softmax(logits) over the last dim, in nats (fp32)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def patch_start_mask(entropies: torch.Tensor, *, threshold: float | None = DEFAULT_THRESHOLD,
                     threshold_add: float | None = None, monotonic: bool = False, patch_size: int | None = None,
                     include_next_token: bool = True) -> torch.Tensor:
    """[B, T] entropies -> [B, T + include_next_token] bool: does each position start a patch (module doc)."""
    B, T = entropies.shape
    length = T + int(include_next_token)
    mask = torch.zeros(B, length, dtype=torch.bool, device=entropies.device)
    mask[:, :2] = True
    e = entropies[:, 1:].float()  # e[:, j] decides position j + 2
    if threshold is None:
        if patch_size is None:
            raise ValueError("patch_start_mask: give a threshold or a patch_size (top-k patching)")
        k = max(0, min(int(T // patch_size) - 2, e.shape[1]))
        starts = e.topk(k, dim=1).indices + 2
        mask.scatter_(1, starts.clamp(max=length - 1), starts < length)  # a start past the end is dropped
        return mask
    if e.shape[1] == 0:
        return mask
    rise = e[:, 1:] - e[:, :-1]
    first = torch.ones(B, 1, dtype=torch.bool, device=e.device)
    if monotonic:
        cond = torch.cat((first, rise > threshold), dim=1)
    elif threshold_add is not None:
        cond = torch.cat((first, (rise > threshold_add) & (e[:, 1:] > threshold)), dim=1)
        cond[:, 1:2] = False
    else:
        cond = e > threshold
    mask[:, 2:] = cond[:, :length - 2]
    return mask


def threshold_for_mean_length(entropies: torch.Tensor, mean: float) -> float:
    """The global entropy threshold at which 1 / `mean` of the positions that decide patch starts (2..T, from
    entropies[:, 1:] as in `patch_start_mask`) start one: patches of about `mean` bytes on these entropies."""
    return float(torch.quantile(entropies[:, 1:].flatten().float(), 1.0 - 1.0 / mean))


def space_start_mask(ids: torch.Tensor, include_next_token: bool = True) -> torch.Tensor:
    """[B, T] ids -> [B, T + include_next_token] bool: patches end after non-word bytes (module doc)."""
    b = ids - OFFSET
    end = ((b < ord("0")) | ((ord("9") < b) & (b < ord("A"))) | ((ord("Z") < b) & (b < ord("a")))
           | ((ord("z") < b) & (b < 0x80)) | (b >= 0xC0))
    end = torch.cat((end[:, :1], end[:, 1:] & ~end[:, :-1]), dim=1)  # a run of such bytes ends once
    end = end | (ids < OFFSET)
    first = torch.ones(ids.shape[0], 2, dtype=torch.bool, device=ids.device)
    return torch.cat((first, end[:, 1:]), dim=1)[:, :ids.shape[1] + int(include_next_token)]


def static_patch_lengths(batch: int, length: int, patch_size: int, device=None) -> torch.Tensor:
    """[batch, ceil(length / patch_size)]: patch_size each, the last one the remainder."""
    count = -(-length // patch_size)
    lengths = torch.full((batch, count), patch_size, dtype=torch.long, device=device)
    if length % patch_size:
        lengths[:, -1] = length % patch_size
    return lengths


def patch_lengths_from_starts(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] start mask -> [B, P] lengths (P = the most starts of any row), right-padded with 0."""
    B, L = mask.shape
    count = mask.sum(dim=1)
    P = int(count.max()) if B else 0
    pos = torch.arange(L, device=mask.device).expand(B, L)
    order = torch.argsort(torch.where(mask, pos, pos + L), dim=1)[:, :P]  # starts first, in order
    starts = torch.where(torch.arange(P, device=mask.device) < count[:, None], order, L)
    ends = torch.cat((starts[:, 1:], torch.full((B, 1), L, device=mask.device, dtype=starts.dtype)), dim=1)
    return ends - starts


def split_long_patches(lengths: torch.Tensor, max_length: int | None) -> torch.Tensor:
    """Each patch longer than max_length becomes pieces of max_length and a remainder; [B, P'] right-padded."""
    if max_length is None:
        return lengths
    if max_length < 1:
        raise ValueError(f"max_patch_length must be positive, got {max_length}")
    B, P = lengths.shape
    pieces = (lengths + max_length - 1) // max_length  # 0 for empty patches
    total = pieces.sum(dim=1)
    width = int(total.max()) if B else 0
    if width == 0 or P == 0:
        return lengths.new_zeros(B, width)
    ends = pieces.cumsum(dim=1)
    slot = torch.arange(width, device=lengths.device).expand(B, width).contiguous()
    src = torch.searchsorted(ends, slot, right=True).clamp(max=P - 1)  # the patch each piece comes from
    within = slot - (ends - pieces).gather(1, src)
    piece = (lengths.gather(1, src) - within * max_length).clamp(max=max_length)
    return torch.where(slot < total[:, None], piece, 0)


def patch_lengths(*, mode: str = "entropy", tokens: torch.Tensor | None = None, entropies: torch.Tensor | None = None,
                  threshold: float | None = DEFAULT_THRESHOLD, threshold_add: float | None = None,
                  monotonic: bool = False, patch_size: int = 4, max_patch_length: int | None = None,
                  include_next_token: bool = True, first_alone: bool = False) -> torch.Tensor:
    """The patcher: lengths [B, P] (zeros right) for `mode` in MODES, then `max_patch_length`."""
    if mode not in MODES:
        raise ValueError(f"patch: mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "entropy":
        if entropies is None:
            raise ValueError("patch: mode 'entropy' needs the entropies of the byte model")
        mask = patch_start_mask(entropies, threshold=threshold, threshold_add=threshold_add, monotonic=monotonic,
                                patch_size=patch_size, include_next_token=include_next_token)
        lengths = patch_lengths_from_starts(mask)
    elif mode == "space":
        if tokens is None:
            raise ValueError("patch: mode 'space' needs the byte ids")
        lengths = patch_lengths_from_starts(space_start_mask(tokens, include_next_token))
    else:
        source = tokens if tokens is not None else entropies
        if source is None:
            raise ValueError("patch: mode 'static' needs the byte ids (for their shape)")
        length = source.shape[1] + int(include_next_token)
        if first_alone and length > 1:
            rest = static_patch_lengths(source.shape[0], length - 1, patch_size, source.device)
            lengths = torch.cat((torch.ones_like(rest[:, :1]), rest), dim=1)
        else:
            lengths = static_patch_lengths(source.shape[0], length, patch_size, source.device)
    return split_long_patches(lengths, max_patch_length)


class Patcher(nn.Module):
    """A spec's `patch(...)`: lengths [B, P] from the byte ids and the entropies by one rule (`patch_lengths`'s
    options, no weights). Inside `fixed(lengths)` it returns the given lengths instead: a generator that decides
    the patches byte by byte, as the entropy model runs, hands them to the model this way."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.options = options
        self.given: torch.Tensor | None = None

    def forward(self, tokens: torch.Tensor, entropies: torch.Tensor | None = None) -> torch.Tensor:
        if self.given is not None:
            return self.given
        return patch_lengths(tokens=tokens, entropies=None if entropies is None else entropies.detach(),
                             **self.options)

    @contextlib.contextmanager
    def fixed(self, lengths: torch.Tensor) -> Iterator[None]:
        self.given = lengths
        try:
            yield
        finally:
            self.given = None

    @property
    def causal(self) -> bool:
        """Whether a prefix's patches are the prefix of the patches (all rules but top-k)."""
        return not (self.options.get("mode", "entropy") == "entropy" and self.options.get("threshold", 0) is None)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


# ----------------------------------------------------------------------------- ids and masks


def patch_ids_from_lengths(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[B, P] lengths -> [B, seq_len]: the patch of each position (P past the last patch)."""
    bounds = torch.cat((lengths.new_zeros(lengths.shape[0], 1), lengths.cumsum(dim=1)), dim=1)  # [B, P + 1]
    positions = torch.arange(seq_len, device=lengths.device)
    return (bounds[:, None, :] <= positions[None, :, None]).sum(dim=-1) - 1


def decoder_patch_ids(lengths: torch.Tensor, seq_len: int, boe: int = 0) -> torch.Tensor:
    """The decoder's one-patch shift: ids from the lengths without the first patch ([B, seq_len]).

    The first patch must hold one byte after `boe` BOE padding bytes (the reference's check)."""
    if lengths.shape[1] == 0 or bool((lengths[:, 0] != boe + 1).any()):
        raise ValueError(f"decoder_patch_ids: the first patch must be {boe + 1} byte(s) long "
                         f"(one byte after {boe} BOE), got {lengths[:, :1].flatten().tolist()}")
    return patch_ids_from_lengths(lengths[:, 1:], seq_len)


def encoder_cross_mask(patch_ids: torch.Tensor, num_patches: int, k: int = 1,
                       window: int | None = None) -> torch.Tensor:
    """[B, num_patches·k, T] bool: patch p's k queries see its own bytes (or those of the last `window` patches)."""
    q = torch.arange(num_patches, device=patch_ids.device)[None, :, None]
    kv = patch_ids[:, None, :]
    mask = (q == kv) if window is None else (kv <= q) & (q < kv + window)
    return mask.repeat_interleave(k, dim=1)


def decoder_cross_mask(patch_ids: torch.Tensor, num_patches: int, k: int = 1,
                       window: int | None = None) -> torch.Tensor:
    """[B, T, num_patches·k] bool from decoder ids: byte t sees patch ids[t] (or the `window` up to it)."""
    q = patch_ids[:, :, None]
    kv = torch.arange(num_patches, device=patch_ids.device)[None, None, :]
    mask = (q == kv) if window is None else (kv <= q) & (q < kv + window)
    return mask.repeat_interleave(k, dim=-1)


def patch_reduce(h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int, reduce: str = "amax") -> torch.Tensor:
    """[B, T, D] -> [B, num_patches, D]: max (or "mean", "sum") over each patch's bytes; empty patches 0."""
    B, T, D = h.shape
    out = h.new_zeros(B, num_patches + 1, D)  # one more row for the positions past the last patch
    index = patch_ids.clamp(max=num_patches)[..., None].expand(B, T, D)
    return out.scatter_reduce(1, index, h, reduce=reduce, include_self=False)[:, :num_patches]


def unpatch(patches: torch.Tensor, patch_ids: torch.Tensor) -> torch.Tensor:
    """[B, P, D] -> [B, T, D]: each position gets its patch's vector (0 past the last patch)."""
    B, P, D = patches.shape
    padded = torch.cat((patches, patches.new_zeros(B, 1, D)), dim=1)
    return padded.gather(1, patch_ids.clamp(max=P)[..., None].expand(-1, -1, D))


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax attention q [B, H, Q, d] over k, v [B, H, K, d] where mask [B, Q, K]; rows seeing nothing give 0."""
    sees = mask.any(dim=-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=(mask | ~sees)[:, None])
    return out * sees[:, None].to(out.dtype)

