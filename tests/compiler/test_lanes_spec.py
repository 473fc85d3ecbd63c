"""`lanes(...)` … `merge_lanes(x)` in the language: specs/mhc.arch against the plain Llama it widens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import archc
from archc.dsl.diagnostics import SpecError

SPECS = Path(__file__).resolve().parents[2] / "specs"
SMALL = {"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 48, "vocab": 64}


def _pair(**lanes):
    """A fresh lanes model and a plain Llama carrying the same weights (the lanes' own weights stay at init)."""
    torch.manual_seed(0)
    plain = archc.compile(SPECS / "llama.arch", SMALL).build().double()
    widened = archc.compile(SPECS / "mhc.arch", {**SMALL, **lanes}).build().double()
    missing, unexpected = widened.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(".lanes" in key for key in missing), (missing, unexpected)
    return plain, widened


def _logits(model, tokens):
    return model(tokens=tokens)["logits"]


def test_one_plain_lane_is_the_plain_model():
    plain, widened = _pair(n_lanes=1, lane_rule="plain")
    assert sum(p.numel() for p in widened.parameters()) == sum(p.numel() for p in plain.parameters())
    tokens = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(_logits(widened, tokens), _logits(plain, tokens), rtol=0, atol=0)


@pytest.mark.parametrize(("rule", "n"), [("mhc", 4), ("hc_static", 4), ("hc_dynamic", 3), ("mhc", 2)])
def test_a_fresh_laned_model_equals_its_plain_counterpart(rule, n):
    plain, widened = _pair(n_lanes=n, lane_rule=rule)
    assert sum(p.numel() for p in widened.parameters()) > sum(p.numel() for p in plain.parameters())
    tokens = torch.randint(0, 64, (2, 7))
    torch.testing.assert_close(_logits(widened, tokens), _logits(plain, tokens), rtol=1e-9, atol=1e-9)


def test_laned_model_trains_and_its_lane_weights_move():
    torch.manual_seed(0)
    model = archc.compile(SPECS / "mhc.arch", SMALL).build()
    phi = model.layers[0].lanes.phi
    assert phi.abs().sum() == 0
    loss = model(tokens=torch.randint(0, 64, (2, 9)))["loss"]
    loss.backward()
    assert phi.grad is not None and phi.grad.abs().sum() > 0  # the dynamic mixing gets a gradient


def test_recompute_gives_the_same_gradients():
    tokens = torch.randint(0, 64, (2, 9))
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = archc.compile(SPECS / "mhc.arch", {**SMALL, "lane_recompute": recompute}).build().double()
        model(tokens=tokens)["loss"].backward()
        assert model.layers[0].lanes.recompute is recompute
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for key, grad in grads[0].items():
        torch.testing.assert_close(grads[1][key], grad, rtol=1e-10, atol=1e-12)


def test_each_residual_site_gets_its_own_lanes_module_reading_lane_site_mod_n():
    compiled = archc.compile(SPECS / "mhc.arch", {**SMALL, "n_layers": 3})
    model = compiled.build()
    sites = [m for m in model.modules() if type(m).__name__ == "Lanes"]
    assert [s.site for s in sites] == [0, 1, 2, 3, 0, 1]  # attn and mlp of each layer, k mod n
    assert "u, mix = self.lanes.read(x)" in compiled.source
    assert "x = self.lanes.write(x, attn, mix)" in compiled.source


@pytest.mark.parametrize(("args", "message"), [
    ('n=4, rule="plain"', 'rule "plain" is the ordinary residual and takes n=1'),
    ('n=1, rule="mhc"', 'rule "mhc" needs n >= 2'),
    ('n=4, rule="mch"', 'did you mean "mhc"'),
])
def test_bad_lane_settings_are_located_errors(args, message):
    spec = ("model M(tokens: Tokens[B, T]) {\n    x = embedding(tokens, 16, 8)\n"
            f"    x = lanes(x, {args})\n    x += linear(x, 8)\n    x = merge_lanes(x)\n    return x\n}}\n")
    with pytest.raises(SpecError) as info:
        archc.compile(spec, name="bad.arch")
    err = info.value.errors[0] if hasattr(info.value, "errors") and info.value.errors else info.value
    assert message in err.message and err.span.line == 3, err.message


@pytest.mark.parametrize(("body", "line", "message"), [
    ("y = merge_lanes(x)", 3, "merge_lanes needs the lanes"),
    ("y = lanes(x, n=2)\n    y = lanes(y, n=2)", 4, "lanes do not nest"),
])
def test_misplaced_lanes_are_located_errors(body, line, message):
    spec = f"model M(x: Tensor[B, T, 8]) {{\n    x = linear(x, 8)\n    {body}\n    return y\n}}\n"
    with pytest.raises(SpecError) as info:
        archc.compile(spec, name="bad.arch")
    err = info.value.errors[0] if hasattr(info.value, "errors") and info.value.errors else info.value
    assert message in err.message and err.span.line == line, err.message


@pytest.mark.parametrize("rule", ["mhc", "hc_dynamic"])
def test_token_by_token_decoding_inside_lanes_equals_the_full_sequence(rule):
    from archc.runtime.mixers import generate_recurrent

    torch.manual_seed(0)
    model = archc.compile(SPECS / "mhc.arch", {**SMALL, "n_lanes": 3, "lane_rule": rule}).build().double().eval()
    with torch.no_grad():  # trained-looking lanes: per-token mixing that depends on the lanes' state
        for name, p in model.named_parameters():
            if ".lanes" in name:
                p.add_(0.1 * torch.randn_like(p))
    prompt = torch.randint(0, 64, (2, 6))
    tokens, logits = generate_recurrent(model, prompt, steps=5, temperature=1.0, seed=1)
    with torch.no_grad():
        full = model(tokens=tokens[:, :-1])["logits"]
    torch.testing.assert_close(logits, full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rule", ["mhc", "hc_static", "hc_dynamic"])
def test_summary_counts_the_lanes_extra_parameters_as_the_built_model_has_them(rule):
    widened = archc.compile(SPECS / "mhc.arch", {**SMALL, "lane_rule": rule})
    plain = archc.compile(SPECS / "llama.arch", SMALL)
    built = sum(p.numel() for p in widened.build().parameters())
    assert widened.num_params() == built
    extra = built - sum(p.numel() for p in plain.build().parameters())
    line = widened.summary().splitlines()[-1]
    assert line.startswith(f"residual lanes      4 lanes, {rule}"), line
    assert f"4 residual sites: +{extra:,} parameters" in line and "stream activations x4 (128 floats" in line


def test_archc_train_runs_the_mhc_spec(tmp_path, capsys):
    from archc.cli import main

    argv = ["train", str(SPECS / "mhc.arch"), "--steps", "3", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--no-progress", "--sample-tokens", "4", "--out-dir", str(tmp_path / "run"),
            "-D", "n_layers=1", "-D", "d_model=32", "-D", "n_heads=2", "-D", "n_kv_heads=1", "-D", "d_ff=48"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 3 steps" in out and "val perplexity" in out
