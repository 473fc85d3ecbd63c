"""Plain, hand-written PyTorch reference models (GPT-2 and Llama).

These are the ground truth that archc-generated modules are tested and
benchmarked against, so they favour being obviously correct over being clever.

Design choices:
  * Semantics follow Hugging Face `transformers` exactly (checked in
    tests/runtime/test_reference_models.py against GPT2LMHeadModel / LlamaForCausalLM
    with random weights, attn_implementation="eager").
  * `state_dict()` keys (and their order) are exactly the HF keys, so an HF
    state dict loads with `strict=True`. GPT-2 keeps HF's Conv1D layout:
    weights are [in, out] and applied as `x @ W + b`.
  * No persistent buffers besides parameters: the causal mask and the rotary
    tables are rebuilt in `forward` (cheap, and immune to `.to(dtype)` casts).
  * Attention in `GPT2` / `Llama` is explicit math:
    softmax(Q K^T / sqrt(d) + causal_mask) V. `LlamaFast` swaps only that core
    for `F.scaled_dot_product_attention`; everything else is shared.
  * Dtype handling mirrors HF: Llama RMSNorm and attention softmax run in fp32
    and are cast back; rotary cos/sin are computed in fp32 then cast.
  * Inference only: no dropout, no KV cache, no padding mask; positions 0..T-1.
  * Deterministic init from the global RNG (call `torch.manual_seed` first):
    weights ~ N(0, 0.02), biases 0, norm weights 1. (No GPT-2 residual scaling.)
  * `forward(tokens[B, T]) -> logits[B, T, V]`; `next_token_loss` is the mean
    next-token cross-entropy.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "GPT2Config",
    "GPT2",
    "LlamaConfig",
    "Llama",
    "LlamaFast",
    "next_token_loss",
    "causal_attention",
    "causal_attention_sdpa",
]


# ----------------------------------------------------------------------------
# Shared pieces


def causal_attention(q, k, v):
    """Explicit causal attention. q: [B, H, T, D]; k, v: [B, Hkv, T, D], H % Hkv == 0.

    Softmax runs in fp32 and is cast back to q's dtype (as HF Llama does; for
    fp32 inputs, as in HF GPT-2, this is a no-op).
    """
    n_rep = q.size(1) // k.size(1)
    # Query head h uses key/value head h // n_rep (HF's repeat_kv).
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v


_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def causal_attention_sdpa(q, k, v):
    """Same contract as `causal_attention`, using PyTorch's fused SDPA kernels."""
    if _SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    n_rep = q.size(1) // k.size(1)
    k = k.repeat_interleave(n_rep, dim=1)
    v = v.repeat_interleave(n_rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def next_token_loss(logits, tokens):
    """Mean cross-entropy of logits[:, :-1] against tokens[:, 1:] (computed in fp32, as HF does)."""
    V = logits.size(-1)
    return F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def _init_params(model, norm_types):
    """Weights ~ N(0, 0.02), biases 0, norm weights 1; consumes the global RNG in parameter order."""
    norm_params = {id(p) for m in model.modules() if isinstance(m, norm_types) for p in m.parameters()}
    for name, p in model.named_parameters():  # tied parameters are visited once
        if name.endswith("bias"):
            p.zero_()
        elif id(p) in norm_params:
            p.fill_(1.0)
        else:
            p.normal_(mean=0.0, std=0.02)


# ----------------------------------------------------------------------------
# GPT-2


@dataclass
class GPT2Config:
    vocab_size: int = 256
    n_positions: int = 128
    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    layer_norm_epsilon: float = 1e-5


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: weight stored as [in, out], y = x @ W + b."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.weight + self.bias


def gelu_new(x):
    """GPT-2's tanh-approximated GELU (HF "gelu_new"), written out."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GPT2Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Conv1D(cfg.n_embd, 3 * cfg.n_embd)  # fused q, k, v (in that order)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = causal_attention(q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class GPT2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Conv1D(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x):
        return self.c_proj(gelu_new(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # Attribute order fixes state_dict key order (matches HF).
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2(nn.Module):
    """GPT-2 LM with HF GPT2LMHeadModel semantics and state_dict keys; lm_head tied to wte."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.n_positions, cfg.n_embd),
            h=nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layer)),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight
        self.init_weights()

    def init_weights(self):
        _init_params(self, nn.LayerNorm)

    def forward(self, tokens):
        T = tokens.size(1)
        assert T <= self.config.n_positions, f"sequence length {T} > n_positions {self.config.n_positions}"
        pos = torch.arange(T, device=tokens.device)
        x = self.transformer.wte(tokens) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ----------------------------------------------------------------------------
# Llama


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False


class RMSNorm(nn.Module):
    """HF LlamaRMSNorm: normalise in fp32, cast back, then scale by weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_cos_sin(T, head_dim, theta, device, dtype):
    """Rotary tables [T, head_dim] for positions 0..T-1, computed in fp32 then cast (as HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    freqs = torch.arange(T, dtype=torch.float, device=device)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)  # non-interleaved: halves share frequencies
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, cfg, core):
        super().__init__()
        self.n_head = cfg.num_attention_heads
        self.n_kv_head = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.core = core  # plain function (q, k, v) -> [B, H, T, D]; not a submodule

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.core(q, k, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg, core):
        super().__init__()
        # Attribute order fixes state_dict key order (matches HF).
        self.self_attn = LlamaAttention(cfg, core)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Llama LM with HF LlamaForCausalLM semantics and state_dict keys; explicit attention math."""

    attention_core = staticmethod(causal_attention)

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(LlamaDecoderLayer(cfg, self.attention_core) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    def init_weights(self):
        _init_params(self, RMSNorm)

    def forward(self, tokens):
        cfg = self.config
        x = self.model.embed_tokens(tokens)
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        cos, sin = rope_cos_sin(tokens.size(1), head_dim, cfg.rope_theta, x.device, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


class LlamaFast(Llama):
    """Same model, weights and keys as `Llama`; only the attention core uses fused SDPA."""

    attention_core = staticmethod(causal_attention_sdpa)
