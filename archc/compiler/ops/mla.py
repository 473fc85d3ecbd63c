"""The built-in `mla(...)`: Multi-head Latent Attention (DeepSeek-V2/V3), as Hugging Face computes it.

    x += mla(h, heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
             qk_rope_head_dim=64, v_head_dim=128) as attn

Lowered to plain linears and RMSNorms (so `fuse_projections` merges the two
projections of the input, and weights keep one name each) around one core op:

    q      = q_b(rms_norm(q_a(x)))           # or q(x) when q_lora_rank=0
    kv_a   = kv_a(x)                         # [latent c_kv | shared RoPE key k_pe]
    kv     = kv_b(rms_norm(c_kv))            # per head: [k_nope | v]
    y      = mla_core(q, kv, k_pe)           # RoPE on the rope parts, softmax(q·k / √(nope+rope)) v
    out    = o(y)

Module names follow HF's DeepseekV3Attention: q_a/q_norm/q_b (q_a_proj, q_a_layernorm,
q_b_proj), q (q_proj), kv_a (kv_a_proj_with_mqa), kv_norm (kv_a_layernorm), kv_b (kv_b_proj), o
(o_proj). The latent norms use `norm_eps` (HF: 1e-6, not rms_norm_eps).
"""

from __future__ import annotations

from archc.compiler.ops.base import REQUIRED, A, OpDef, Width, composite, fmt_shape, numel, register
from archc.dsl.diagnostics import SpecError


@register
class MLACore(OpDef):
    """Attention over MLA's heads. q: [B, T, H·(nope+rope)], kv: [B, T, H·(nope+v)], k_pe: [B, T, rope]
    -> [B, T, H·v]. Queries and keys are [nope | rope] per head, the key's rope part shared by all heads."""

    name = "mla_core"
    inputs = ("q", "kv", "k_pe")
    attrs = {
        "heads": A(int, positive=True),
        "qk_nope_head_dim": A(int, positive=True),
        "qk_rope_head_dim": A(int, positive=True),
        "v_head_dim": A(int, positive=True),
        "rope_theta": A(float, 10000.0, positive=True),
        "rope_interleave": A(bool, True),
        "causal": A(bool, True),
    }
    pure = False
    user = False

    def kv_per_token(self, node) -> float:
        """Floats cached per token to decode: the full per-head keys and values (not the latent)."""
        a = node.attrs
        return a["heads"] * (a["qk_nope_head_dim"] + a["qk_rope_head_dim"] + a["v_head_dim"])

    def infer(self, node, ins, graph):
        a = node.attrs
        q, kv, k_pe = ins
        h, nope, rope, dv = a["heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
        if len(q) != 3:
            raise SpecError(f"mla expects a [B, T, D] stream, got {fmt_shape(q)}", node.span)
        for what, shape, width, why in (
                ("queries", q, h * (nope + rope), f"heads={h} × (qk_nope_head_dim={nope} + qk_rope_head_dim={rope})"),
                ("keys/values", kv, h * (nope + dv), f"heads={h} × (qk_nope_head_dim={nope} + v_head_dim={dv})"),
                ("RoPE keys", k_pe, rope, f"qk_rope_head_dim={rope}")):
            if shape[-1] != width:
                raise SpecError(f"mla {what} have shape {fmt_shape(shape)} but {why} needs width {width}", node.span)
        if rope % 2:
            raise SpecError(f"RoPE needs an even qk_rope_head_dim, got {rope}", node.span)
        return (*q[:-1], h * dv)

    def cannot_decode(self, node, ins):
        return None if node.attrs["causal"] else "not causal self-attention"

    def extra_modules(self, node, ins):
        a = node.attrs
        cls = "AF.InterleavedRotaryEmbedding" if a["rope_interleave"] else "AF.RotaryEmbedding"
        mods = [("rope", f"{cls}({a['qk_rope_head_dim']!r}, theta={a['rope_theta']!r})")]
        return mods + [("kv_cache", "AF.KVCache()")] if a["causal"] else mods

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        q, kv, k_pe = args
        h, nope, rope, dv = a["heads"], a["qk_nope_head_dim"], a["qk_rope_head_dim"], a["v_head_dim"]
        pairs = "interleaved pairs, as DeepSeek-V3" if a["rope_interleave"] else "rotate-half"
        # Causal MLA decodes from a cache of the full per-head keys and values (not the latent).
        offset, decode, indent = "", [], ""
        if a["causal"]:
            offset, indent = ", offset=self.kv_cache.length", "    "
            decode = ["if self.kv_cache.active:  # decoding: attend over the cached keys and values too",
                      f"    {out} = self.kv_cache.attend({q}_BHTd, k_BHTd, v_BHTd, causal=True)", "else:"]
        return [
            f"B, T, _ = {q}.shape",
            f"{q}_nope, {q}_pe = {q}.view(B, T, {h!r}, {nope + rope!r}).transpose(1, 2)"
            f".split(({nope!r}, {rope!r}), dim=-1)",
            f"k_nope, v_BHTd = {kv}.view(B, T, {h!r}, {nope + dv!r}).transpose(1, 2)"
            f".split(({nope!r}, {dv!r}), dim=-1)",
            f"{k_pe} = {k_pe}.view(B, T, 1, {rope!r}).transpose(1, 2)  # one RoPE key for all heads",
            f"{q}_pe, {k_pe} = self.rope({q}_pe, {k_pe}{offset})  # {pairs}",
            f"{q}_BHTd = torch.cat(({q}_nope, {q}_pe), dim=-1)",
            f"k_BHTd = torch.cat((k_nope, {k_pe}.expand(-1, {h!r}, -1, -1)), dim=-1)",
            f"# scale 1/√{nope + rope} (nope + rope head dims): SDPA's default for these queries",
            *decode,
            f"{indent}{out} = F.scaled_dot_product_attention({q}_BHTd, k_BHTd, v_BHTd, is_causal={a['causal']!r})",
            f"{out} = {out}.transpose(1, 2).reshape(B, T, {h * dv!r})",
        ]

    def flops(self, node, ins, out, sizes):
        # q kᵀ over nope+rope dims and p v over v dims, per head, counted in full even when causal.
        a = node.attrs
        q, _kv, k_pe = ins
        b_t = numel(q[:-1], sizes)
        s = sizes[k_pe[-2]] if isinstance(k_pe[-2], str) else k_pe[-2]
        per_head = a["qk_nope_head_dim"] + a["qk_rope_head_dim"] + a["v_head_dim"]
        return 2 * b_t * s * a["heads"] * per_head


@composite("mla", cls="MLA", default_name="attn", attrs={
    "heads": A(int, positive=True),
    "q_lora_rank": A(int, 0),
    "kv_lora_rank": A(int, REQUIRED, positive=True),
    "qk_nope_head_dim": A(int, REQUIRED, positive=True),
    "qk_rope_head_dim": A(int, REQUIRED, positive=True),
    "v_head_dim": A(int, REQUIRED, positive=True),
    "rope_theta": A(float, 10000.0, positive=True),
    "norm_eps": A(float, 1e-6, positive=True),
    "causal": A(bool, True),
    "rope_interleave": A(bool, True),
})
def lower_mla(ctx, args, v) -> str:
    (x,) = args
    h, nope, rope, dv = v["heads"], v["qk_nope_head_dim"], v["qk_rope_head_dim"], v["v_head_dim"]
    if v["q_lora_rank"] < 0:
        raise SpecError(f"`mla`: `q_lora_rank` must be 0 (no query compression) or positive, got {v['q_lora_rank']}",
                        ctx.span)
    if v["q_lora_rank"]:
        q_a = ctx.linear(x, v["q_lora_rank"], "q_a")
        q_norm = ctx.rms_norm(q_a, v["norm_eps"], "q_norm")
        q = ctx.linear(q_norm, h * (nope + rope), "q_b", var="q")
    else:
        q = ctx.linear(x, h * (nope + rope), "q")
    kv_a = ctx.linear(x, v["kv_lora_rank"] + rope, "kv_a")
    c_kv = ctx.split(kv_a, 0, 0, v["kv_lora_rank"], "c_kv")
    k_pe = ctx.split(kv_a, 1, v["kv_lora_rank"], rope, "k_pe")
    kv_norm = ctx.rms_norm(c_kv, v["norm_eps"], "kv_norm")
    kv = ctx.linear(kv_norm, h * (nope + dv), "kv_b", var="kv")
    core = ctx.core("mla_core", [q, kv, k_pe], {
        "heads": h, "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": dv,
        "rope_theta": v["rope_theta"], "rope_interleave": v["rope_interleave"], "causal": v["causal"]})
    # The output projection maps back to the width of the attention's input.
    return ctx.linear(core, Width(of=x), "o")
