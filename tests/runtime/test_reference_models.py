"""The hand-written reference models match Hugging Face `transformers` exactly.

HF models are built from small configs with random weights (no download); their
state dicts load into our references with strict=True and logits must agree.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

# Works whether or not tests/ is a package (pytest's default "prepend" import mode).
try:
    from tests.reference_models import GPT2, GPT2Config, Llama, LlamaConfig, LlamaFast, next_token_loss
except ImportError:
    from reference_models import GPT2, GPT2Config, Llama, LlamaConfig, LlamaFast, next_token_loss

ATOL = 1e-5


def _tokens(vocab, B=3, T=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)


def _hf_gpt2(cfg: GPT2Config):
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon,
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        attn_implementation="eager", bos_token_id=0, eos_token_id=0,  # ids inside the small vocab
    )
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def _hf_llama(cfg: LlamaConfig):
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        tie_word_embeddings=cfg.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, attn_implementation="eager", bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    # HF's init leaves norm weights at 1; randomise them so the test sees them.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return hf


def _check_against_hf(ours, hf, vocab):
    assert hf.config._attn_implementation == "eager"
    hf_sd = hf.state_dict()
    assert list(ours.state_dict().keys()) == list(hf_sd.keys())
    ours.load_state_dict(hf_sd, strict=True)
    ours.eval()
    tokens = _tokens(vocab)
    with torch.no_grad():
        out = hf(tokens, labels=tokens)
        logits = ours(tokens)
    assert logits.shape == out.logits.shape
    torch.testing.assert_close(logits, out.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(next_token_loss(logits, tokens), out.loss, atol=ATOL, rtol=0)
    return tokens, logits


def test_gpt2_matches_hf():
    cfg = GPT2Config()
    hf = _hf_gpt2(cfg)
    ours = GPT2(cfg)
    assert ours.transformer.h[0].attn.c_attn.weight.shape == (cfg.n_embd, 3 * cfg.n_embd)  # Conv1D [in, out]
    assert not list(ours.buffers())
    _check_against_hf(ours, hf, cfg.vocab_size)
    assert ours.lm_head.weight is ours.transformer.wte.weight


@pytest.mark.parametrize("tie", [False, True])
def test_llama_matches_hf(tie):
    cfg = LlamaConfig(tie_word_embeddings=tie, rope_theta=500000.0)
    hf = _hf_llama(cfg)
    for cls in (Llama, LlamaFast):
        ours = cls(cfg)
        assert not list(ours.buffers())
        _check_against_hf(ours, hf, cfg.vocab_size)
        assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tie


def test_llama_fast_equals_llama():
    cfg = LlamaConfig(num_key_value_heads=1)  # MQA: the most extreme GQA grouping
    torch.manual_seed(0)
    slow = Llama(cfg).eval()
    fast = LlamaFast(cfg).eval()
    fast.load_state_dict(slow.state_dict(), strict=True)
    tokens = _tokens(cfg.vocab_size, T=cfg.vocab_size // 2)
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), slow(tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("cls, cfg", [(GPT2, GPT2Config()), (Llama, LlamaConfig()), (LlamaFast, LlamaConfig())])
def test_seeded_init(cls, cfg):
    torch.manual_seed(123)
    a = cls(cfg)
    torch.manual_seed(123)
    b = cls(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
        if name.endswith("bias"):
            assert torch.all(pa == 0), name
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "norm.weight", "layernorm.weight")):
            assert torch.all(pa == 1), name
        else:
            assert abs(pa.std().item() - 0.02) < 0.005, name
