"""Small random Hugging Face checkpoints of every family with a built-in weight map, and the checks
the import and export tests share.

Models are built by transformers from tiny configs (no download), with eager attention and fp32,
their vectors randomised (HF inits norms to 1 and biases to 0, which would hide a mis-mapped vector)
and routers spread out (so that rounding cannot change which experts are chosen), then saved with
`save_pretrained` (safetensors). The `hf_checkpoints` fixture (conftest.py) builds each once per session.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import attrs
import torch
from safetensors.torch import load_file, save_file

from archc.runtime.mixers import recurrent

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
ATOL = 1e-4
VOCAB = 80
COMMON = {"vocab_size": VOCAB, "attn_implementation": "eager", "bos_token_id": 0, "eos_token_id": 0}
ROPE = {"rope_type": "default", "rope_theta": 31337.0}


def tokens(vocab=VOCAB, B=2, T=19, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


QUERY_KEY = ("q_proj.weight", "k_proj.weight", "query_key_value.weight")


def randomise(model, norms=(0.5, 1.5), sharpen: float = 1.0):
    """Norm weights in `norms`, other vectors N(0, 0.1); routers N(0, 0.5); DeepSeek's selection bias random;
    query and key projections times `sharpen` (scores of a few units, so that soft-caps and position terms
    change the logits well beyond the tolerance)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(QUERY_KEY):
                p.mul_(sharpen)
            if p.dim() == 1:
                p.uniform_(*norms) if "norm" in name or ".ln_" in name else p.normal_(0.0, 0.1)
            elif name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")):  # routers, not gate_proj
                p.normal_(0.0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.3)


@attrs.frozen
class Family:
    spec: str  # file under specs/
    cls: str  # the transformers model class
    config: Callable[[], object]  # the tiny transformers config
    norms: tuple[float, float] = (0.5, 1.5)  # Gemma stores w - 1: its norms are drawn around 0
    sharpen: float = 1.0  # randomise()
    moe: bool = False  # the model's loss adds the routers' balance loss, HF's does not
    seed: int = 0
    map: str | None = None  # the built-in map (config.json's model_type) when not the family's own name
    overrides: dict = attrs.field(factory=dict)  # spec parameters the config does not set (its sizes are set)

    def model_type(self, name: str) -> str:
        return self.map or name


def _t():
    import transformers

    return transformers


FAMILIES = {
    "gpt2": Family("gpt2.arch", "GPT2LMHeadModel", lambda: _t().GPT2Config(
        n_positions=32, n_embd=48, n_layer=2, n_head=4, layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **COMMON), seed=1),
    "llama": Family("llama.arch", "LlamaForCausalLM", lambda: _t().LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_parameters=ROPE, **COMMON), seed=2),
    "mistral": Family("sliding_window.arch", "MistralForCausalLM", lambda: _t().MistralConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, sliding_window=5, **COMMON), seed=3),
    "mixtral": Family("mixtral.arch", "MixtralForCausalLM", lambda: _t().MixtralConfig(
        hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=6, num_experts_per_tok=2, rms_norm_eps=1e-5, rope_parameters=ROPE,
        router_aux_loss_coef=0.02, max_position_embeddings=64, **COMMON), moe=True, seed=3),
    "deepseek_v3": Family("deepseek_v3.arch", "DeepseekV3ForCausalLM", lambda: _t().DeepseekV3Config(
        hidden_size=48, intermediate_size=72, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, routed_scaling_factor=1.7, rms_norm_eps=1e-5, q_lora_rank=24,
        first_k_dense_replace=1, n_group=2, topk_group=1, n_shared_experts=1,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, max_position_embeddings=64, **COMMON),
        moe=True, seed=4),
    # tied head, grouped-query attention: q, k, v biases of different sizes
    "qwen2": Family("qwen2.arch", "Qwen2ForCausalLM", lambda: _t().Qwen2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_parameters=ROPE, tie_word_embeddings=True, **COMMON), seed=5),
    # head_dim (24) not hidden_size / heads (16)
    "qwen3": Family("qwen3.arch", "Qwen3ForCausalLM", lambda: _t().Qwen3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=24, rms_norm_eps=1e-6, rope_parameters=ROPE, **COMMON), seed=6),
    # fused q|k|v with 4 query and 2 kv heads (unequal parts), fused gate|up, a window shorter than T
    "phi3": Family("phi3.arch", "Phi3ForCausalLM", lambda: _t().Phi3Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, rope_parameters=ROPE, sliding_window=7, pad_token_id=0, **COMMON), seed=7),
    # multi-query attention, head_dim 32 with hidden_size 48
    "gemma": Family("gemma.arch", "GemmaForCausalLM", lambda: _t().GemmaConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, rms_norm_eps=1e-6, rope_parameters=ROPE, pad_token_id=0, **COMMON),
        norms=(-0.5, 0.5), seed=8),
    # Llama 3.1's RoPE scaling (a short original context, so that the three bands all occur at head_dim 16)
    "llama3_rope": Family("llama.arch", "LlamaForCausalLM", lambda: _t().LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, max_position_embeddings=64, rope_parameters={
            "rope_type": "llama3", "rope_theta": 5000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32}, **COMMON), seed=10, map="llama", sharpen=8.0),
    # YaRN on Llama (attention factor 0.1 ln 4 + 1 on cos and sin)
    "yarn_rope": Family("llama.arch", "LlamaForCausalLM", lambda: _t().LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, max_position_embeddings=128, rope_parameters={
            "rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 32},
        **COMMON), seed=11, map="llama", sharpen=8.0),
    # sliding (even) and global (odd) layers, a window shorter than T, scale 1/sqrt(20) with head_dim 16,
    # soft-caps low enough to bite
    "gemma2": Family("gemma2.arch", "Gemma2ForCausalLM", lambda: _t().Gemma2Config(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=20, sliding_window=6, attn_logit_softcapping=1.5,
        final_logit_softcapping=2.0, rms_norm_eps=1e-6, rope_parameters=ROPE, pad_token_id=0, **COMMON),
        norms=(-0.5, 0.5), seed=12, sharpen=8.0),
    # q_norm over 4 heads x 16, k_norm over 2 heads x 16
    "olmo2": Family("olmo2.arch", "Olmo2ForCausalLM", lambda: _t().Olmo2Config(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-6, rope_parameters=ROPE, pad_token_id=0, **COMMON), seed=13, sharpen=8.0),
    # top-3 of 6 experts not renormalised, a shared expert of another width behind its sigmoid gate
    "qwen2_moe": Family("qwen2_moe.arch", "Qwen2MoeForCausalLM", lambda: _t().Qwen2MoeConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
        num_experts_per_tok=3, moe_intermediate_size=24, shared_expert_intermediate_size=40, norm_topk_prob=False,
        rms_norm_eps=1e-6, rope_parameters=ROPE, router_aux_loss_coef=0.02, max_position_embeddings=64,
        **COMMON), moe=True, seed=14),
    # q|k|v fused per head, RoPE on 4 of 16 dims per head
    "gpt_neox": Family("gpt_neox.arch", "GPTNeoXForCausalLM", lambda: _t().GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, layer_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 31337.0, "partial_rotary_factor": 0.25},
        max_position_embeddings=64, **COMMON), seed=15, sharpen=8.0),
    # 6 heads: ALiBi's slopes for a head count that is not a power of two
    "bloom": Family("bloom.arch", "BloomForCausalLM", lambda: _t().BloomConfig(
        hidden_size=48, n_layer=2, n_head=6, layer_norm_epsilon=1e-5,
        **{k: v for k, v in COMMON.items() if k != "attn_implementation"}), seed=16, sharpen=8.0),
    # two groups of B and C (the gated norm is per group)
    "mamba2": Family("mamba2.arch", "Mamba2ForCausalLM", lambda: _t().Mamba2Config(
        hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8, n_groups=2, conv_kernel=4,
        expand=2, chunk_size=8, tie_word_embeddings=True, pad_token_id=0,
        **{k: v for k, v in COMMON.items() if k != "attn_implementation"}), seed=9),
}


def build(family: str, directory: Path):
    """The family's random transformers model, saved into `directory`."""
    spec = FAMILIES[family]
    torch.manual_seed(spec.seed)
    hf = getattr(_t(), spec.cls)(spec.config()).eval()
    randomise(hf, spec.norms, spec.sharpen)
    hf.save_pretrained(directory)
    return hf


class Checkpoints:
    """family -> (directory, HF model), each built on first use."""

    def __init__(self, tmp_path_factory) -> None:
        self._factory = tmp_path_factory
        self._built: dict[str, tuple[Path, object]] = {}

    def __call__(self, family: str) -> tuple[Path, object]:
        if family not in self._built:
            directory = self._factory.mktemp(family)
            self._built[family] = directory, build(family, directory)
        return self._built[family]


def spec_path(family: str) -> str:
    return str(SPECS / FAMILIES[family].spec)


def assert_same_logits(model, hf, toks=None, moe: bool = False, atol: float = ATOL):
    """archc's logits and loss equal HF's (an MoE model's loss less its routers' balance loss)."""
    from archc.runtime.moe import moe_aux_loss

    toks = tokens() if toks is None else toks
    with torch.no_grad():
        ours = model(toks)
        theirs = hf(toks, labels=toks)
    torch.testing.assert_close(ours["logits"], theirs.logits, atol=atol, rtol=0)
    loss = ours["loss"] - moe_aux_loss(model) if moe else ours["loss"]
    torch.testing.assert_close(loss, theirs.loss, atol=atol, rtol=0)


def assert_same_decoding(model, hf, toks=None, prompt: int = 5):
    """archc decoding from its caches (a prompt, then one token per call) gives HF's full-sequence logits."""
    toks = tokens() if toks is None else toks
    with torch.no_grad():
        theirs = hf(toks).logits
        with recurrent(model):
            steps = [model(toks[:, :prompt])["logits"]]
            steps += [model(toks[:, t:t + 1])["logits"] for t in range(prompt, toks.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), theirs, atol=ATOL, rtol=0)


def config(directory) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def corrupt(src, dst, edit=None, config_edit=None):
    """A copy of the checkpoint in `src` with its tensors (and/or config.json) edited."""
    dst.mkdir()
    cfg = config(src)
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    if edit is None:
        shutil.copy(src / "model.safetensors", dst / "model.safetensors")
    else:
        state = load_file(src / "model.safetensors")
        edit(state)
        save_file(state, dst / "model.safetensors")
    return dst
