"""Engram memory, as generated code calls it: `engram(x, tokens, orders=[2, 3], ...)` (algorithms.md §3).

Conditional memory by lookup (DeepSeek, arXiv 2601.07372; the public demo
`engram_demo_v1.py`): each position's suffix n-grams of (compressed) token
ids index hashed embedding tables, and a gate computed from the hidden state
decides how much of what was looked up enters the residual stream. Per layer:

1. Tokenizer compression: ids whose decoded text is equal after NFKC, NFD,
   accent stripping, lower-casing and collapsing whitespace share one id
   (`compression_table`); the model holds the map as a buffer (`compression=`
   when built, or `use_compression` later: the trainer sets it from its
   tokenizer for `compress=True` modules).
2. Suffix n-grams of the compressed ids for each order n in `orders`; places
   before the start of the sequence hold the (compressed) pad id.
3. Multi-head hashing: mix_n(t) = (x_t·m_0) XOR (x_{t-1}·m_1) XOR … XOR
   (x_{t-n+1}·m_{n-1}) with odd int64 multipliers drawn per layer (seed +
   10007·layer, bounded so that no product overflows); head j of order n
   takes mix_n(t) mod p_{n,j}, the p distinct primes ≥ `slots` shared out
   over all Engram layers (`table_sizes`), so every table has its own size.
4. Lookup: one table per (order, head) of p_{n,j} rows × dim/heads, stored as
   one embedding with offsets; the rows of all heads and orders concatenated
   give e_t [len(orders)·dim].
5. Gate per lane h: α = σ(signed-sqrt(<RMSNorm(W_K^h e_t), RMSNorm(h_t)> / √d)),
   signed-sqrt(z) = sign(z)·√max(|z|, 1e-6) as in the demo; the value
   v_t = W_V e_t is shared by the lanes; ṽ = α·v.
6. Short convolution: out = ṽ + SiLU(causal depthwise conv(RMSNorm per lane
   of ṽ)), kernel 4, dilation max(orders), no bias.

The caller adds the result to its stream (`x = x + engram(x, tokens)`, before
the block's attention in the demo). Inside residual lanes h is [B, T, n, d]
and `lanes` = n (one key projection and gate per lane); outside, [B, T, d].

The tables are memory, not compute: the indices depend only on the tokens,
so `prefetch(tokens)` can gather the rows ahead of the layer (from a table
kept in host memory, `keep_tables_on`) and `forward(..., rows=...)` uses
them; `keep_memory_on(model, "cpu")` does both for a whole model, gathering
every layer's rows when the model is called; `sparse=True` makes the table's gradient a sparse row gradient that
`SparseRowAdam` applies to the touched rows only.

Decoding (inside `archc.runtime.mixers.recurrent`): the module keeps the last
max(orders) − 1 compressed ids — the n-gram context of the next token — and
the convolution's last (kernel − 1)·dilation inputs, so one token at a time
gives the outputs of the whole sequence.

Init follows the demo (PyTorch defaults: N(0, 1) rows, default Linear and
Conv1d init); the paper's init is not public (algorithms.md §10.1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from archc.runtime.decoding import Decoding

__all__ = [
    "Engram", "SparseRowAdam", "compression_table", "hash_multipliers", "is_prime", "keep_memory_on", "ngram_hashes",
    "sparse_row_adam_", "table_sizes",
]

_LAYER_SEED_STRIDE = 10007  # the demo's PRIME_1: seed + 10007 · layer


# ----------------------------------------------------------------------------- tokenizer compression


def compression_table(decode: Callable[[list[int]], str], vocab_size: int) -> tuple[torch.Tensor, int]:
    """(map [vocab_size] old id -> compressed id, number of compressed ids), as the demo builds it.

    `decode([id])` is the token's text. Texts equal after the demo's normaliser
    share an id; a text with a replacement character (a partial UTF-8 byte
    sequence) keeps an id of its own; a text that normalises to nothing keeps itself.
    """
    # imported here: only where the table is built, never by generated modules
    from tokenizers import Regex, normalizers

    sentinel = "\ue000"
    normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), sentinel),
        normalizers.Strip(), normalizers.Replace(sentinel, " "),
    ])
    keys: dict[object, int] = {}
    table = torch.empty(vocab_size, dtype=torch.long)
    for tid in range(vocab_size):
        text = decode([tid])
        if "\ufffd" in text:
            key: object = ("id", tid)  # the demo keys these by the raw token string: unique per id
        else:
            key = normalizer.normalize_str(text) or text
        table[tid] = keys.setdefault(key, len(keys))
    return table, len(keys)


# ----------------------------------------------------------------------------- hashing


def is_prime(n: int) -> bool:
    """Deterministic Miller–Rabin (exact for n < 3.3·10^24)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
    if n in small:
        return True
    if any(n % p == 0 for p in small):
        return False
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def table_sizes(layer_ids: Sequence[int], slots: Sequence[int], heads: int) -> dict[int, list[list[int]]]:
    """Rows of each (order, head) table of every Engram layer: {layer: [[p per head] per order]}.

    For each layer in order, each order's first head takes the smallest prime ≥
    its `slots` not taken yet, each further head the next untaken prime above
    the previous one; one taken-set spans all layers (the demo's search)."""
    taken: set[int] = set()
    sizes: dict[int, list[list[int]]] = {}
    for layer in layer_ids:
        per_order = []
        for base in slots:
            primes, candidate = [], int(base) - 1
            for _ in range(heads):
                candidate += 1
                while not is_prime(candidate) or candidate in taken:
                    candidate += 1
                taken.add(candidate)
                primes.append(candidate)
            per_order.append(primes)
        sizes[layer] = per_order
    return sizes


def hash_multipliers(max_order: int, vocab_size: int, layer_id: int, seed: int = 0) -> torch.Tensor:
    """Odd int64 multipliers m_0..m_{max_order-1} of one layer (numpy's PCG64 stream, as the demo)."""
    half_bound = max(1, (np.iinfo(np.int64).max // vocab_size) // 2)  # x·m < vocab·(2·half_bound) fits int64
    rng = np.random.default_rng(int(seed + _LAYER_SEED_STRIDE * int(layer_id)))
    r = rng.integers(low=0, high=half_bound, size=(max_order,), dtype=np.int64)
    return torch.from_numpy(r * 2 + 1)


def ngram_hashes(ids: torch.Tensor, multipliers: torch.Tensor, orders: Sequence[int], sizes: torch.Tensor,
                 pad_id: int, history: torch.Tensor | None = None) -> torch.Tensor:
    """Table indices [B, T, len(orders)·heads] of each position's suffix n-grams.

    ids [B, T] compressed; `sizes` [len(orders), heads] the table sizes;
    `history` [B, max(orders) − 1] the ids before ids[:, 0] (default: pad)."""
    B, T = ids.shape
    context = max(orders) - 1
    if history is None:
        history = ids.new_full((B, context), pad_id)
    x = torch.cat((history.to(ids), ids), dim=1)
    m = multipliers.to(ids.device)
    back = [x[:, context - k: context - k + T] * m[k] for k in range(context + 1)]  # x_{t-k} · m_k
    out = []
    for i, n in enumerate(orders):
        mix = back[0]
        for k in range(1, n):
            mix = torch.bitwise_xor(mix, back[k])
        out.append(mix[..., None] % sizes[i].to(ids.device))  # mix >= 0: products and XORs of non-negatives
    return torch.cat(out, dim=-1)


# ----------------------------------------------------------------------------- the module


class Engram(Decoding):
    """Hashed n-gram memory with a context-aware gate and a short causal convolution.

    h [B, T, d] (lanes = 1) or [B, T, lanes, d]; tokens [B, T] -> the same shape as h.
    `vocab_size`: the tokenizer's; `compression` [vocab_size] its compressed-id map
    (None: ids as they are); `slots`: base rows per order (an int or one per order;
    default 5·compressed vocab, as the demo); `dim`: embedding width per order, split
    over `heads`; `layer_id` / `layer_ids`: this layer and all Engram layers of the
    model (the tables' primes are shared out over them).
    """

    def __init__(self, d_model: int, vocab_size: int, *, orders: Sequence[int] = (2, 3), heads: int = 8,
                 slots: int | Sequence[int] | None = None, dim: int = 512, lanes: int = 1, kernel_size: int = 4,
                 layer_id: int = 0, layer_ids: Sequence[int] | None = None, seed: int = 0, pad_id: int = 0,
                 compression: torch.Tensor | None = None, compress: bool = False, sparse: bool = False,
                 conv_eps: float = 1e-5) -> None:
        super().__init__()
        orders = tuple(int(n) for n in orders)
        if not orders or min(orders) < 1 or len(set(orders)) != len(orders):
            raise ValueError(f"engram: orders must be distinct n-gram lengths >= 1, got {list(orders)}")
        if dim % heads:
            raise ValueError(f"engram: dim={dim} must be a multiple of heads={heads}")
        layer_ids = tuple(layer_ids) if layer_ids is not None else (layer_id,)
        if layer_id not in layer_ids:
            raise ValueError(f"engram: layer_id={layer_id} is not among layer_ids={list(layer_ids)}")
        if compression is None:
            compression = torch.arange(vocab_size)
        if compression.shape != (vocab_size,):
            raise ValueError(f"engram: compression must map the {vocab_size} token ids, got {tuple(compression.shape)}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"engram: pad_id={pad_id} is not a token id (vocab_size={vocab_size})")
        compressed_vocab = int(compression.max()) + 1
        slots = [5 * compressed_vocab] * len(orders) if slots is None else slots
        slots = [int(slots)] * len(orders) if isinstance(slots, int) else [int(s) for s in slots]
        if len(slots) != len(orders):
            raise ValueError(f"engram: slots gives {len(slots)} sizes for {len(orders)} orders")
        self.d_model, self.vocab_size, self.orders, self.heads, self.dim = d_model, vocab_size, orders, heads, dim
        self.lanes, self.layer_id, self.kernel_size = lanes, layer_id, kernel_size
        self.context, self.dilation = max(orders) - 1, max(orders)  # n-gram context; the conv's dilation (demo)
        self.compressed_vocab, self.pad_token, self.seed = compressed_vocab, pad_id, seed
        self.compress = compress  # the tokenizer's compression map is to be set (use_compression) before training
        sizes = torch.tensor(table_sizes(layer_ids, slots, heads)[layer_id])  # [orders, heads]
        self.register_buffer("compression", compression.clone().long())
        self.register_buffer("multipliers", hash_multipliers(max(orders), compressed_vocab, layer_id, seed))
        self.register_buffer("sizes", sizes)
        self.register_buffer("offsets", (sizes.flatten().cumsum(0) - sizes.flatten()))
        width = len(orders) * dim  # e_t
        self.table = nn.Embedding(int(sizes.sum()), dim // heads, sparse=sparse)
        self.value = nn.Linear(width, d_model)
        self.keys = nn.ModuleList(nn.Linear(width, d_model) for _ in range(lanes))
        self.key_norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(lanes))
        self.query_norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(lanes))
        self.conv_norms = nn.ModuleList(nn.RMSNorm(d_model, eps=conv_eps) for _ in range(lanes))
        self.conv = nn.Conv1d(lanes * d_model, lanes * d_model, kernel_size, groups=lanes * d_model, bias=False,
                              dilation=self.dilation)
        self.table_device: torch.device | None = None
        self._ids: torch.Tensor | None = None  # decoding: the last max(orders) - 1 compressed ids
        self._conv: torch.Tensor | None = None  # decoding: the convolution's last (kernel - 1)·dilation inputs
        self._prefetched: tuple[torch.Tensor, torch.Tensor] | None = None  # (tokens, rows) from keep_memory_on

    @property
    def pad_id(self) -> int:
        """The compressed id of the pad token (read from the map, which a checkpoint may have replaced)."""
        return int(self.compression[self.pad_token])

    @torch.no_grad()
    def use_compression(self, compression: torch.Tensor) -> Engram:
        """Hash through a tokenizer's compression map from now on (`compression_table`): the map and the
        multipliers (bounded by the compressed vocabulary) change; the tables keep their sizes."""
        if compression.shape != (self.vocab_size,):
            raise ValueError(f"engram: compression must map the {self.vocab_size} token ids, "
                             f"got {tuple(compression.shape)}")
        self.compressed_vocab = int(compression.max()) + 1
        self.compression.copy_(compression)
        self.multipliers.copy_(hash_multipliers(len(self.multipliers), self.compressed_vocab, self.layer_id, self.seed))
        return self

    # -- memory ------------------------------------------------------------------------------------

    def indices(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows of the one big table [B, T, len(orders)·heads] for `tokens` (after the carried context)."""
        ids = self.compression.to(tokens.device)[tokens]
        history = self._ids if self.active and self._ids is not None else None
        idx = ngram_hashes(ids, self.multipliers, self.orders, self.sizes, self.pad_id, history)
        return idx + self.offsets.to(idx.device)

    def prefetch(self, tokens: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """e [B, T, len(orders)·dim]: the table rows for `tokens`, gathered where the table lives, moved to `device`."""
        idx = self.indices(tokens.to(self.table.weight.device))
        rows = self.table(idx).flatten(-2)
        device = torch.device(device or tokens.device)
        if device.type == "cuda" and rows.device.type == "cpu":
            rows = rows.pin_memory()  # so that the copy below runs asynchronously
        return rows.to(device, non_blocking=True)

    def keep_tables_on(self, device: torch.device | str) -> Engram:
        """Move the table (only) to `device`, e.g. "cpu" after model.to("cuda"): memory in host RAM."""
        self.table.to(device)
        self.table_device = torch.device(device)
        return self

    def memory_parameters(self) -> list[nn.Parameter]:
        return [self.table.weight]

    def parameter_counts(self) -> dict[str, int]:
        """memory (table rows), compute (everything else), active memory per token (rows read)."""
        memory = self.table.weight.numel()
        compute = sum(p.numel() for p in self.parameters()) - memory
        return {"memory": memory, "compute": compute, "active_memory_per_token": len(self.orders) * self.dim}

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, h: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        lanes_in = h.dim() == 4
        if (h.shape[-2] if lanes_in else 1) != self.lanes or h.shape[-1] != self.d_model:
            want = f"[B, T, {self.lanes}, {self.d_model}]" if self.lanes > 1 else f"[B, T, {self.d_model}]"
            raise ValueError(f"engram: expected the stream {want}, got {tuple(h.shape)}")
        if tokens.shape != h.shape[:2]:
            raise ValueError(f"engram: tokens {tuple(tokens.shape)} do not match "
                             f"the stream's [B, T] = {tuple(h.shape[:2])}")
        hl = h if lanes_in else h.unsqueeze(-2)  # [B, T, lanes, d]
        if rows is None and self._prefetched is not None:
            fetched_for, fetched = self._prefetched
            self._prefetched = None
            rows = fetched if fetched_for is tokens else None  # gathered by keep_memory_on for these very ids
        e = self.prefetch(tokens, h.device) if rows is None else rows
        value = self.value(e)  # [B, T, d]
        scale = math.sqrt(self.d_model)
        gates = []
        for lane in range(self.lanes):
            z = (self.key_norms[lane](self.keys[lane](e)) * self.query_norms[lane](hl[..., lane, :])).sum(-1) / scale
            gates.append(torch.sigmoid(z.sign() * z.abs().clamp_min(1e-6).sqrt()))
        gated = torch.stack(gates, dim=-1)[..., None] * value[..., None, :]  # [B, T, lanes, d]
        out = gated + self._short_conv(gated)
        if self.active:
            ids = self.compression.to(tokens.device)[tokens]
            history = self._ids if self._ids is not None else ids.new_full((ids.shape[0], self.context), self.pad_id)
            self._ids = torch.cat((history, ids), dim=1)[:, ids.shape[1]:]
            self.length += tokens.shape[1]
        return out if lanes_in else out.squeeze(-2)

    def _short_conv(self, v: torch.Tensor) -> torch.Tensor:
        """SiLU(causal depthwise conv(RMSNorm per lane of v)), dilation max(orders);
        carries its inputs while decoding."""
        B, T = v.shape[:2]
        normed = torch.cat([self.conv_norms[i](v[..., i, :]) for i in range(self.lanes)], dim=-1)  # [B, T, lanes·d]
        reach = (self.kernel_size - 1) * self.dilation
        past = self._conv if self.active and self._conv is not None else normed.new_zeros(B, reach, normed.shape[-1])
        x = torch.cat((past, normed), dim=1)
        if self.active:
            self._conv = x[:, x.shape[1] - reach:]
        y = F.conv1d(x.transpose(1, 2), self.conv.weight, dilation=self.dilation, groups=x.shape[-1])
        return F.silu(y).transpose(1, 2).view(B, T, self.lanes, self.d_model)

    def start(self) -> None:
        super().start()
        self._ids = self._conv = None

    def stop(self) -> None:
        super().stop()
        self._ids = self._conv = None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, orders={list(self.orders)}, heads={self.heads}, dim={self.dim}, "
                f"lanes={self.lanes}, layer_id={self.layer_id}, rows={self.table.num_embeddings}")


def keep_memory_on(model: nn.Module, device: torch.device | str, compute: torch.device | str | None = None):
    """Keep every Engram table of `model` on `device` (host memory: "cpu") while the rest runs on `compute`
    (default: where the model's other parameters are), and gather each call's rows as soon as the model is
    called, before any layer runs: the rows depend only on the token ids, the model's one `Tokens` input.

    Each Engram layer then uses the rows gathered for the ids it is given (the same tensor as the model's
    input); a layer given other ids gathers its own. Returns the hook's handle (`.remove()` stops the early
    gathers; the tables stay where they are)."""
    memories = [m for m in model.modules() if isinstance(m, Engram)]
    if not memories:
        raise ValueError("keep_memory_on: the model has no Engram memory")
    for m in memories:
        m.keep_tables_on(device)
    if compute is None:
        tables = {id(m.table.weight) for m in memories}
        compute = next((p.device for p in model.parameters() if id(p) not in tables), torch.device(device))
    compute = torch.device(compute)

    def gather_early(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and not t.is_floating_point()]
        if len(ids) != 1:
            raise ValueError(f"keep_memory_on: the model's call has {len(ids)} integer tensors; "
                             "the early gather needs exactly one (the token ids)")
        for m in memories:
            m._prefetched = (ids[0], m.prefetch(ids[0], compute))

    return model.register_forward_pre_hook(gather_early, with_kwargs=True)


# ----------------------------------------------------------------------------- sparse-row optimizer


@torch.no_grad()
def sparse_row_adam_(param: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                     exp_avg_sq: torch.Tensor, steps: torch.Tensor, *, lr: float, beta1: float, beta2: float,
                     eps: float, weight_decay: float = 0.0) -> None:
    """Adam on the given rows only (distinct `rows` [R], their gradients `grad` [R, ...]).

    Each row keeps its own step count (`steps` [rows of param]), so a row's
    trajectory is dense Adam's on the steps that touched it: untouched rows
    and their moments do not move. `weight_decay` is decoupled (AdamW) and
    also applies to touched rows only. The arithmetic is torch.optim.Adam's
    single-tensor step, row by row."""
    step = steps[rows] + 1
    steps[rows] = step
    shape = (-1,) + (1,) * (param.dim() - 1)
    m = exp_avg[rows].lerp_(grad, 1 - beta1)
    v = exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg[rows], exp_avg_sq[rows] = m, v
    count = step.to(torch.float64).view(shape)  # bias corrections in double, as Adam's Python floats
    bias1 = (1 - beta1 ** count).to(param.dtype)
    bias2_sqrt = (1 - beta2 ** count).sqrt().to(param.dtype)
    p = param[rows]
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    denom = (v.sqrt() / bias2_sqrt).add_(eps)
    param[rows] = p.add_(-(lr / bias1) * m / denom)  # addcdiv with a per-row step size


class SparseRowAdam(torch.optim.Optimizer):
    """Adam for embedding tables with sparse row gradients (`nn.Embedding(sparse=True)`, Engram's `sparse=True`).

    Only the rows a step's gradient touches are read and written (`sparse_row_adam_`);
    duplicate row indices are summed first. Dense gradients are refused: route the
    memory parameters (`Engram.memory_parameters()`) here and the rest to a dense optimizer."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if not p.grad.is_sparse:
                    raise TypeError("SparseRowAdam takes sparse row gradients (nn.Embedding(sparse=True)); "
                                    "give dense parameters to a dense optimizer")
                if p.grad.sparse_dim() != 1:
                    raise TypeError("SparseRowAdam takes row gradients (sparse_dim 1), "
                                    f"got sparse_dim {p.grad.sparse_dim()}")
                grad = p.grad.coalesce()  # sums duplicate rows
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["steps"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
                sparse_row_adam_(p, grad.indices()[0], grad.values(), state["exp_avg"], state["exp_avg_sq"],
                                 state["steps"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                 weight_decay=group["weight_decay"])
        return loss
