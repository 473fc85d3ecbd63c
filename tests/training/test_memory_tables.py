"""Engram's tables through the real training path: the `memory` role's optimizer step is Adam on the rows a
step touched (SparseRowAdam on sparse row gradients), not dense Adam; untouched rows never move."""

from __future__ import annotations

import copy

import attrs
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


def test_tables_in_host_memory_gathered_before_the_layers_give_the_same_model():
    """keep_memory_on: every layer's rows are gathered when the model is called, before layer 0 runs, and the
    model computes what it computes with the tables in place (here host and compute are both the CPU)."""
    from archc.runtime.engram import keep_memory_on
    from archc.runtime.mixers import generate_recurrent

    compiled = archc.compile(SPECS / "engram.arch", {**SMALL, "vocab": 64})
    torch.manual_seed(0)
    model = compiled.build().double()
    placed = copy.deepcopy(model)
    handle = keep_memory_on(placed, "cpu")
    memories = [m for m in placed.modules() if isinstance(m, Engram)]
    ready = []
    placed.layers[0].register_forward_pre_hook(lambda *_: ready.append([m._prefetched is not None for m in memories]))
    tokens = torch.randint(0, 64, (2, 9))
    want, got = model(tokens=tokens), placed(tokens=tokens)
    assert ready == [[True, True]] and all(m._prefetched is None for m in memories)  # gathered early, then used
    torch.testing.assert_close(got["logits"], want["logits"], rtol=0, atol=0)
    want["loss"].backward()
    got["loss"].backward()
    for (name, p), q in zip(model.named_parameters(), placed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    prompt = tokens[:, :4]  # decoding: the early gather continues each layer's n-gram history
    torch.testing.assert_close(generate_recurrent(placed.eval(), prompt, steps=5)[1],
                               generate_recurrent(model.eval(), prompt, steps=5)[1], rtol=0, atol=0)
    handle.remove()
    with pytest.raises(ValueError, match="no Engram memory"):
        keep_memory_on(archc.compile(SPECS / "llama.arch", {"d_model": 16, "n_layers": 1}).build(), "cpu")


def test_trainer_with_memory_device_trains_the_same_run(tmp_path, corpus):
    params = []
    for where in (None, "cpu"):
        cfg = TrainConfig(data=corpus, batch_size=2, seq_len=16, steps=2, lr=LR, eval_every=100, eval_batches=1,
                          checkpoint_every=100, sample_tokens=0, progress=False, out_dir=str(tmp_path / str(where)),
                          memory_device=where)
        trainer = Trainer(SPECS / "engram.arch", cfg, SingleProcess(), SMALL)
        trainer.setup()
        assert bool(trainer.model._forward_pre_hooks) == (where is not None)  # the early gather is installed
        for step in range(cfg.steps):
            trainer.train_step(step)
        params.append(dict(trainer.model.named_parameters()))
        assert all(m._prefetched is None for m in trainer.model.modules() if isinstance(m, Engram))
    for name, p in params[0].items():
        torch.testing.assert_close(params[1][name], p, rtol=0, atol=0, msg=name)


def test_memory_device_is_checked(tmp_path, corpus):
    from archc.training.config import TrainError

    with pytest.raises(TrainError, match="--memory-device 'gpu': expected cpu, cuda or cuda:N"):
        TrainConfig(memory_device="gpu")
    cfg = TrainConfig(data=corpus, batch_size=2, seq_len=16, steps=1, progress=False, out_dir=str(tmp_path / "r"),
                      memory_device="cpu")
    with pytest.raises(TrainError, match="the spec has no Engram memory"):
        Trainer(SPECS / "llama.arch", cfg, SingleProcess(), {"d_model": 16, "n_layers": 1}).setup()


def test_compress_true_hashes_through_the_tokenizers_compression_map(tmp_path, corpus):
    from archc.runtime.engram import compression_table
    from archc.training.data import ByteTokenizer

    cfg = TrainConfig(data=corpus, batch_size=2, seq_len=16, steps=1, eval_every=100, eval_batches=1,
                      checkpoint_every=100, sample_tokens=0, progress=False, out_dir=str(tmp_path / "run"))
    trainer = Trainer(SPECS / "engram.arch", cfg, SingleProcess(), {**SMALL, "memory_compress": True})
    trainer.setup()
    want, count = compression_table(ByteTokenizer().decode, 256)
    memories = [m for m in trainer.model.modules() if isinstance(m, Engram)]
    assert len(memories) == 2 and count < 256
    for m in memories:
        assert torch.equal(m.compression, want) and m.compressed_vocab == count
        assert m.compression[ord("A")] == m.compression[ord("a")] and m.compression[ord("a")] != m.compression[ord("b")]
    trainer.train_step(0)
    plain = Trainer(SPECS / "engram.arch", attrs.evolve(cfg, out_dir=str(tmp_path / "plain")), SingleProcess(), SMALL)
    plain.setup()
    assert all(torch.equal(m.compression, torch.arange(256)) for m in plain.model.modules() if isinstance(m, Engram))

