"""Engram's tables through the real training path: the `memory` role's optimizer step is Adam on the rows a
step touched (SparseRowAdam on sparse row gradients), not dense Adam; untouched rows never move."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import SPECS

import archc
from archc.runtime.engram import Engram, SparseRowAdam
from archc.training.config import TrainConfig
from archc.training.optim import build_optimizer
from archc.training.strategy import SingleProcess
from archc.training.trainer import Trainer

SMALL = {"d_model": 32, "n_layers": 4, "n_heads": 2, "n_kv_heads": 1, "d_ff": 48, "memory_heads": 2,
         "memory_slots": 251, "memory_dim": 16}
LR, WD, BETAS, EPS, STEPS = 1e-2, 0.1, (0.9, 0.95), 1e-8, 3


def _trainer(tmp_path, corpus) -> Trainer:
    cfg = TrainConfig(data=corpus, batch_size=2, seq_len=16, steps=STEPS, schedule="constant", warmup=0, clip=0.0,
                      lr=LR, weight_decay=WD, eval_every=100, eval_batches=1, checkpoint_every=100, sample_tokens=0,
                      progress=False, out_dir=str(tmp_path / "run"))
    trainer = Trainer(SPECS / "engram.arch", cfg, SingleProcess(), SMALL)
    trainer.setup()
    trainer.model.double()  # the same Parameter objects, in float64: the comparison sees the rule, not rounding
    return trainer


def _reference(model, roles, memory_rule: str):
    """torch's AdamW for the rest; the tables by SparseRowAdam on sparse gradients, or in dense AdamW."""
    params = dict(model.named_parameters())
    decay = [n for n in params if roles[n] in ("embedding", "head", "matrix")]
    plain = [n for n in params if roles[n] in ("norm", "bias")]
    tables = [n for n in params if roles[n] == "memory"]
    if memory_rule == "dense":
        decay += tables
    dense = torch.optim.AdamW([{"params": [params[n] for n in decay], "weight_decay": WD},
                               {"params": [params[n] for n in plain], "weight_decay": 0.0}],
                              lr=LR, betas=BETAS, eps=EPS, foreach=False)
    optimizers = [dense]
    if memory_rule == "sparse":
        for m in model.modules():
            if isinstance(m, Engram):
                m.table.sparse = True  # F.embedding(sparse=True): a gradient of the rows read only
        optimizers.append(SparseRowAdam([params[n] for n in tables], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD))
    return optimizers


def _rows_with_gradient(grad: torch.Tensor) -> torch.Tensor:
    """The rows a sparse row gradient holds, less those whose gradient is exactly zero: rows read only where no
    loss term looks (the last position of a next-token window). The memory step leaves those alone
    (archc/training/optim.py), SparseRowAdam would count them as touched."""
    grad = grad.coalesce()
    keep = grad.values().ne(0).flatten(1).any(1)
    return torch.sparse_coo_tensor(grad.indices()[:, keep], grad.values()[keep], grad.shape,
                                   check_invariants=True).coalesce()


def test_trainer_steps_memory_tables_as_sparse_row_adam(tmp_path, corpus):
    trainer = _trainer(tmp_path, corpus)
    roles = trainer.compiled.param_roles()
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["decay", "no_decay", "memory"]
    start = copy.deepcopy(trainer.model)
    models = {rule: copy.deepcopy(start) for rule in ("sparse", "dense")}
    optimizers = {rule: _reference(models[rule], roles, rule) for rule in models}
    touched: dict[str, set[int]] = {}
    for step in range(STEPS):
        trainer.train_step(step)
        batch = trainer.source.batch(step)
        for rule, model in models.items():
            model(**batch)["loss"].backward()
            if rule == "sparse":
                for name, p in model.named_parameters():
                    if roles[name] == "memory":
                        p.grad = _rows_with_gradient(p.grad)
                        touched.setdefault(name, set()).update(p.grad.indices()[0].tolist())
            for opt in optimizers[rule]:
                opt.step()
                opt.zero_grad(set_to_none=True)
    got = dict(trainer.model.named_parameters())
    for name, p in models["sparse"].named_parameters():
        torch.testing.assert_close(got[name], p, rtol=1e-9, atol=1e-11, msg=name)
    initial = dict(start.named_parameters())
    dense = dict(models["dense"].named_parameters())
    for name, rows in touched.items():
        untouched = torch.ones(got[name].shape[0], dtype=torch.bool)
        untouched[sorted(rows)] = False
        assert 0 < len(rows) < got[name].shape[0]
        assert torch.equal(got[name][untouched], initial[name][untouched])  # never read: never moved
        assert not torch.allclose(dense[name], got[name], rtol=1e-4, atol=1e-5)  # dense Adam moves them all


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_memory_tables_get_their_own_group_in_either_optimizer(name):
    compiled = archc.compile(SPECS / "engram.arch", {**SMALL, "vocab": 64})
    model = compiled.build()
    opt = build_optimizer(model, compiled.param_roles(), name=name, lr=LR)
    (memory,) = [g for g in opt.param_groups if g["name"] == "memory"]
    assert memory["sparse_rows"] and memory["param_names"] == ["layers.1.memory.table.weight",
                                                               "layers.3.memory.table.weight"]
    assert all(g["name"] == "memory" or not any(n.endswith("table.weight") for n in g["param_names"])
               for g in opt.param_groups)
    table = model.layers[1].memory.table.weight
    before = table.detach().clone()
    model(tokens=torch.randint(0, 64, (1, 5)))["loss"].backward()
    read = table.grad.ne(0).any(1)
    opt.step()
    assert torch.equal(table[~read], before[~read]) and not torch.equal(table[read], before[read])
