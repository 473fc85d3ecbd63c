"""DiLoCo's outer step on 2 gloo processes: parameter averaging, identical global copies, fragments."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import SPECS

import archc
from archc.training.distributed.diloco import DiLoCo, DiLoCoError, fragment_params, parse_diloco
from archc.training.distributed.launch import spawn

TINY = dict(n_layers=2, d_model=32, n_heads=2, n_kv_heads=1, d_ff=48)


def _gather(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def _run(rank, options, steps, check_average):
    torch.manual_seed(0)
    compiled = archc.compile(str(SPECS / "llama.arch"), TINY)
    model = compiled.build()
    cfg = parse_diloco(options)
    outer = DiLoCo(model, fragment_params(compiled, model, cfg.fragments, cfg.assign), cfg)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)  # each replica its own data
    averaged = 0
    for step in range(1, steps + 1):
        tokens = torch.randint(0, 256, (2, 16), generator=gen)
        model(tokens=tokens)["loss"].backward()
        inner.step()
        inner.zero_grad()
        if check_average and step % cfg.inner_steps == 0:
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
        outer.after_inner_step(step)
        if check_average and step % cfg.inner_steps == 0:
            for name, g in outer.global_state().items():
                mean = sum(_gather(before[name])) / dist.get_world_size()
                torch.testing.assert_close(g, mean, rtol=0, atol=1e-6)
                torch.testing.assert_close(dict(model.named_parameters())[name].detach(), g, rtol=0, atol=0)
            averaged += 1
    outer.finish(steps)
    state = torch.cat([g.reshape(-1) for g in outer.global_state().values()])
    momenta = [s["momentum_buffer"].reshape(-1) for f in outer.fragments for s in f.outer.state.values()
               if s.get("momentum_buffer") is not None]
    return {"identical": all(torch.equal(x, _gather(state)[0]) for x in _gather(state)),
            "momentum_identical": all(torch.equal(torch.cat(momenta), x) for x in _gather(torch.cat(momenta)))
            if momenta else True,
            "averaged": averaged, "stats": outer.stats}


def _worker(rank, world):
    out = {"avg": _run(rank, "replicas=2,inner_steps=3,outer_lr=1,outer_momentum=0", 6, True)}
    out["nesterov"] = _run(rank, "replicas=2,inner_steps=2", 4, False)
    out["stream"] = _run(rank, "replicas=2,inner_steps=4,streaming=2,assign=sequential,tau=2,fp4=e2m1", 12, False)
    return out


@pytest.mark.slow
def test_outer_sgd_lr1_is_parameter_averaging_and_global_copies_stay_identical():
    out = spawn(_worker, 2)
    assert out["avg"]["averaged"] == 2 and out["avg"]["identical"]
    assert out["nesterov"]["identical"] and out["nesterov"]["momentum_identical"]
    stream = out["stream"]
    assert stream["identical"] and stream["momentum_identical"]
    starts = [(s, f) for s, f, kind in stream["stats"].schedule if kind == "start"]
    # fragment p syncs at steps ≡ offset_p (mod H): offsets (p+1)·H/P mod H = 2, 0
    assert starts == [(2, 0), (4, 1), (6, 0), (8, 1), (10, 0), (12, 1)]
    applies = [(s, f) for s, f, kind in stream["stats"].schedule if kind == "apply"]
    assert applies == [(4, 0), (6, 1), (8, 0), (10, 1), (12, 0), (12, 1)]  # tau=2 later; the last drained
    assert stream["stats"].peak_bytes < out["nesterov"]["stats"].peak_bytes / 2 / 7  # 4-bit and half the model


def test_fragments_follow_the_layer_structure():
    compiled = archc.compile(str(SPECS / "llama.arch"), {**TINY, "n_layers": 4})
    model = compiled.build()
    strided = fragment_params(compiled, model, 2, "strided")
    sequential = fragment_params(compiled, model, 2, "sequential")
    def layer(names):
        return sorted({n.split(".")[1] for n in names if n.startswith("layers.")})

    assert [layer(f) for f in strided] == [["0", "2"], ["1", "3"]]
    assert [layer(f) for f in sequential] == [["0", "1"], ["2", "3"]]
    assert "embed.weight" in strided[0] and "head.weight" in strided[1] and "norm.weight" in strided[1]
    assert sorted(sum(strided, [])) == sorted(n for n, _ in model.named_parameters())
    with pytest.raises(DiLoCoError, match="at most"):
        fragment_params(compiled, model, 5)


def test_parse_diloco():
    cfg = parse_diloco("replicas=4,inner_steps=50,streaming=3,tau=2,alpha=0.5,fp4=e3m0,outer_lr=0.5")
    assert (cfg.replicas, cfg.inner_steps, cfg.fragments, cfg.tau, cfg.mix, cfg.fp4, cfg.outer_lr) == \
        (4, 50, 3, 2, 0.5, "e3m0", 0.5)
    assert parse_diloco("replicas=2,inner_steps=5").mix == 0.0
    for bad, message in [("replicas=2,inner_step=3", "did you mean `inner_steps`"),
                         ("replicas=two", "expected int"), ("replicas=2,inner_steps=3,tau=3", "overlap"),
                         ("replicas=2,assign=strided2", "did you mean `strided`"), ("replicas", "KEY=VALUE")]:
        with pytest.raises(DiLoCoError, match=message):
            parse_diloco(bad)
