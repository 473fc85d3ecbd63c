"""Softmax attention: the core op (`attention_core`), its kernel choice, and the built-ins
`attention` and `cross_attention` that lower to linear projections around it.

    q = q(x) [→ rms_norm over H·d]   k, v = k(memory), v(memory) [k → rms_norm over K·d]
    y = attention_core(q, k, v)      heads; per-head qk_norm; RoPE (partial, scaled); scores scaled,
                                     soft-capped, position-biased (ALiBi / T5), masked; softmax; · v
    y = y · sigmoid(gate(x))         with gate=true (Qwen3-Next's output gate, one per element)
    out = o(y)

Attention also takes tensors from the spec: a key padding mask (`mask=`, [B, S], true = a real token)
and a position bias added to the scores (`position_bias=`, [1 or B, heads, T, S], e.g. from
`relative_position_bias`); with either, it runs through SDPA with one additive float mask
(archc.runtime.attention_bias.score_bias).
"""

from __future__ import annotations

from archc.compiler import dims
from archc.compiler.ops.base import A, OpDef, Width, composite, dim_value, fmt_shape, need_width, numel, register
from archc.compiler.pytext import comment
from archc.dsl.diagnostics import SpecError, did_you_mean
from archc.runtime.diffusion import msrope_axes
from archc.runtime.rope import SCALINGS

ROPE_SCALINGS = ("none", *SCALINGS)
QK_NORMS = ("head", "full")
# The options of each RoPE scaling, as the runtime's scaling classes name them.
SCALING_OPTIONS = {
    "llama3": {"rope_factor": "factor", "rope_original_max": "original_max",
               "rope_low_freq_factor": "low_freq_factor", "rope_high_freq_factor": "high_freq_factor"},
    "yarn": {"rope_factor": "factor", "rope_original_max": "original_max", "rope_beta_fast": "beta_fast",
             "rope_beta_slow": "beta_slow", "rope_attention_factor": "attention_factor",
             "rope_truncate": "truncate"},
}


@register
class AttentionCore(OpDef):
    """softmax(modified scores + mask) v over heads, after QK-norm and RoPE; q comes in as [B, T, H·d],
    k and v as [B, S, K·d] (S = T for self-attention).

    Scores: `scale` · q kᵀ (1/√d by default), soft-capped to s·tanh(·/s) with `softcap`, plus ALiBi
    (`alibi`) or T5's bucketed relative bias (`relative_buckets`). The mask: `causal`, a sliding
    `window`, `sinks` always-visible first keys, a bidirectional `prefix` (archc.kernels.attention has
    the exact predicate). RoPE: on the first `rope_dim` dims of each head, frequencies scaled by
    `rope_scaling` (archc.runtime.rope).
    """

    name = "attention_core"
    inputs = ("q", "k", "v")
    attrs = {
        "heads": A(int, positive=True),
        "kv_heads": A(int, positive=True),
        "head_dim": A((int, type(None)), None),
        "causal": A(bool, True),
        "window": A((int, type(None)), None, positive=True),
        "sinks": A(int, 0),
        "prefix": A(int, 0),
        "rope": A((bool, str), False),  # true: RoPE over positions 0..T-1; "msrope": Qwen-Image's 3-axis MSRoPE
        "rope_theta": A(float, 10000.0, positive=True),
        "rope_dim": A((int, type(None)), None, positive=True),
        "rope_scaling": A(str, "none", choices=ROPE_SCALINGS),
        "rope_factor": A(float, 1.0, positive=True),
        "rope_original_max": A(int, 0),
        "rope_low_freq_factor": A(float, 1.0, positive=True),
        "rope_high_freq_factor": A(float, 4.0, positive=True),
        "rope_beta_fast": A(float, 32.0, positive=True),
        "rope_beta_slow": A(float, 1.0, positive=True),
        "rope_attention_factor": A((float, type(None)), None, positive=True),
        "rope_truncate": A(bool, True),
        "rope_grid": A((list, type(None)), None),  # MSRoPE: [rows, cols] of the image's patch tokens
        "rope_axes": A((list, type(None)), None),  # MSRoPE: [frame, rows, cols] widths (default ~ 1/8, 7/16, 7/16)
        "rope_text_first": A(bool, False),  # MSRoPE: the text tokens come before the image's (Qwen-Image)
        "qk_norm": A(bool, False),
        "norm_eps": A(float, 1e-6, positive=True),
        "scale": A((float, type(None)), None, positive=True),
        "softcap": A((float, type(None)), None, positive=True),
        "alibi": A(bool, False),
        "relative_buckets": A(int, 0),
        "relative_max_distance": A(int, 128, positive=True),
        "dropout": A(float, 0.0, unit=True),
        "padding_mask": A(bool, False),  # a 4th argument: the key padding mask [B, S]
        "position_bias": A(bool, False),  # a last argument: the bias added to the scores
        "kernel": A((str, type(None)), None),  # chosen by choose_kernels
        "kernel_reason": A((str, type(None)), None),
    }
    pure = False
    user = False
    kernel_family = "attention"
    kernel_groups = ("attention",)
    line_comment = False  # the forward ends with a reshape; its kernel comment says where it came from

    def infer(self, node, ins, graph):
        a = node.attrs
        q, k, v = ins[:3]
        if len(q) != 3:
            raise SpecError(f"attention expects a [B, T, D] stream, got {fmt_shape(q)}", node.span)
        if len(k) != 3 or k[:2] != v[:2] or k[0] != q[0]:
            raise SpecError(f"keys and values must be [B, S, D] streams with the queries' batch dim {q[0]}, "
                            f"got {fmt_shape(k)} and {fmt_shape(v)}", node.span)
        self._check_mask(node)
        width = need_width(node, q, "query")
        if width % a["heads"]:
            near = [h for d in range(1, 1000) for h in (a["heads"] - d, a["heads"] + d)
                    if 0 < h <= width and width % h == 0][:2]
            such = f", such as {' or '.join(map(str, sorted(near)))}" if near else ""
            raise SpecError(f"the query width {width} does not split into heads={a['heads']}", node.span,
                            hint=f"use heads that divide {width}{such}, or give head_dim")
        if a["head_dim"] is None:
            a["head_dim"] = width // a["heads"]
        hd = a["head_dim"]
        if hd * a["heads"] != width:
            raise SpecError(f"heads={a['heads']} × head_dim={hd} = {hd * a['heads']} but queries are {width} wide",
                            node.span)
        if a["heads"] % a["kv_heads"]:
            raise SpecError(
                f"heads={a['heads']} must be a multiple of kv_heads={a['kv_heads']} "
                "(each key/value head serves a group of query heads)",
                node.span,
            )
        for what, shape in (("key", k), ("value", v)):
            if shape[-1] != a["kv_heads"] * hd:
                raise SpecError(
                    f"{what}s have shape {fmt_shape(shape)} but kv_heads={a['kv_heads']} × head_dim={hd} "
                    f"needs width {a['kv_heads'] * hd}",
                    node.span,
                )
        if a["rope"] == "msrope":
            self._check_msrope(node, q, k, hd)
        elif a["rope"] and a["rope_dim"] is None and hd % 2:
            raise SpecError(f"RoPE needs an even head_dim, got {hd}", node.span, hint="or rotate part of it: rope_dim")
        if a["rope_dim"] is not None and a["rope_dim"] > hd:
            raise SpecError(f"rope_dim={a['rope_dim']} is more than head_dim={hd}: RoPE turns the first rope_dim "
                            "dims of each head", node.span)
        mask, bias = self.extras(node, ins)
        if mask is not None and (len(mask) != 2 or not dims.same(mask[0], q[0]) or not dims.same(mask[1], k[1])):
            raise SpecError(f"`mask=` is a key padding mask [B, S] for keys {fmt_shape(k[:2])}, got {fmt_shape(mask)}",
                            node.span)
        if bias is not None:
            want = ("1 or " + str(q[0]), a["heads"], q[1], k[1])
            if len(bias) != 4 or not (bias[0] == 1 or dims.same(bias[0], q[0])) or bias[1] != a["heads"] or \
                    not dims.same(bias[2], q[1]) or not dims.same(bias[3], k[1]):
                raise SpecError(f"`position_bias=` is added to the scores [{', '.join(map(str, want))}], got "
                                f"{fmt_shape(bias)}", node.span)
        return q

    @staticmethod
    def _check_msrope(node, q, k, hd) -> None:
        """The image grid fits the sequence, and the axes split the head."""
        a = node.attrs
        rows, cols = a["rope_grid"]
        if isinstance(q[1], int) and q[1] < rows * cols:
            raise SpecError(f"MSRoPE: a sequence of {q[1]} tokens cannot hold the {rows}×{cols} image grid "
                            f"(rope_grid={a['rope_grid']})", node.span)
        if not dims.same(q[1], k[1]):
            raise SpecError(f"MSRoPE places the tokens of one joint sequence; queries {fmt_shape(q)} and keys "
                            f"{fmt_shape(k)} differ in length", node.span)
        axes = a["rope_axes"]
        if axes is None:
            try:
                a["rope_axes"] = list(msrope_axes(hd))
            except ValueError as err:
                raise SpecError(f"MSRoPE: {err}", node.span) from None
        elif sum(axes) != hd:
            raise SpecError(f"MSRoPE: rope_axes={axes} sum to {sum(axes)}, not the head size {hd}", node.span)

    @staticmethod
    def extras(node, items):
        """The padding mask and the position bias among the node's arguments (or their shapes), or None."""
        rest = list(items[3:])
        mask = rest.pop(0) if node.attrs.get("padding_mask") else None
        bias = rest.pop(0) if node.attrs.get("position_bias") else None
        return mask, bias

    @staticmethod
    def scored(node) -> bool:
        """A padding mask or a position bias: the scores take an additive float mask."""
        return bool(node.attrs.get("padding_mask") or node.attrs.get("position_bias"))

    @staticmethod
    def _check_mask(node) -> None:
        a = node.attrs
        if a["window"] is not None and a["window"] < 1:
            raise SpecError(f"attention: `window` must be at least 1 (key j is visible to query i when "
                            f"i-window < j <= i), got {a['window']}", node.span,
                            hint="leave `window` out for no window")
        for name in ("sinks", "prefix"):
            if a[name] < 0:
                raise SpecError(f"attention: `{name}` must be 0 or more, got {a[name]}", node.span)
        if a["sinks"] and a["window"] is None:
            raise SpecError(f"attention: sinks={a['sinks']} needs a window: without one every earlier key is "
                            "visible already", node.span, hint="add window=N, or drop sinks")
        if a["prefix"] and not a["causal"] and a["window"] is None:
            raise SpecError(f"attention: prefix={a['prefix']} has no effect on bidirectional attention without a "
                            "window: every position sees every other already", node.span,
                            hint="drop prefix, or use causal=true (prefix-LM)")

    def describe_node(self, node) -> str:
        """The mask and score modifications in the spec's words, for kernel reasons: `causal, window=64, sinks=4`,
        `causal, softcap=50.0`."""
        a = node.attrs
        words = ["causal" if a["causal"] else "bidirectional"]
        words += [f"{k}={a[k]}" for k in ("window", "sinks", "prefix") if a[k]]
        if a["softcap"] is not None:
            words.append(f"softcap={a['softcap']}")
        if a["alibi"]:
            words.append("ALiBi")
        if a["relative_buckets"]:
            words.append("T5 relative bias")
        return ", ".join(words)

    @staticmethod
    def masked(node) -> bool:
        """A mask beyond what SDPA's is_causal expresses."""
        a = node.attrs
        return a["window"] is not None or bool(a["sinks"]) or bool(a["prefix"])

    @staticmethod
    def biased(node) -> bool:
        """A position bias added to the scores (ALiBi or T5's table)."""
        return node.attrs["alibi"] or bool(node.attrs["relative_buckets"])

    @staticmethod
    def windowed(node) -> bool:
        """Each query reaches a bounded number of keys: its cost grows linearly in T."""
        return node.attrs["window"] is not None

    def unfit(self, node, kernel: str, graph) -> str | None:
        """Why `kernel` cannot compute this attention, or None. Soft-capping needs a kernel that modifies
        scores (math, flex); a position bias one that adds to them (math, flex, sdpa_mask's float mask)."""
        a = node.attrs
        if self.scored(node):
            if a["softcap"] is not None:
                return "a padding mask or position bias runs through SDPA, which cannot soft-cap scores"
            return None if kernel == "sdpa" else (f"`{kernel}` takes no padding mask or position bias; SDPA with an "
                                                  "additive mask does")
        capped, biased = a["softcap"] is not None, self.biased(node)
        if kernel in ("sdpa", "local", "sdpa_mask") and capped:
            return f"`{kernel}` cannot soft-cap scores (softcap={a['softcap']}): math or flex can"
        if kernel in ("sdpa", "local") and biased:
            return f"`{kernel}` cannot add a position bias to the scores: math, flex or sdpa_mask can"
        if kernel == "sdpa" and self.masked(node):
            return f"SDPA's is_causal cannot express {self.describe_node(node)}"
        if kernel == "sdpa" and a["causal"] and not self.same_length(node, graph):
            return ("SDPA's is_causal aligns queries with the first keys, but keys here have another length "
                    "(archc aligns them at the end)")
        if kernel == "local" and a["window"] is None:
            return "`local` needs a window"
        if kernel == "flex" and a["dropout"]:
            return "flex_attention has no attention dropout"
        return None

    def choose_kernel(self, node, graph) -> tuple[str, str]:
        """SDPA for a plain causal mask or none, or with a padding mask or position bias (one additive mask);
        `auto` (decided at run time) for everything else."""
        if self.scored(node):
            what = " and ".join(w for w, on in (("padding mask", node.attrs["padding_mask"]),
                                               ("position bias", node.attrs["position_bias"])) if on)
            return "sdpa", f"{what}: SDPA with one additive mask (AF.score_bias)"
        a = node.attrs
        if self.unfit(node, "sdpa", graph) is None:
            if a["causal"]:
                return "sdpa", "plain causal mask: SDPA with is_causal=True (flash / memory-efficient back ends)"
            return "sdpa", "no mask: SDPA without a mask (flash / memory-efficient back ends)"
        masked = self.describe_node(node)
        if not self.masked(node) and not self.biased(node) and a["softcap"] is None:
            masked += " over keys of another length"
        if a["softcap"] is not None:
            cpu = "the explicit-score math kernel (the soft-cap needs the scores)"
        elif self.biased(node):
            cpu = "SDPA with the bias as a float mask"
        elif a["window"] is not None:
            cpu = "the blocked local kernel (linear in T)"
        else:
            cpu = "SDPA with a boolean mask"
        gpu = "flex_attention (block-sparse" + (", the score modification as its score_mod)"
                                                if a["softcap"] is not None or self.biased(node) else ")")
        return "auto", (f"{masked}: at run time {gpu} on CUDA, {cpu} elsewhere"
                        + (" and while dropout is on" if a["dropout"] else ""))

    @staticmethod
    def same_length(node, graph) -> bool:
        q, k, _v = graph.args(node.id)
        return graph.node(q).shape[1] == graph.node(k).shape[1]

    weights_at_scope = True

    def weights(self, node, ins):
        a = node.attrs
        hd = a["head_dim"]
        weights = {"q_norm.weight": (hd,), "k_norm.weight": (hd,)} if a["qk_norm"] else {}
        if a["relative_buckets"]:
            weights["relative_bias.weight"] = (a["relative_buckets"], a["heads"])
        return weights

    def roles(self, node):
        return {"relative_bias.weight": "embedding"}  # a table looked up by distance, not a matrix

    def kv_per_token(self, node) -> float:
        """Floats cached per token to decode: a key and a value per KV head."""
        return 2 * node.attrs["kv_heads"] * node.attrs["head_dim"]

    def extra_modules(self, node, ins):
        a = node.attrs
        mods = []
        if a["qk_norm"]:
            mods += [("q_norm", f"nn.RMSNorm({a['head_dim']!r}, eps={a['norm_eps']!r})"),
                     ("k_norm", f"nn.RMSNorm({a['head_dim']!r}, eps={a['norm_eps']!r})")]
        if a["rope"] == "msrope":
            text_first = ", text_first=True" if a["rope_text_first"] else ""
            mods.append(("rope", f"AF.MSRotaryEmbedding({a['head_dim']!r}, grid={tuple(a['rope_grid'])!r}, "
                                 f"axes={tuple(a['rope_axes'])!r}, theta={a['rope_theta']!r}{text_first})"))
        elif a["rope"]:
            mods.append(("rope", f"AF.RotaryEmbedding({a['head_dim']!r}, theta={a['rope_theta']!r}"
                                 f"{self._rope_options(a)})"))
        if a["alibi"]:
            mods.append(("alibi", f"AF.ALiBi({a['heads']!r})"))
        if a["relative_buckets"]:
            mods.append(("relative_bias", f"AF.RelativePositionBias({a['heads']!r}, {a['relative_buckets']!r}, "
                                          f"{a['relative_max_distance']!r}, bidirectional={not a['causal']!r})"))
        if self.decodes(node, ins):
            mods.append(("kv_cache", "AF.KVCache()"))
        return mods

    @staticmethod
    def _rope_options(a) -> str:
        """`, rope_dim=8, scaling=AF.Llama3RopeScaling(...)`: RotaryEmbedding's options beyond theta."""
        text = f", rope_dim={a['rope_dim']!r}" if a["rope_dim"] is not None else ""
        if a["rope_scaling"] != "none":
            cls = SCALINGS[a["rope_scaling"]].__name__
            fields = ", ".join(f"{field}={a[option]!r}" for option, field in SCALING_OPTIONS[a["rope_scaling"]].items())
            text += f", scaling=AF.{cls}({fields})"
        return text

    def decodes(self, node, ins) -> bool:
        """Causal self-attention (keys as long as queries) decodes token by token from a KV cache (not yet with a
        padding mask or position bias given as tensors, which would need their cached part too)."""
        return (node.attrs["causal"] and ins[0][1] == ins[1][1] and not self.scored(node)
                and node.attrs["rope"] != "msrope")

    def cannot_decode(self, node, ins):
        if self.decodes(node, ins):
            return None
        if node.attrs["rope"] == "msrope":
            return "MSRoPE places a whole joint sequence"
        return "a padding mask or position bias" if self.scored(node) else "not causal self-attention"

    def forward(self, node, args, out, mod, ins):
        a = node.attrs
        q, k, v = args[:3]
        h, kv, hd = a["heads"], a["kv_heads"], a["head_dim"]
        s = "T" if ins[0][1] == ins[1][1] else "S"  # the keys' length, in the local names
        lines = [
            f"B, T, _ = {q}.shape",
            f"{q}_BHTd = {q}.view(B, T, {h!r}, {hd!r}).transpose(1, 2)",
            f"{k}_BK{s}d = {k}.view(B, -1, {kv!r}, {hd!r}).transpose(1, 2)",
            f"{v}_BK{s}d = {v}.view(B, -1, {kv!r}, {hd!r}).transpose(1, 2)",
        ]
        qh, kh, vh = f"{q}_BHTd", f"{k}_BK{s}d", f"{v}_BK{s}d"
        if a["qk_norm"]:
            lines.append(f"{qh}, {kh} = self.q_norm({qh}), self.k_norm({kh})")
        decodes = self.decodes(node, ins)
        if a["rope"]:
            offset = ", offset=self.kv_cache.length" if decodes else ""
            lines.append(f"{qh}, {kh} = self.rope({qh}, {kh}{offset})")
        drop = f", dropout_p={a['dropout']!r} if self.training else 0.0" if a["dropout"] else ""
        mask = "".join(f", {name}={a[name]!r}" for name in ("window", "sinks", "prefix") if a[name])
        scores = "".join(f", {name}={a[name]!r}" for name in ("scale", "softcap") if a[name] is not None)
        if self.biased(node):
            scores += f", position_bias=self.{'alibi' if a['alibi'] else 'relative_bias'}"
        if self.scored(node):
            padding, bias = self.extras(node, args)
            extra = "".join(f", {name}={value}" for name, value in (("mask", padding), ("bias", bias)) if value)
            gqa = ", enable_gqa=True" if kv != h else ""
            scale = f", scale={a['scale']!r}" if a["scale"] is not None else ""
            lines += [comment(f"kernel: {a['kernel']} — {a['kernel_reason']}"),
                      f"scores_bias = AF.score_bias({qh}, {kh}, causal={a['causal']!r}{mask}{extra})",
                      f"{out} = F.scaled_dot_product_attention({qh}, {kh}, {vh}, "
                      f"attn_mask=scores_bias{drop}{scale}{gqa})",
                      f"{out} = {out}.transpose(1, 2).reshape(B, T, {h * hd!r})"]
            return lines
        if a["kernel"] == "sdpa":
            gqa = ", enable_gqa=True" if kv != h else ""
            call = f"F.scaled_dot_product_attention({qh}, {kh}, {vh}, is_causal={a['causal']!r}{drop}{scores}{gqa})"
        else:
            call = f"AF.attention_{a['kernel']}({qh}, {kh}, {vh}, causal={a['causal']!r}{mask}{drop}{scores})"
        chosen = [comment(f"kernel: {a['kernel']} — {a['kernel_reason']}"), f"{out} = {call}"]
        if decodes:
            lines += ["if self.kv_cache.active:  # decoding: attend over the cached keys and values too",
                      f"    {out} = self.kv_cache.attend({qh}, {kh}, {vh}, causal=True{mask}{scores})",
                      "else:", *("    " + line for line in chosen)]
        else:
            lines += chosen
        lines.append(f"{out} = {out}.transpose(1, 2).reshape(B, T, {h * hd!r})")
        return lines

    def keys_per_query(self, node, s: int) -> int:
        """Keys each query is counted against: all S, or with a window the keys it reaches
        (w causal, 2w-1 bidirectional) plus the max(sinks, prefix) first ones, at most S."""
        a = node.attrs
        if a["window"] is None:
            return s
        reach = a["window"] if a["causal"] else 2 * a["window"] - 1
        return min(s, reach + max(a["sinks"], a["prefix"]))

    def flops(self, node, ins, out, sizes):
        # Two batched products per head (q kᵀ and p v). Without a window every key is
        # counted, even when causal, as FlopCounterMode does for SDPA; with one, the
        # band a query reaches is counted in full, so the cost grows linearly in T.
        q, k = ins[:2]
        b_t = numel(q[:-1], sizes)
        s = round(dim_value(k[-2], sizes))
        return 4 * b_t * self.keys_per_query(node, s) * node.attrs["heads"] * node.attrs["head_dim"]


def _check(ctx, v) -> None:
    """Cross-option checks of `attention` / `cross_attention`, located at the option at fault."""
    if isinstance(v["qk_norm"], str) and v["qk_norm"] not in QK_NORMS:
        raise SpecError(f"`qk_norm` must be true, false, \"head\" or \"full\", got \"{v['qk_norm']}\"",
                        ctx.where("qk_norm"), hint=did_you_mean(v["qk_norm"], QK_NORMS))
    _check_msrope(ctx, v)
    rope_options = [o for o in ("rope_dim", "rope_scaling") if ctx.given(o)]
    if rope_options and v["rope"] is not True:
        why = "MSRoPE" if v["rope"] else "this attention"
        raise SpecError(f"`{rope_options[0]}` shapes RoPE, which {why} does not use",
                        ctx.where(rope_options[0]), hint="use rope=true" if v["rope"] else "add rope=true")
    hd = v["head_dim"]  # else the width decides it, and the core's shape check compares rope_dim with it
    if v["rope_dim"] is not None:
        if v["rope_dim"] % 2:
            raise SpecError(f"RoPE turns pairs of dims: `rope_dim` must be even, got {v['rope_dim']}",
                            ctx.where("rope_dim"))
        if hd is not None and v["rope_dim"] > hd:
            raise SpecError(f"rope_dim={v['rope_dim']} is more than the head size {hd}: RoPE turns the first "
                            "rope_dim dims of each head", ctx.where("rope_dim"))
    if v["rope_scaling"] != "none":
        if v["rope_original_max"] <= 0:
            raise SpecError(f"rope_scaling=\"{v['rope_scaling']}\" needs `rope_original_max`, the context length the "
                            "model was trained with (positive)", ctx.where("rope_original_max"))
        if v["rope_scaling"] == "llama3" and not v["rope_high_freq_factor"] > v["rope_low_freq_factor"]:
            raise SpecError(f"llama3 RoPE scaling needs rope_high_freq_factor > rope_low_freq_factor, got "
                            f"{v['rope_high_freq_factor']} and {v['rope_low_freq_factor']}",
                            ctx.where("rope_high_freq_factor"))
    if "relative_buckets" not in v:
        return
    buckets = v["relative_buckets"]
    if buckets and v["alibi"]:
        raise SpecError("ALiBi and a T5 relative bias are two position biases: choose one",
                        ctx.where("relative_buckets"))
    if buckets:
        exact = (buckets // 2 if not v["causal"] else buckets) // 2  # exact distances before the log buckets
        if exact < 1:
            raise SpecError(f"`relative_buckets` must be at least {2 if v['causal'] else 4}, got {buckets}",
                            ctx.where("relative_buckets"))
        if v["relative_max_distance"] <= exact:
            raise SpecError(f"`relative_max_distance` must exceed the {exact} exactly bucketed distances, got "
                            f"{v['relative_max_distance']}", ctx.where("relative_max_distance"))
    elif buckets < 0:
        raise SpecError(f"`relative_buckets` must be 0 (no bias) or positive, got {buckets}",
                        ctx.where("relative_buckets"))


def _check_msrope(ctx, v) -> None:
    """`rope` is true, false or "msrope"; MSRoPE needs the image's patch grid, and its options need it."""
    if isinstance(v["rope"], str) and v["rope"] != "msrope":
        raise SpecError(f"`rope` must be true, false or \"msrope\", got \"{v['rope']}\"", ctx.where("rope"),
                        hint=did_you_mean(v["rope"], ["msrope"]))
    if v["rope"] != "msrope":
        given = [o for o in ("rope_grid", "rope_axes", "rope_text_first") if ctx.given(o)]
        if given:
            raise SpecError(f"`{given[0]}` places tokens for MSRoPE, which this attention does not use",
                            ctx.where(given[0]), hint='add rope="msrope"')
        return
    grid, axes = v["rope_grid"], v["rope_axes"]
    if grid is None:
        raise SpecError('rope="msrope" needs the image\'s patch grid: rope_grid=[rows, cols] (the image tokens; '
                        "the rest of the sequence is text)", ctx.where("rope"))
    if len(grid) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in grid):
        raise SpecError(f"`rope_grid` is [rows, cols], two positive ints, got {grid!r}", ctx.where("rope_grid"))
    if axes is not None and (len(axes) != 3 or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                                                        and n % 2 == 0 for n in axes)):
        raise SpecError(f"`rope_axes` is [frame, rows, cols], three positive even ints, got {axes!r}",
                        ctx.where("rope_axes"))


def _attention(ctx, x: str, memory: str, v, mask: str | None, bias: str | None) -> str:
    """Queries from `x`, keys and values from `memory` (`x` itself for self-attention), core, gate, output."""
    if mask is not None and ctx.graph.node(mask).dtype != "bool":
        raise SpecError("`mask=` takes a key padding mask (true/false: a `Mask[B, S]` input or a comparison), not a "
                        f"{ctx.graph.node(mask).dtype} tensor", ctx.where("mask"))
    if bias is not None and (v["alibi"] or v.get("relative_buckets")):
        raise SpecError("`position_bias=` and a built-in position bias (alibi / relative_buckets) are two position "
                        "biases: choose one", ctx.where("position_bias"))
    heads = v["heads"]
    kv_heads = v["kv_heads"] or heads
    hd = v["head_dim"]
    _check(ctx, v)
    # Without an explicit head_dim, widths follow x: q is as wide as x, and so are k, v per head.
    of = None if memory == x else x  # None: the linear's own input
    q_out = heads * hd if hd else Width()
    kv_out = kv_heads * hd if hd else Width(
        kv_heads, heads, of=of, why=f"the input width {{width}} does not split into heads={heads}; "
                                   "choose heads that divide it, or give head_dim")
    q = ctx.linear(x, q_out, "q", bias=v["bias"])
    k = ctx.linear(memory, kv_out, "k", bias=v["bias"])
    val = ctx.linear(memory, kv_out, "v", bias=v["bias"])
    full = v["qk_norm"] == "full"
    if full:  # OLMo-2: one RMSNorm over all heads of the projection, before the split into heads and RoPE
        q, k = ctx.rms_norm(q, v["norm_eps"], "q_norm"), ctx.rms_norm(k, v["norm_eps"], "k_norm")
    defaults = AttentionCore.attrs
    options = {name: v[name] if name in v else defaults[name].default for name in _CORE_OPTIONS}
    core = ctx.core("attention_core", [q, k, val, *(t for t in (mask, bias) if t is not None)], {
        **options, "heads": heads, "kv_heads": kv_heads, "head_dim": hd, "qk_norm": bool(v["qk_norm"]) and not full,
        "padding_mask": mask is not None, "position_bias": bias is not None})
    if v["gate"]:  # Qwen3-Next: y · sigmoid(x W_g), one gate per element of the heads' output
        gate = ctx.act("sigmoid", ctx.linear(x, q_out, "gate"), var="gate")
        core = ctx.add("mul", [core, gate], name="mul", var="y")
    out_bias = v["bias"] if v["out_bias"] is None else v["out_bias"]
    # The output projection maps back to the width of x.
    return ctx.linear(core, Width(of=x), "o", bias=out_bias)


# The core's options a spec sets through `attention` / `cross_attention`, as it names them.
_CORE_OPTIONS = ("causal", "window", "sinks", "prefix", "rope", "rope_theta", "norm_eps", "dropout",
                 # since the knobs of the released families (after the projection options, positionally)
                 "scale", "softcap", "rope_dim", "rope_scaling", "rope_factor", "rope_original_max",
                 "rope_low_freq_factor", "rope_high_freq_factor", "rope_beta_fast", "rope_beta_slow",
                 "rope_attention_factor", "rope_truncate", "alibi", "relative_buckets", "relative_max_distance",
                 "rope_grid", "rope_axes", "rope_text_first")
_MSROPE = ("rope_grid", "rope_axes", "rope_text_first")  # after `gate` in `attention`'s positional order
_SELF_ONLY = ("relative_buckets", "relative_max_distance")  # T5's bias: distances within one sequence


def _attention_attrs(causal: bool) -> dict[str, A]:
    """The spec options of `attention` / `cross_attention` (positional order: the first ones as they have
    always been): the core's mask, score, position and norm options, plus projection options; head counts
    and width may be left to follow the input."""
    core = AttentionCore.attrs
    later = [name for name in _CORE_OPTIONS[8:] if (causal or name not in _SELF_ONLY) and name not in _MSROPE]
    return {
        "heads": core["heads"],
        "kv_heads": A((int, type(None)), None, positive=True),
        "head_dim": A((int, type(None)), None, positive=True),
        "causal": A(bool, causal),
        **{name: core[name] for name in ("window", "sinks", "prefix", "rope", "rope_theta")},
        "qk_norm": A((bool, str), False),  # true / "head": per head; "full": over all heads (OLMo-2)
        "norm_eps": core["norm_eps"],
        "dropout": core["dropout"],
        "bias": A(bool, False),
        "out_bias": A((bool, type(None)), None),
        **{name: core[name] for name in later},
        "gate": A(bool, False),
        **{name: core[name] for name in _MSROPE},
    }


@composite("attention", cls="Attention", default_name="attn", attrs=_attention_attrs(causal=True),
           optional=("mask", "position_bias"))
def lower_attention(ctx, args, v) -> str:
    x, mask, bias = args
    return _attention(ctx, x, x, v, mask, bias)


@composite("cross_attention", cls="CrossAttention", default_name="cross_attn", inputs=("x", "memory"),
           attrs=_attention_attrs(causal=False), optional=("mask", "position_bias"))
def lower_cross_attention(ctx, args, v) -> str:
    x, memory, mask, bias = args
    return _attention(ctx, x, memory, v, mask, bias)


_PROJECTION_OPTIONS = ("bias", "out_bias", "gate")  # `attention`'s own linears, which `attend` leaves to the spec


@composite("attend", cls="Attend", default_name="attend", inputs=("q", "k", "v"),
           attrs={name: spec for name, spec in _attention_attrs(causal=True).items()
                  if name not in _PROJECTION_OPTIONS},
           optional=("mask", "position_bias"))
def lower_attend(ctx, args, v) -> str:
    """Attention over queries, keys and values the spec projected itself ([B, T, H·d], [B, S, K·d]):
    the core of `attention` without its linears, so streams with their own weights can attend jointly
    (MMDiT: each stream's q, k, v concatenated along the sequence)."""
    q, k, val, mask, bias = args
    _check(ctx, v)
    if v["qk_norm"] == "full":
        raise SpecError('`attend` takes projected heads: qk_norm="full" normalises a projection; use qk_norm=true '
                        "(per head) or normalise q and k in the spec", ctx.where("qk_norm"))
    if mask is not None and ctx.graph.node(mask).dtype != "bool":
        raise SpecError("`mask=` takes a key padding mask (true/false), not a "
                        f"{ctx.graph.node(mask).dtype} tensor", ctx.where("mask"))
    if bias is not None and (v["alibi"] or v.get("relative_buckets")):
        raise SpecError("`position_bias=` and a built-in position bias (alibi / relative_buckets) are two position "
                        "biases: choose one", ctx.where("position_bias"))
    options = {name: v[name] for name in _CORE_OPTIONS}
    return ctx.core("attention_core", [q, k, val, *(t for t in (mask, bias) if t is not None)], {
        **options, "heads": v["heads"], "kv_heads": v["kv_heads"] or v["heads"], "head_dim": v["head_dim"],
        "qk_norm": bool(v["qk_norm"]), "padding_mask": mask is not None, "position_bias": bias is not None})


@register
class RelativePositionBias(OpDef):
    """T5's learned position bias: a [buckets, heads] table read at the bucketed distance of each key of
    `memory` from each query of `x`, as [1, heads, T, S]; made once and passed to every layer of a stack."""

    name = "relative_position_bias"
    inputs = ("x", "memory")
    attrs = {"heads": A(int, positive=True), "buckets": A(int, 32, positive=True),
             "max_distance": A(int, 128, positive=True), "bidirectional": A(bool, True)}
    pure = False

    def infer(self, node, ins, graph):
        x, memory = ins
        a = node.attrs
        if len(x) < 2 or len(memory) < 2:
            raise SpecError(f"relative_position_bias reads the lengths of two sequences [B, T, ...] and [B, S, ...], "
                            f"got {fmt_shape(x)} and {fmt_shape(memory)}", node.span)
        exact = (a["buckets"] // 2 if a["bidirectional"] else a["buckets"]) // 2
        if exact < 1 or a["max_distance"] <= exact:
            raise SpecError(f"relative_position_bias: {a['buckets']} buckets"
                            + (" (half each way)" if a["bidirectional"] else "")
                            + f" keep {exact} exact distances, so max_distance must exceed {exact} and buckets be at "
                              f"least {4 if a['bidirectional'] else 2}", node.span)
        return (1, a["heads"], x[1], memory[1])

    def weights(self, node, ins):
        return {"weight": (node.attrs["buckets"], node.attrs["heads"])}

    def roles(self, node):
        return {"weight": "embedding"}

    def init(self, node, ins):
        a = node.attrs
        return (f"AF.RelativePositionBias({a['heads']!r}, {a['buckets']!r}, max_distance={a['max_distance']!r}, "
                f"bidirectional={a['bidirectional']!r})")

    def forward(self, node, args, out, mod, ins):
        return [f"{out} = {mod}.scores({args[0]}, {args[1]})"]
