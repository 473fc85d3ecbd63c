"""Residual lanes as generated modules use them (archc.runtime.lanes), on a tiny pre-norm transformer.

The transformer is written out here (embedding, causal attention and MLP
branches with RMSNorm before each, final norm and head) so that each rule can
be checked against the plain residual model it must reproduce at init:

- plain, n = 1: the forward bit-identical to the model without lanes, the
  gradients to rounding (autograd sums the stream's contributions in another order);
- hc_static / hc_dynamic, n = 2 and 4: the same at init (HC's one-hot read,
  identity residual, B = 1; the dynamic terms are zero);
- mhc, n = 2 and 4: equal to rounding at init (σ and Sinkhorn are not exact),
  1e-12 in float64.

Then: the mixing is live once the parameters move (the outputs differ, every
lane parameter gets a gradient), `recompute=True` gives the same gradients
while the graph no longer holds the rebuilt lane states, the mixing is
per-token (a prefix computed alone equals the prefix of the whole: decoding
inside lanes needs no state), and bad arguments are named.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from archc.runtime.lanes import Lanes, expand_lanes, merge_lanes

D, LAYERS, VOCAB = 16, 3, 11


class TinyLM(nn.Module):
    """Pre-norm transformer: x += attn(norm(x)); x += mlp(norm(x)); optional lanes around each update."""

    def __init__(self, d=D, layers=LAYERS, vocab=VOCAB, heads=2):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.attn_norm = nn.ModuleList(nn.RMSNorm(d) for _ in range(layers))
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.mlp_norm = nn.ModuleList(nn.RMSNorm(d) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(d, 4 * d) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.head = nn.Linear(d, vocab)

    def attn(self, i, x):
        B, T, d = x.shape
        q, k, v = self.qkv[i](self.attn_norm[i](x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out[i](o.transpose(1, 2).reshape(B, T, d))

    def mlp(self, i, x):
        return self.down[i](F.gelu(self.up[i](self.mlp_norm[i](x))))

    def branches(self):
        for i in range(len(self.qkv)):
            yield lambda x, i=i: self.attn(i, x)
            yield lambda x, i=i: self.mlp(i, x)

    def forward(self, tokens, sites=None, states=None):
        x = self.emb(tokens)
        if sites is None:
            for f in self.branches():
                x = x + f(x)
        else:
            h = expand_lanes(x, sites[0].n)
            for site, f in zip(sites, self.branches()):
                u, mix = site.read(h)
                h = site.write(h, f(u), mix)
                if states is not None:
                    states.append(h)
            x = merge_lanes(h)
        return self.head(self.norm(x))


def lanes_for(n, rule, dtype=torch.float32, **kw):
    return nn.ModuleList(Lanes(n, rule, D, site=i, **kw) for i in range(2 * LAYERS)).to(dtype)


def tokens(seed=0, shape=(2, 7)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def grads(model, sites, tok):
    model.zero_grad()
    model(tok, sites).logsumexp(-1).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("rule, n", [("plain", 1), ("hc_static", 4), ("hc_dynamic", 4), ("hc_static", 2)])
def test_fresh_lanes_are_the_plain_model_bit_for_bit(rule, n):
    torch.manual_seed(0)
    model, tok = TinyLM(), tokens()
    sites = lanes_for(n, rule)
    assert torch.equal(model(tok, sites), model(tok))
    # Gradients to rounding: the autograd engine adds a stream's gradient contributions in another
    # order once the branch reads a view of the lanes ((res + a) + b against res + (a + b)).
    for a, b in zip(grads(model, sites, tok), grads(model, None, tok)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n", [2, 4])
def test_fresh_mhc_is_the_plain_model(n):
    torch.manual_seed(0)
    model, tok = TinyLM().double(), tokens()
    sites = lanes_for(n, "mhc", torch.float64)
    torch.testing.assert_close(model(tok, sites), model(tok), rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(model, sites, tok), grads(model, None, tok)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    model32, sites32 = TinyLM(), lanes_for(n, "mhc")
    model32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    torch.testing.assert_close(model32(tok, sites32), model32(tok), rtol=1e-5, atol=1e-5)


def test_mhc_init_coefficients():
    site = Lanes(4, "mhc", D, site=6, init_eps=0.01)
    h = torch.randn(3, 4, D)
    _, (post, res) = site.read(h)
    logits = site.logits(h)
    pre = torch.sigmoid(logits[..., :4])
    torch.testing.assert_close(pre.sum(-1), torch.ones(3))
    assert pre[0].argmax() == 6 % 4 and torch.allclose(pre[0, [0, 1, 3]], torch.tensor(0.01))
    torch.testing.assert_close(post, torch.ones(3, 4))
    torch.testing.assert_close(res, (0.96 * torch.eye(4) + 0.01).expand(3, 4, 4))


@pytest.mark.parametrize("rule", ["hc_static", "hc_dynamic", "mhc"])
def test_trained_lanes_mix(rule):
    """Two SGD steps on everything: the lanes model departs from the plain one and every lane parameter learns.

    (At init the zero projections W, φ leave their gain and HC's scales without gradient, as a
    zero-initialised LoRA factor does; after one step all are live.)"""
    torch.manual_seed(1)
    model, tok = TinyLM(), tokens()
    sites = lanes_for(4, rule)
    opt = torch.optim.SGD([*model.parameters(), *sites.parameters()], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        model(tok, sites).logsumexp(-1).sum().backward()
        opt.step()
    for name, p in sites.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert (model(tok, sites) - model(tok)).abs().max() > 1e-3


def _perturbed_mhc_sites(**kw):
    sites = lanes_for(4, "mhc", **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for s in sites:
            s.phi.normal_(0.0, 0.05, generator=g)
            s.bias.add_(torch.randn(s.bias.shape, generator=g))
    return sites


def test_recompute_gives_the_same_gradients_without_keeping_lane_states():
    torch.manual_seed(2)
    model, tok = TinyLM(), tokens()
    sites = _perturbed_mhc_sites()

    def run(recompute):
        for s in sites:
            s.recompute, s.segment = recompute, 3
        model.zero_grad()
        sites.zero_grad()
        states = []
        loss = model(tok, sites, states).logsumexp(-1).sum()
        # what holds each lane state: TensorImpls sharing its storage (ours, any view's base, views the graph
        # saved) and references to its own TensorImpl (ours, and the graph's when a Function saved it as is)
        holders = [torch._C._storage_Use_Count(h.untyped_storage()._cdata) + h._use_count() for h in states]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in (*model.parameters(), *sites.parameters())], holders

    loss0, grads0, kept0 = run(False)
    loss1, grads1, kept1 = run(True)
    assert torch.equal(loss0, loss1)
    for a, b in zip(grads0, grads1):
        assert torch.equal(a, b)  # the rebuilt states are bit-identical
    unsaved = kept0[-1]  # the last state feeds only merge_lanes, which saves nothing
    assert all(k > unsaved for k in kept0[:-1])  # without recompute the graph holds every state
    # with it, only every third state (depth 3 = segment) is held; the others are rebuilt
    assert kept1 == [unsaved, unsaved, kept0[2], unsaved, unsaved, unsaved]


@pytest.mark.parametrize("rule", ["hc_dynamic", "mhc"])
def test_mixing_is_per_token(rule):
    """A prefix mixed alone equals the prefix of the whole sequence: decoding inside lanes carries no state."""
    sites = _perturbed_mhc_sites() if rule == "mhc" else lanes_for(4, rule)
    if rule == "hc_dynamic":
        with torch.no_grad():
            for s in sites:
                s.dynamic.normal_(0.0, 0.3)
    h = torch.randn(2, 9, 4, D)
    y = torch.randn(2, 9, D)
    u, mix = sites[1].read(h)
    out = sites[1].write(h, y, mix)
    u3, mix3 = sites[1].read(h[:, :3])
    torch.testing.assert_close(u3, u[:, :3], rtol=0, atol=0)
    torch.testing.assert_close(sites[1].write(h[:, :3], y[:, :3], mix3), out[:, :3], rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["hc_static", "hc_dynamic", "mhc"])
def test_mixing_flops_count_the_matmuls(rule):
    n, tokens_ = 4, 10
    site = Lanes(n, rule, D)
    h, y = torch.randn(tokens_, n, D), torch.randn(tokens_, D)
    with FlopCounterMode(display=False) as counter:
        _u, mix = site.read(h)
        site.write(h, y, mix)
    matmuls = 2 * n * D + 2 * n * n * D  # read and write
    matmuls += {"hc_static": 0, "hc_dynamic": 2 * n * D * (n + 2), "mhc": 2 * n * D * (2 * n + n * n)}[rule]
    assert counter.get_total_flops() == tokens_ * matmuls
    assert site.mixing_flops_per_token() >= matmuls


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rule must be one of"):
        Lanes(4, "hyper", D)
    with pytest.raises(ValueError, match="'plain' .* n = 1"):
        Lanes(4, "plain", D)
    with pytest.raises(ValueError, match="'mhc' needs n >= 2"):
        Lanes(1, "mhc", D)
    with pytest.raises(ValueError, match="init_eps"):
        Lanes(4, "mhc", D, init_eps=0.3)
    with pytest.raises(ValueError, match=r"\[\.\.\., 4, 16\]"):
        Lanes(4, "mhc", D).read(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="merge_lanes: how"):
        merge_lanes(torch.randn(2, 4, D), "max")
