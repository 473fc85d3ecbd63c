"""The constructs of issue "A language, not a menu", each compiled, run and compared with plain PyTorch:
tensors that move (indexing, slicing, concat / stack / split / chunk, axes, reshape, expand, shift, where),
several values at once, elementwise arithmetic and reductions with their dtypes, learned tensors and
`init=`, losses, attention's padding mask / position bias / scale; and the located errors of each, the
symbolic-shape checker among them."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import archc
from archc.runtime.position_bias import relative_bucket as relative_position_bucket
from archc.runtime.tensors import shift


def compiled(text: str, **overrides):
    return archc.compile(text, name="t.arch", **overrides)


def run(text: str, *args, **overrides):
    torch.manual_seed(0)
    c = compiled(text, **overrides)
    model = c.build()
    return model, model(*args)


def error(text: str, **overrides) -> archc.SpecError:
    with pytest.raises(archc.SpecError) as info:
        compiled(text, **overrides)
    return info.value


def at(err: archc.SpecError) -> tuple[int, int]:
    return err.span.line, err.span.column


# ---- tensors that move ----------------------------------------------------------------------------

MOVES = """
param d: int = 8
model M(x: Tensor[B, T, d], y: Tensor[B, L, d]) {
    first = x[:, 0]
    last = x[:, -1]
    head = x[..., :d // 2]
    tail = x[:, 1:]
    most = x[:, :T - 1]
    every = x[..., ::2]
    joint = concat([x, y], dim=1)
    a, b = split(joint, [T, L], dim=1)
    p, q = chunk(x, 2)
    stacked = stack([x, x * 2.0], dim=0)
    col = unsqueeze(first, 1)
    row = squeeze(col, 1)
    heads = transpose(reshape(x, [B, T, 2, -1]), 1, 2)
    flat = flatten(heads, 2)
    perm = permute(x, [2, 0, 1])
    cls = expand(reshape(first, [B, 1, d]), [B, T, d])
    later = shift(x, 1, fill=0)
    pick = where(x > 0, x, 0.0)
    named = softmax(x, dim=T)
    return first, last, head, tail, most, every, joint, a, b, p, q, stacked, row, heads, flat, perm, cls, later,
        pick, named
}
"""


def test_tensor_moves_compute_what_pytorch_does():
    x, y = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    _model, out = run(MOVES, x, y)
    want = {
        "first": x[:, 0], "last": x[:, -1], "head": x[..., :4], "tail": x[:, 1:], "most": x[:, :4],
        "every": x[..., ::2], "joint": torch.cat([x, y], 1), "a": x, "b": y, "p": x[..., :4], "q": x[..., 4:],
        "stacked": torch.stack([x, x * 2]), "row": x[:, 0], "heads": x.reshape(2, 5, 2, 4).transpose(1, 2),
        "flat": x.reshape(2, 5, 2, 4).transpose(1, 2).flatten(2), "perm": x.permute(2, 0, 1),
        "cls": x[:, :1].expand(2, 5, 8), "later": torch.cat([torch.zeros(2, 1, 8), x[:, :-1]], 1),
        "pick": torch.where(x > 0, x, 0.0), "named": x.softmax(1),
    }
    for name, value in want.items():
        torch.testing.assert_close(out[name], value, msg=name)


def test_the_shape_checker_follows_every_move():
    ir = compiled(MOVES).ir
    shapes = {name: tuple(ir.node(nid).shape) for name, nid in ir.outputs}
    assert shapes["joint"] == ("B", "L + T", 8)
    assert shapes["a"] == ("B", "T", 8) and shapes["b"] == ("B", "L", 8)  # the split of [B, T + L, d] checked
    assert shapes["first"] == ("B", 8) and shapes["head"] == ("B", "T", 4)
    assert shapes["tail"] == ("B", "T - 1", 8) and shapes["most"] == ("B", "T - 1", 8)
    assert shapes["stacked"] == (2, "B", "T", 8) and shapes["heads"] == ("B", 2, "T", 4)
    assert shapes["flat"] == ("B", 2, "4*T") and shapes["perm"] == (8, "B", "T")


def test_generated_code_reads_like_pytorch():
    source = compiled(MOVES).source
    for line in ("first = x[:, 0]", "head = x[..., :4]", "most = x[:, :-1]", "joint = torch.cat([x, y], dim=1)",
                 "a, b = joint.split([x.size(1), y.size(1)], dim=1)", "p, q = x.chunk(2, dim=-1)",
                 "heads = reshape.transpose(1, 2)", "cls = reshape.expand(x.size(0), x.size(1), 8)",
                 "later = AF.shift(x, 1, dim=1, fill=0)", "pick = torch.where(gt, x, 0.0)",
                 "named = F.softmax(x, dim=1)"):
        assert line in source, line


@pytest.mark.parametrize("body, where, phrase", [
    ("a, b = split(x, [T, 3], dim=1)", (3, 12), "split sizes [T, 3] add up to T + 3, but axis 1 of [B, T, 8]"),
    ("a, b = split(concat([x, x], dim=1), [T, L], dim=1)", (3, 12), "add up to L + T, but axis 1 of [B, 2*T, 8]"),
    ("a = concat([x, reshape(x, [B, T, 2, 4])], dim=1)", (3, 9), "concat needs tensors of one rank"),
    ("a, b, c = chunk(x, 3)", (3, 15), "chunk(3) needs an axis it divides, but axis 2 of [B, T, 8] has size 8"),
    ("a = x[:, ::2]", (3, 9), "cannot tell how long the slice ::2 of the symbolic axis T is"),
    ("a = reshape(x, [B, T, 3, -1])", (3, 9), "3*B*T does not divide 8*B*T"),
    ("a = x[:, :, 9:]", (3, 9), "slice bound 9 is past the end of axis 2"),
    ("a = x[0, 0, 0, 0]", (3, 9), "4 positions index a tensor of shape [B, T, 8] (3 axes)"),
    ("a = squeeze(x, 1)", (3, 9), "squeeze removes an axis of size 1, but axis 1 of [B, T, 8] has size T"),
    ("a = softmax(x, dim=5)", (3, 9), "dim=5 is out of range for [B, T, 8]"),
    ("a = mean(x, dim=L)", (3, 9), "dim=L names an axis by its size, but no axis of [B, T, 8] has that size"),
    ("a = expand(x, [B, T, 16])", (3, 9), "axis 2 of [B, T, 8] has size 8, not 16"),
    ("a = where(x, x, 0.0)", (3, 9), "`where` needs a mask (true/false) as its condition"),
    ("a, b = chunk(x, 3, dim=0)", (3, 5), "2 names but `chunk(...)` gives 3 values"),
    ("a = chunk(x, 2)", (3, 5), "`chunk(...)` gives 2 values; name each of them"),
    ("a = x + chunk(x, 2)", (3, 13), "`chunk(...)` gives 2 values; name them first"),
    ("a = x[x > 0]", (3, 11), "indexing with a tensor is not built"),
])
def test_moves_that_do_not_fit_are_located_errors(body, where, phrase):
    err = error(f"model M(x: Tensor[B, T, 8], y: Tensor[B, L, 8]) {{\n    y2 = y\n    {body}\n    return a\n}}\n")
    assert phrase in err.message, err.render()
    assert at(err) == where, err.render()


# ---- several values at once -----------------------------------------------------------------------

JOINT = """
param d: int = 16
block Joint(img: Tensor[B, N, d], txt: Tensor[B, L, d]) {
    joint = concat([layer_norm(img) as img_norm, layer_norm(txt) as txt_norm], dim=1)
    a_img, a_txt = split(attention(joint, heads=2, causal=false) as attn, [N, L], dim=1)
    return img + a_img, txt + a_txt
}
model TwoStreams(img: Tensor[B, N, d], txt: Tensor[B, L, d]) {
    repeat i in 0..3 as blocks {
        img, txt = Joint(img, txt)
    }
    img, txt = txt, img
    return img, txt
}
"""


def test_blocks_return_several_tensors_and_repeat_carries_several_streams():
    img, txt = torch.randn(2, 4, 16), torch.randn(2, 3, 16)
    model, out = run(JOINT, img, txt)
    a, b = img, txt
    for block in model.blocks:
        h = torch.cat([block.img_norm(a), block.txt_norm(b)], 1)
        h = block.attn(h)
        a, b = a + h[:, :4], b + h[:, 4:]
    torch.testing.assert_close(out["img"], b)  # swapped by `img, txt = txt, img`
    torch.testing.assert_close(out["txt"], a)
    source = compiled(JOINT).source
    assert "def forward(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, ...]:" in source
    assert "for block in self.blocks:\n            img, txt = block(img, txt)" in source


def test_a_repeat_step_carrying_two_streams_returns_a_tuple_and_loops():
    # before: `LayersStep2` with a tuple-returning forward annotated `-> torch.Tensor`, and no loop
    text = ("model M(img: Tensor[B, N, 8], txt: Tensor[B, L, 8]) {\n    repeat i in 0..3 {\n"
            "        img = img + linear(img, 8) as a\n        txt = txt + linear(txt, 8) as b\n    }\n"
            "    return img, txt\n}\n")
    source = compiled(text).source
    assert "def forward(self, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, ...]:" in source
    assert "for layer in self.layers:\n            img, txt = layer(img, txt)" in source
    assert "LayersStep2" not in source
    img, txt = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    model, out = run(text, img, txt)
    for step in model.layers:
        img, txt = img + step.a(img), txt + step.b(txt)
    torch.testing.assert_close(out["img"], img)
    torch.testing.assert_close(out["txt"], txt)


def test_a_block_that_returns_several_is_unpacked_and_drops_with_underscore():
    text = JOINT.replace("img, txt = txt, img\n", "_, txt = Joint(img, txt) as last\n")
    _model, out = run(text, torch.randn(1, 2, 16), torch.randn(1, 2, 16))
    assert out["txt"].shape == (1, 2, 16)
    err = error(JOINT.replace("img, txt = Joint(img, txt)", "img = Joint(img, txt)"))
    assert "block `Joint` gives 2 values; name each of them" in err.message


# ---- elementwise, reductions, token arithmetic ------------------------------------------------------

HASH = """
param buckets: int = 1021
model Bigrams(tokens: Tokens[B, T]) {
    prev = shift(tokens, 1, fill=0)
    h = ((prev * 1000003) ^ (tokens << 7)) % buckets
    m = (tokens & 3) | (h >> 2)
    x = embedding(tokens, 256, 8) + embedding(h, buckets, 8) as bigram
    p = softmax(linear(x, 16), dim=-1)
    entropy = -sum(p * log(p + 1e-9), dim=-1)
    stats = mean(x, dim=[1, 2]) + max(x, dim=1, keepdim=true)[:, 0, 0] - min(x, dim=-1)[:, 0] + logsumexp(x)[:, 0]
    roots = sqrt(abs(x)) + exp(-abs(x)) // 1.0 - log_softmax(x, dim=-1)
    even = sum(where(tokens % 2 == 0, 1, 0), dim=1)
    return h, m, entropy, stats, roots, even
}
"""


def test_token_arithmetic_and_bit_operations_hash_ngrams_in_the_language():
    tokens = torch.randint(0, 256, (2, 9))
    model, out = run(HASH, tokens)
    prev = torch.cat([torch.zeros(2, 1, dtype=torch.long), tokens[:, :-1]], 1)
    h = ((prev * 1000003) ^ (tokens << 7)) % 1021
    assert out["h"].dtype == torch.long and torch.equal(out["h"], h)
    assert torch.equal(out["m"], (tokens & 3) | (h >> 2))
    assert torch.equal(out["even"], (tokens % 2 == 0).long().sum(1))
    # and the hashed ids look up their own table
    x = model.embedding(tokens) + model.bigram(h)
    p = model.linear(x).softmax(-1)
    torch.testing.assert_close(out["entropy"], -(p * torch.log(p + 1e-9)).sum(-1))
    stats = x.mean((1, 2)) + x.amax(1, keepdim=True)[:, 0, 0] - x.amin(-1)[:, 0] + x.logsumexp(-1)[:, 0]
    torch.testing.assert_close(out["stats"], stats)
    roots = x.abs().sqrt() + torch.exp(-x.abs()) // 1.0 - F.log_softmax(x, -1)
    torch.testing.assert_close(out["roots"], roots)


def test_the_n_gram_hash_matches_a_python_reference():
    tokens = torch.randint(0, 256, (1, 6))
    _model, out = run(HASH, tokens)
    ids = tokens[0].tolist()
    want = [((([0] + ids)[t] * 1000003) ^ (ids[t] << 7)) % 1021 for t in range(6)]
    assert out["h"][0].tolist() == want


def test_max_and_min_of_numbers_are_unchanged():
    c = compiled("param a: int = max(3, 7) - min(2, 5)\nmodel M(x: Tensor[B, 4]) {\n    return x * a\n}\n")
    assert c.params["a"] == 5


def test_a_list_of_numbers_is_indexed_when_compiling():
    c = compiled("model M(x: Tensor[B, 8]) {\n    sizes = [4, 16]\n"
                 "    return linear(x, sizes[1]) + linear(x, [16, 2][-2])\n}\n")
    assert [n.attrs["out"] for n in c.ir_after("infer_shapes").nodes() if n.op == "linear"] == [16, 16]
    err = error("model M(x: Tensor[B, 8]) {\n    return linear(x, [4, 16][2])\n}\n")
    assert "position 2 is outside a list of 2" in err.message and at(err) == (2, 30)


def test_max_of_a_call_lowers_its_argument_once():
    c = compiled("model M(x: Tensor[B, T, 8]) {\n    m = max(linear(x, 4) as proj, dim=1) + min(x, dim=1)[:, :4]\n"
                 "    return m\n}\n")
    assert [n.path for n in c.ir_after("lower").nodes() if n.op == "linear"] == ["proj"]


@pytest.mark.parametrize("body, phrase", [
    ("a = x & 1", "`&` takes integers (`Tokens`) or masks; this operand is a float tensor"),
    ("a = tokens << 1.5", "`<<` takes integers (`Tokens`); this operand is the number 1.5"),
    ("a = (tokens > 2) + 1", "a mask (true/false) takes `&`, `|`, `^`, `not` and `where(...)`, not `+`"),
    ("a = mean(tokens, dim=1)", "`mean` takes a float tensor, and this one holds integers"),
    ("a = embedding(x, 10, 4)", "`embedding` looks up integer ids (`Tokens`), but this tensor holds floats"),
    ("a = cross_entropy(x, x)", "cross_entropy takes float logits and integer labels"),
])
def test_dtypes_that_do_not_combine_are_located_errors(body, phrase):
    err = error(f"model M(x: Tensor[B, T, 8], tokens: Tokens[B, T]) {{\n    {body}\n    return a\n}}\n")
    assert phrase in err.message and err.span.line == 2, err.render()


# ---- learned tensors and init= ------------------------------------------------------------------------

LEARNED = """
param d: int = 64
param n_layers: int = 4
model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 100, d, init=normal(0.5)) as embed
    cls = learned([1, 1, d], init=trunc_normal(0.02)) as cls_token
    x = concat([expand(cls, [B, 1, d]), x], dim=1)
    gamma = learned([d], init=constant(1e-4)) as layer_scale
    alpha = learned([], init=zeros()) as rezero
    mix = learned([4, 4], init=uniform(-0.5, 0.5)) as lane_mix
    x = x + gamma * linear(x, d, init=normal(0.02 / (2 * n_layers) ** 0.5)) as proj
    gate = linear(x, d, init=zeros(), bias_init=ones()) as gate
    head = linear(x, d, bias_init=constant(0.5)) as head
    y = x * gate + alpha * head
    return y, mix
}
"""


def test_learned_tensors_and_init_rules_set_what_they_say():
    c = compiled(LEARNED)
    model = c.build()
    sd = model.state_dict()
    assert sd["cls_token"].shape == (1, 1, 64) and sd["cls_token"].abs().max() <= 0.04 + 1e-6
    assert torch.equal(sd["layer_scale"], torch.full((64,), 1e-4))
    assert sd["rezero"].shape == () and sd["rezero"].item() == 0.0
    assert sd["lane_mix"].abs().max() <= 0.5
    assert sd["embed.weight"].std().item() == pytest.approx(0.5, rel=0.05)  # not init_weights' 0.02
    assert sd["proj.weight"].std().item() == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert torch.equal(sd["proj.bias"], torch.zeros(64))  # init= given: the bias starts at zero
    assert torch.equal(sd["gate.weight"], torch.zeros(64, 64)) and torch.equal(sd["gate.bias"], torch.ones(64))
    assert sd["head.weight"].std().item() == pytest.approx(0.02, rel=0.1)  # the default still applies
    assert torch.equal(sd["head.bias"], torch.full((64,), 0.5))
    assert c.num_params() == sum(p.numel() for p in model.parameters())
    roles = c.param_roles()
    assert roles["layer_scale"] == roles["rezero"] == "norm" and roles["cls_token"] == "embedding"
    tokens = torch.randint(0, 100, (2, 5))
    out = model(tokens)
    x = torch.cat([model.cls_token.expand(2, 1, 64), model.embed(tokens)], 1)  # the [CLS] token in front
    x = x + model.layer_scale * model.proj(x)
    torch.testing.assert_close(out["y"], x * model.gate(x) + model.rezero * model.head(x))
    torch.testing.assert_close(out["mix"], model.lane_mix)


@pytest.mark.parametrize("call, phrase", [
    ("learned([T, 4], init=zeros())", "`learned` needs a fixed shape of positive ints"),
    ("learned([4], init=normal(0.0))", "`std` of `normal` must be positive"),
    ("learned([4], init=uniform(1.0, 0.5))", "`uniform` needs low < high"),
    ("linear(x, 4, bias=false, bias_init=ones())", "`bias_init=` on a linear without a bias"),
])
def test_bad_learned_tensors_and_rules_are_located_errors(call, phrase):
    err = error(f"model M(x: Tensor[B, T, 8]) {{\n    a = {call}\n    return a\n}}\n")
    assert phrase in err.message and err.span.line == 2, err.render()


# ---- losses ----------------------------------------------------------------------------------------

LOSSES = """
model M(tokens: Tokens[B, T], labels: Tokens[B, T], target: Tensor[B, T, 4]) {
    x = embedding(tokens, 50, 16)
    logits = linear(x, 10)
    loss = cross_entropy(logits, labels, ignore_index=-100) + mse(linear(x, 4) as reg, target)
    cls = cross_entropy(logits[:, 0], labels[:, 0])
    return logits, loss, cls
}
"""


def test_cross_entropy_with_ignore_index_and_mse_are_pytorch_s():
    tokens, labels, target = torch.randint(0, 50, (2, 6)), torch.randint(0, 10, (2, 6)), torch.randn(2, 6, 4)
    labels[0, :3] = -100
    model, out = run(LOSSES, tokens, labels, target, disable=("fuse_projections",))
    x = model.embedding(tokens)
    want = F.cross_entropy(out["logits"].reshape(-1, 10), labels.reshape(-1)) + F.mse_loss(model.reg(x), target)
    torch.testing.assert_close(out["loss"], want)
    torch.testing.assert_close(out["cls"], F.cross_entropy(out["logits"][:, 0], labels[:, 0]))


def test_next_token_loss_over_bidirectional_attention_is_a_warning():
    text = """model M(tokens: Tokens[B, T]) {
    x = embedding(tokens, 50, 16)
    x += attention(x, heads=2, causal=false)
    logits = linear(x, 50)
    loss = next_token_loss(logits, tokens)
    return logits, loss
}
"""
    (warning,) = compiled(text).warnings
    assert "next_token_loss over bidirectional self-attention (attn)" in warning.message
    assert at(warning) == (5, 12) and warning.notes[0][1].line == 3
    assert "warning:" in warning.render() and "causal=true" in warning.hint
    assert not compiled(text.replace("causal=false", "causal=true")).warnings


def test_check_prints_the_warning_and_succeeds(tmp_path, capsys):
    from archc.cli import main

    spec = tmp_path / "leak.arch"
    spec.write_text("model M(tokens: Tokens[B, T]) {\n    x = embedding(tokens, 50, 16)\n"
                    "    x += attention(x, heads=2, causal=false)\n    logits = linear(x, 50)\n"
                    "    loss = next_token_loss(logits, tokens)\n    return logits, loss\n}\n")
    assert main(["check", str(spec)]) == 0
    assert "warning: next_token_loss over bidirectional self-attention" in capsys.readouterr().err


# ---- attention: padding mask, position bias, scale ---------------------------------------------------

ATTN = """
model M(x: Tensor[B, T, 16], memory: Tensor[B, S, 16], mask: Mask[B, T], memory_mask: Mask[B, S],
        bias: Tensor[1, 4, T, T]) {
    a = attention(x, heads=4, causal=true, mask=mask, position_bias=bias, scale=1.0) as self_attn
    c = cross_attention(x, memory, heads=4, mask=memory_mask) as cross
    return a, c
}
"""


def _reference(q, k, v, heads, *, causal, mask=None, bias=None, scale=None):
    b, t, d = q.shape
    s = k.shape[1]
    q, k, v = (z.view(b, -1, heads, d // heads).transpose(1, 2) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else (d // heads) ** -0.5)
    if bias is not None:
        scores = scores + bias
    hidden = torch.zeros(b, 1, t, s, dtype=torch.bool)
    if causal:
        hidden |= torch.ones(t, s, dtype=torch.bool).triu(1)
    if mask is not None:
        hidden |= ~mask[:, None, None, :]
    scores = scores.masked_fill(hidden, torch.finfo(scores.dtype).min)
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)


def test_padding_mask_position_bias_and_scale_match_an_explicit_reference():
    torch.manual_seed(1)
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    memory_mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    bias = torch.randn(1, 4, 5, 5)
    model, out = run(ATTN, x, memory, mask, memory_mask, bias)
    sa, ca = model.self_attn, model.cross
    q, k, v = sa.qkv(x).split(16, -1)
    want = sa.o(_reference(q, k, v, 4, causal=True, mask=mask, bias=bias, scale=1.0))
    torch.testing.assert_close(out["a"], want)
    k, v = ca.kv(memory).split(16, -1)
    torch.testing.assert_close(out["c"], ca.o(_reference(ca.q(x), k, v, 4, causal=False, mask=memory_mask)))


def test_a_mask_or_bias_runs_sdpa_with_one_additive_mask_and_says_so():
    c = compiled(ATTN)
    cores = [n for n in c.ir.nodes() if n.op == "attention_core"]
    assert [n.attrs["kernel"] for n in cores] == ["sdpa", "sdpa"]
    assert cores[0].attrs["kernel_reason"].startswith("padding mask and position bias: SDPA with one additive mask")
    assert "cannot_decode = 'a padding mask or position bias'" in c.source
    with pytest.raises(archc.SpecError, match="`flex` takes no padding mask or position bias"):
        archc.compile(ATTN, name="t.arch", kernels={"self_attn": "flex"})


@pytest.mark.parametrize("args, phrase", [
    ("mask=x", "`mask=` takes a key padding mask (true/false"),
    ("mask=m2", "`mask=` is a key padding mask [B, S] for keys [B, T], got [B, T, T]"),
    ("position_bias=x", "`position_bias=` is added to the scores [1 or B, 4, T, T], got [B, T, 16]"),
])
def test_bad_masks_and_biases_are_located_errors(args, phrase):
    err = error(f"model M(x: Tensor[B, T, 16], m2: Mask[B, T, T]) {{\n    a = attention(x, heads=4, {args})\n"
                "    return a\n}\n")
    assert phrase in err.message and err.span.line == 2, err.render()


def test_relative_position_buckets_follow_t5():
    # T5's buckets (Raffel et al. 2019; transformers' T5Attention._relative_position_bucket), written out:
    # 32 bidirectional buckets: 16 each way, 8 exact distances, then logarithmic up to 128.
    relative = torch.arange(-200, 201)
    got = relative_position_bucket(relative, bidirectional=True, buckets=32, max_distance=128)
    for r, b in zip(relative.tolist(), got.tolist()):
        n = abs(r)
        exact = n if n < 8 else min(15, 8 + int(math.log(n / 8) / math.log(128 / 8) * 8))
        assert b == exact + (16 if r > 0 else 0), r
    causal = relative_position_bucket(relative, bidirectional=False, buckets=32, max_distance=128)
    assert causal[relative >= 0].eq(0).all() and causal[relative == -1].item() == 1
    assert causal[relative == -200].item() == 31


def test_shift_moves_positions_either_way():
    x = torch.arange(10).view(2, 5)
    assert shift(x, 2, dim=1, fill=-1).tolist() == [[-1, -1, 0, 1, 2], [-1, -1, 5, 6, 7]]
    assert shift(x, -1, dim=1).tolist() == [[1, 2, 3, 4, 0], [6, 7, 8, 9, 0]]


# ---- choosing by value: topk, gather, cumsum ---------------------------------------------------------------

MIXTURE_OF_DEPTHS = """
param d: int = 16
param capacity: int = 4
model MoD(x: Tensor[B, T, d]) {
    scores = squeeze(linear(x, 1) as router, -1)
    top, chosen = topk(scores, capacity, dim=1)
    picked = gather(x, expand(unsqueeze(chosen, -1), [B, capacity, d]), dim=1)
    counts = cumsum(scores > 0, dim=1)
    return top, chosen, picked, counts
}
"""


def test_topk_gather_and_cumsum_are_pytorch_s():
    c = compiled(MIXTURE_OF_DEPTHS)
    assert {n.var: n.shape for n in c.ir.nodes() if n.var in ("top", "chosen", "picked", "counts")} == {
        "top": ("B", 4), "chosen": ("B", 4), "picked": ("B", 4, 16), "counts": ("B", "T")}
    torch.manual_seed(0)
    model = c.build()
    x = torch.randn(2, 7, 16)
    out = model(x)
    scores = model.router(x).squeeze(-1)
    top, chosen = scores.topk(4, dim=1)
    torch.testing.assert_close(out["top"], top)
    assert torch.equal(out["chosen"], chosen) and out["chosen"].dtype == torch.long
    torch.testing.assert_close(out["picked"], torch.stack([x[b, chosen[b]] for b in range(2)]))
    assert torch.equal(out["counts"], (scores > 0).long().cumsum(1))


@pytest.mark.parametrize("body, phrase", [
    ("a, b = topk(x, 9, dim=1)\n    return a", "topk(9) of axis 1 of [B, 8, 4]: only 8 to choose from"),
    ("a, b = topk(x > 0, 2)\n    return a", "`topk` ranks numbers, and this tensor holds true/false"),
    ("return gather(x, x, dim=1)", "the `index` of `gather` holds positions (Tokens)"),
    ("return gather(x, ids, dim=1)", "gather needs an index of x's rank: x is [B, 8, 4], index [B, 3]"),
    ("return gather(x, unsqueeze(ids, -1), dim=1)", "the index's other axes must be x's, but axis 2 is 1"),
])
def test_bad_choices_are_located_errors(body, phrase):
    err = error(f"""
model M(x: Tensor[B, 8, 4], ids: Tokens[B, 3]) {{
    {body}
}}""")
    assert phrase in str(err), str(err)
    assert err.span.line == 3


# ---- parameters that list their values ---------------------------------------------------------------------

CHOICE = """
param ff: str in ["relu", "gated-gelu"] = "relu"
param n: int in [1, 2, 4] = 2
model M(x: Tensor[B, 4]) {
    if ff == "relu" {
        return relu(x)
    } else {
        return gelu(x)
    }
}
"""


def test_a_parameter_takes_only_the_values_it_lists():
    assert compiled(CHOICE).params == {"ff": "relu", "n": 2}
    assert compiled(CHOICE, ff="gated-gelu", n=4).params == {"ff": "gated-gelu", "n": 4}
    err = error(CHOICE, ff="gelu")
    assert 'bad override -D ff="gelu": `ff` is one of "relu", "gated-gelu"' in str(err) and at(err) == (2, 1)
    assert "one of 1, 2, 4" in str(error(CHOICE, n=3))
    err = error(CHOICE.replace('= "relu"', '= "swish"'))
    assert 'the default of `ff` ("swish") is not one of "relu", "gated-gelu"' in str(err) and at(err) == (2, 43)
    assert "lists the values it may take" in str(error(CHOICE.replace('in [1, 2, 4]', 'in 3')))


def test_a_used_file_s_parameters_take_qualified_overrides(tmp_path):
    (tmp_path / "lib.arch").write_text('param width: int = 8\nparam act: str in ["relu", "gelu"] = "relu"\n'
                                       "block Proj(x: Tensor[B, 4]) {\n    return linear(x, width) as proj\n}\n")
    (tmp_path / "main.arch").write_text('use "lib.arch"\nmodel M(x: Tensor[B, 4]) {\n    return Proj(x)\n}\n')
    main = tmp_path / "main.arch"
    assert archc.compile(main).build().proj.proj.out_features == 8
    wide = archc.compile(main, {"lib.width": 16})
    assert wide.build().proj.proj.out_features == 16 and wide.params == {"lib.width": 16, "lib.act": "relu"}
    assert archc.compile(main, wide.params).source == wide.source  # the params compile the same model again
    for overrides, phrase in [({"lib.widht": 1}, "unknown parameter `lib.widht` in override"),
                              ({"lob.width": 1}, "no used file is called `lob`"),
                              ({"lib.width": "x"}, "bad override -D lib.width=\"x\": `width` is declared int"),
                              ({"lib.act": "tanh"}, 'bad override -D lib.act="tanh": `act` is one of')]:
        with pytest.raises(archc.SpecError, match=re.escape(phrase)):
            archc.compile(main, overrides)


def test_drop_path_drops_whole_examples_while_training_only():
    c = compiled("""
model M(x: Tensor[B, T, 4]) {
    return x + drop_path(x * 2.0, 0.5)
}""")
    model = c.build()
    x = torch.ones(4000, 3, 4)
    torch.manual_seed(0)
    y = next(iter(model.train()(x).values())) - x  # 2x / (1 - p) = 4 where kept, 0 where dropped
    per_example = y.flatten(1)
    assert set(per_example.unique().tolist()) == {0.0, 4.0}
    assert (per_example == per_example[:, :1]).all()  # whole examples, never parts of one
    assert abs((per_example[:, 0] == 4.0).float().mean().item() - 0.5) < 0.03
    torch.testing.assert_close(next(iter(model.eval()(x).values())), 3 * x)  # eval: the identity
    assert "AF.drop_path(mul, 0.5, self.training)" in c.source
