"""Optimizers and learning-rate schedules for training compiled models.

Choices (Muon: Jordan et al. 2024, "Muon: An optimizer for hidden layers"; Moonlight: Liu et al. 2025,
arXiv:2502.16982):

- **Muon** orthogonalises the momentum of each 2-D hidden matrix with Keller
  Jordan's quintic Newton–Schulz iteration (NS5, coefficients 3.4445, -4.7750,
  2.0315; the result is roughly U S' Vᵀ with S' in [0.5, 1.5]). Momentum is the
  EMA form `B ← B + (1-μ)(G - B)` with Nesterov `U = G + μ(B - G)`, as in
  Keller's code and `torch.optim.Muon` (Moonlight's `B ← μB + G` differs by a
  positive factor that NS normalisation removes). The state key is
  `momentum_buffer`, as in torch.
- **Learning-rate scaling.** A Muon update has RMS ≈ 1/sqrt(max(rows, cols))
  whatever the gradient's scale, so the step needs a per-shape factor:
  `adjust_lr="original"` (Keller): `lr · sqrt(max(1, rows/cols))`, used with
  Muon's own learning rates (~0.02); `"match_rms_adamw"` (Moonlight, our
  default): `lr · 0.2 · sqrt(max(rows, cols))`, which makes the update RMS
  ≈ 0.2 like AdamW's, so the AdamW learning rate and weight decay carry over
  unchanged and one `lr` can drive both halves of the optimizer. Weight decay is
  decoupled and uses the *unadjusted* lr: `p ← p·(1 - lr·wd)`, then
  `p ← p - lr_adjusted · NS(U)` (Moonlight, torch.optim.Muon).
- **Fused matrices.** The `fuse_projections` pass stores q;k;v (or gate;up) as
  one weight. Orthogonalising the fused matrix would couple the parts, so a
  parameter may carry `row_splits`: each row block is orthogonalised on its own
  with its own shape factor, exactly as if the parts were separate parameters
  (momentum and decay are elementwise, so only NS and the factor care).
- **Sharded weights (FSDP2).** NS needs the whole matrix, and orthogonalising
  each shard alone gives a different (wrong) update. A DTensor parameter's
  Nesterov update is gathered (`full_tensor()`: one all-gather per matrix per
  step), every rank orthogonalises the full matrix (row_splits included) and
  keeps its own shard of the result (`distribute_tensor(..., src_data_rank=None)`
  slices locally, no communication); momentum and decay stay elementwise on the
  shards. This is the simple gather-orthogonalise-reshard recipe: each rank
  redoes NS for every matrix (Moonlight's owner-per-matrix variant would not).
- **NS precision.** `ns_dtype="auto"` runs NS in bf16 on CUDA (as Keller and
  torch do) and in fp32 elsewhere, so CPU training is exact and reproducible;
  `"bfloat16"` reproduces `torch.optim.Muon` bit for bit.
- **One optimizer object.** `MuonWithAdamW` holds Muon groups and AdamW groups
  (`use_muon` per group, like Keller's `MuonWithAuxAdam`), so the training
  loop, `LambdaLR`, grad clipping and `state_dict()` see one optimizer. Its
  AdamW half is torch's single-tensor AdamW step, op for op.
- **Groups by role, not by name.** `build_optimizer` takes the roles that
  `Compiled.param_roles()` reads from the IR. AdamW mode follows nanoGPT: decay
  2-D weights (matrix, head, embedding), not norms and biases. Muon mode gives
  `matrix` params to Muon and embedding / head (decayed) and norm / bias (not
  decayed) to AdamW; a `matrix` param that is not 2-D (stacked experts) goes to
  the decayed AdamW group.
- **Memory tables** (role `memory`: Engram's hashed n-gram tables) take Adam on the rows a step
  touched only (`archc.runtime.engram.sparse_row_adam_`: a step count per row, so a row follows
  Adam over the steps that read it; untouched rows and their moments stay put; decoupled decay, as
  for embeddings, on touched rows only). The gradient stays dense (clipping, accumulation and the
  global norm work unchanged); the touched rows are those with a non-zero gradient row (a row read
  only where no loss term looks, such as a window's last position, keeps still: SparseRowAdam would
  decay its moments), or the indices of a sparse row gradient (`nn.Embedding(sparse=True)`). A model
  with memory tables gets `MuonWithAdamW` in AdamW mode too (its AdamW half is torch's AdamW step),
  since torch's AdamW has no per-row step. Sharded (DTensor) tables are refused.
- **Schedules** are pure functions of the step (`lr_lambda`) so a `LambdaLR`
  resumed from its step count gives exactly the same learning rates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from archc.dsl.diagnostics import did_you_mean

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
ADJUST_LR = ("original", "match_rms_adamw")
NS_DTYPES = ("auto", "float32", "bfloat16")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd", "constant")
ROLES = ("embedding", "memory", "head", "matrix", "norm", "bias")
DECAYED_ROLES = ("embedding", "head", "matrix")  # and `memory`, in a group of its own


class OptimizerError(ValueError):
    """A bad optimizer or schedule configuration: names the option and the fix."""


def _unknown(kind: str, name: str, choices: Iterable[str]) -> OptimizerError:
    choices = list(choices)
    hint = did_you_mean(name, choices) or f"choose from {', '.join(choices)}"
    return OptimizerError(f"unknown {kind} `{name}`; {hint}")


# ---------------------------------------------------------------------------- Newton–Schulz / Muon


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                  coefficients: tuple[float, float, float] = NS_COEFFICIENTS) -> torch.Tensor:
    """Approximately orthogonalise a 2-D matrix (U S Vᵀ -> U S' Vᵀ, S' ≈ 0.5..1.5), in G's dtype.

    Works on the wide orientation (transposes when rows > cols) so X Xᵀ is the
    small Gram matrix; the same `addmm` sequence as torch.optim.Muon.
    """
    if G.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {list(G.shape)}")
    a, b, c = coefficients
    tall = G.size(0) > G.size(1)
    X = G.T if tall else G
    X = X / X.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.T
        B = torch.addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A²
        X = torch.addmm(X, B, X, beta=a)  # a·X + B·X
    return X.T if tall else X


def shape_scale(rows: int, cols: int, adjust_lr: str) -> float:
    """The factor Muon multiplies lr by for a (rows, cols) update."""
    if adjust_lr == "original":
        return math.sqrt(max(1.0, rows / cols))
    if adjust_lr == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    raise _unknown("adjust_lr", adjust_lr, ADJUST_LR)


def _ns_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _check_row_splits(p: torch.Tensor, splits: list[int] | None, where: str) -> None:
    if splits is None:
        return
    if not splits or any(int(n) <= 0 for n in splits) or sum(splits) != p.shape[0]:
        raise ValueError(f"{where}: row_splits {list(splits)} must be positive and sum to {p.shape[0]} rows")


def _is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _muon_group_step(group: dict, state: dict) -> None:
    lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
    for p, splits in zip(group["params"], group["row_splits"]):
        if p.grad is None:
            continue
        grad = p.grad
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(grad, memory_format=torch.preserve_format)
        buf = st["momentum_buffer"]
        buf.lerp_(grad, 1 - mu)
        update = grad.lerp(buf, mu) if group["nesterov"] else buf
        dtype = _ns_dtype(group["ns_dtype"], p.device)
        blocks = [(0, p.shape[0])] if splits is None else \
            [(sum(splits[:i]), n) for i, n in enumerate(splits)]
        sharded = _is_dtensor(update)
        full = update.full_tensor() if sharded else update  # NS needs the whole matrix (see the docstring)
        ortho = [newton_schulz(full[s:s + n].to(dtype), group["ns_steps"], group["eps"]) for s, n in blocks]
        alphas = [-lr * shape_scale(n, p.shape[1], group["adjust_lr"]) for _, n in blocks]
        p.mul_(1 - lr * wd)  # decoupled decay with the unadjusted lr
        if sharded:
            from torch.distributed.tensor import distribute_tensor
            step = torch.cat([o.to(p.dtype) * a for o, a in zip(ortho, alphas)])
            p.add_(distribute_tensor(step, p.device_mesh, p.placements, src_data_rank=None))  # this rank's shard
        else:
            for (s, n), o, a in zip(blocks, ortho, alphas):
                p[s:s + n].add_(o, alpha=a)


def _adamw_group_step(group: dict, state: dict) -> None:
    """torch's single-tensor AdamW step (decoupled decay), op for op."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
    for p in group["params"]:
        if p.grad is None:
            continue
        grad = p.grad
        st = state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0, dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["step"] += 1
        p.mul_(1 - lr * wd)
        st["exp_avg"].lerp_(grad, 1 - beta1)
        st["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = st["step"].item()
        step_size = lr / (1 - beta1 ** step)
        denom = (st["exp_avg_sq"].sqrt() / (1 - beta2 ** step) ** 0.5).add_(eps)
        p.addcdiv_(st["exp_avg"], denom, value=-step_size)


def _memory_group_step(group: dict, state: dict) -> None:
    """Adam on the rows each table's gradient touched (see the module docstring)."""
    from archc.runtime.engram import sparse_row_adam_

    beta1, beta2 = group["betas"]
    for p in group["params"]:
        if p.grad is None:
            continue
        if _is_dtensor(p):
            raise OptimizerError("memory tables update row by row and cannot be sharded; keep them replicated")
        st = state[p]
        if "row_steps" not in st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["row_steps"] = torch.zeros(p.shape[0], dtype=torch.long, device=p.device)
        if p.grad.is_sparse:
            grad = p.grad.coalesce()  # sums the rows read more than once
            rows, values = grad.indices()[0], grad.values()
        else:
            rows = p.grad.flatten(1).ne(0).any(1).nonzero().squeeze(1)
            values = p.grad[rows]
        sparse_row_adam_(p, rows, values, st["exp_avg"], st["exp_avg_sq"], st["row_steps"], lr=group["lr"],
                         beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


MUON_DEFAULTS = dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True, ns_steps=5, eps=1e-7,
                     adjust_lr="match_rms_adamw", ns_dtype="auto")
ADAMW_DEFAULTS = dict(lr=3e-4, weight_decay=0.0, betas=(0.9, 0.95), eps=1e-8)
_GROUP_EXTRAS = ("params", "param_names", "name", "use_muon", "initial_lr", "row_splits", "sparse_rows")


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon groups (`use_muon=True`, 2-D params only) and AdamW groups in one optimizer.

    Muon group keys: lr, weight_decay, momentum, nesterov, ns_steps, eps,
    adjust_lr, ns_dtype, and row_splits (one entry per param: None or a list of
    row counts). AdamW group keys: lr, weight_decay, betas, eps, and `sparse_rows=True` for memory
    tables (Adam on the touched rows only).
    """

    def __init__(self, param_groups: Iterable[dict]):
        super().__init__(list(param_groups), {})

    def add_param_group(self, param_group: dict) -> None:
        group = dict(param_group)
        if "use_muon" not in group:
            raise OptimizerError("every MuonWithAdamW param group needs `use_muon` (True or False)")
        defaults = MUON_DEFAULTS if group["use_muon"] else ADAMW_DEFAULTS
        for key in group:
            if (key not in defaults and key not in _GROUP_EXTRAS) or (key == "row_splits" and not group["use_muon"]):
                kind = "Muon" if group["use_muon"] else "AdamW"
                raise _unknown(f"{kind} group option", key, [*defaults, "params", "param_names"])
        for key, value in defaults.items():
            group.setdefault(key, value)
        params = group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        group["params"] = params
        if group["use_muon"]:
            if isinstance(group["ns_dtype"], torch.dtype):
                group["ns_dtype"] = str(group["ns_dtype"]).removeprefix("torch.")
            if group["ns_dtype"] not in NS_DTYPES:
                raise _unknown("ns_dtype", group["ns_dtype"], NS_DTYPES)
            if group["adjust_lr"] not in ADJUST_LR:
                raise _unknown("adjust_lr", group["adjust_lr"], ADJUST_LR)
            splits = group.get("row_splits") or [None] * len(params)
            if len(params) == 1 and splits and all(isinstance(n, int) for n in splits):
                splits = [splits]  # {"params": [w], "row_splits": [32, 16, 16]}
            if len(splits) != len(params):
                raise ValueError(f"row_splits has {len(splits)} entries for {len(params)} params")
            group["row_splits"] = [None if s is None else [int(n) for n in s] for s in splits]
            names = group.get("param_names") or [f"params[{i}]" for i in range(len(params))]
            for name, p, s in zip(names, params, group["row_splits"]):
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters; {name} has shape {list(p.shape)} "
                                     "(give it to AdamW)")
                _check_row_splits(p, s, name)
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                _muon_group_step(group, self.state)
            else:
                (_memory_group_step if group.get("sparse_rows") else _adamw_group_step)(group, self.state)
        return loss


class Muon(MuonWithAdamW):
    """Muon for 2-D parameters only (raises ValueError for any other); see the module docstring.

    `params` may be tensors or group dicts; a group may carry `row_splits`
    (one entry per param, None or row counts) to orthogonalise fused matrices
    block by block.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7,
                 adjust_lr: str = "match_rms_adamw", ns_dtype: str | torch.dtype = "auto"):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"Muon: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1 "
                             f"(got {lr}, {weight_decay}, {momentum})")
        self._muon_defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                                   ns_steps=ns_steps, eps=eps, adjust_lr=adjust_lr, ns_dtype=ns_dtype)
        params = list(params)
        if params and not isinstance(params[0], dict):
            params = [{"params": params}]
        super().__init__(params)

    def add_param_group(self, param_group: dict) -> None:
        group = {**self._muon_defaults, **param_group, "use_muon": True}
        if param_group.get("use_muon") is False:
            raise ValueError("Muon takes only Muon groups; use MuonWithAdamW for AdamW groups")
        super().add_param_group(group)


# ---------------------------------------------------------------------------- building from roles

OPTION_DEFAULTS: dict[str, dict[str, Any]] = {
    "adamw": dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8),
    "muon": dict(lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, muon_lr=None, muon_momentum=0.95,
                 muon_nesterov=True, muon_ns_steps=5, muon_adjust_lr="match_rms_adamw", muon_ns_dtype="auto"),
}


def optimizer_options(name: str = "adamw", **options: Any) -> dict[str, Any]:
    """Check an optimizer name and its options (unknown names fail with "did you mean"); fill defaults."""
    if name not in OPTION_DEFAULTS:
        raise _unknown("optimizer", name, OPTIMIZERS)
    defaults = OPTION_DEFAULTS[name]
    everything = set().union(*OPTION_DEFAULTS.values())
    for key in options:
        if key not in defaults:
            if key in everything:
                raise OptimizerError(f"option `{key}` applies to optimizer muon, not {name}")
            raise _unknown(f"option for optimizer {name}:", key, defaults)
    out = {**defaults, **options}
    if out["lr"] < 0 or out["weight_decay"] < 0 or out["eps"] <= 0:
        raise OptimizerError(f"need lr >= 0, weight_decay >= 0, eps > 0 (got {out['lr']}, "
                             f"{out['weight_decay']}, {out['eps']})")
    if len(out["betas"]) != 2 or not all(0 <= b < 1 for b in out["betas"]):
        raise OptimizerError(f"betas must be two numbers in [0, 1), got {out['betas']}")
    out["betas"] = tuple(out["betas"])
    if name == "muon":
        if out["muon_adjust_lr"] not in ADJUST_LR:
            raise _unknown("muon_adjust_lr", out["muon_adjust_lr"], ADJUST_LR)
        if out["muon_ns_dtype"] not in NS_DTYPES:
            raise _unknown("muon_ns_dtype", out["muon_ns_dtype"], NS_DTYPES)
        if not 0 <= out["muon_momentum"] < 1:
            raise OptimizerError(f"muon_momentum must be in [0, 1), got {out['muon_momentum']}")
    return out


def build_optimizer(model: torch.nn.Module, roles: dict[str, str],
                    fused: dict[str, list[tuple[str, int, int]]] | None = None, *,
                    name: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                    muon_lr: float | None = None, muon_momentum: float | None = None,
                    **more: Any) -> torch.optim.Optimizer:
    """The optimizer for `model`, grouped by parameter role.

    `roles` is `Compiled.param_roles()`, `fused` is `weights.fused_layout(compiled)`
    (fused name -> [(part name, row start, rows)], used for Muon's row_splits).
    name="adamw": torch AdamW, groups `decay` (matrix/head/embedding) and `no_decay`.
    name="muon": MuonWithAdamW, groups `muon` (matrix, lr=muon_lr or lr),
    `adamw_decay` (embedding/head) and `adamw_no_decay` (norm/bias).
    Either way `memory` tables form the group `memory` (Adam on touched rows, decayed); with one,
    AdamW mode is MuonWithAdamW's AdamW groups.
    More options for muon: muon_nesterov, muon_ns_steps, muon_adjust_lr, muon_ns_dtype.
    """
    if muon_momentum is not None:
        more["muon_momentum"] = muon_momentum
    if muon_lr is not None:
        more["muon_lr"] = muon_lr
    opts = optimizer_options(name, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps, **more)
    fused = fused or {}
    params = dict(model.named_parameters())
    missing = [n for n in params if n not in roles]
    if missing:
        raise OptimizerError(f"no role for parameter(s) {', '.join(missing)}; pass compiled.param_roles() "
                             "of the spec this model was built from")
    for n, role in roles.items():
        if role not in ROLES:
            raise _unknown(f"role for {n}:", role, ROLES)

    def group(label: str, names: list[str], **kw: Any) -> dict:
        return {"params": [params[n] for n in names], "param_names": names, "name": label, **kw}

    decayed = [n for n in params if roles[n] in DECAYED_ROLES]
    plain = [n for n in params if roles[n] not in DECAYED_ROLES and roles[n] != "memory"]
    memory = [n for n in params if roles[n] == "memory"]
    adam = dict(lr=opts["lr"], betas=opts["betas"], eps=opts["eps"])
    tables = group("memory", memory, use_muon=False, sparse_rows=True, weight_decay=opts["weight_decay"], **adam)
    if name == "adamw" and memory:
        groups = [group("decay", decayed, use_muon=False, weight_decay=opts["weight_decay"], **adam),
                  group("no_decay", plain, use_muon=False, weight_decay=0.0, **adam), tables]
        return MuonWithAdamW([g for g in groups if g["params"]])
    if name == "adamw":
        groups = [group("decay", decayed, weight_decay=opts["weight_decay"]),
                  group("no_decay", plain, weight_decay=0.0)]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=opts["lr"], betas=opts["betas"],
                                 eps=opts["eps"])
    muon = [n for n in decayed if roles[n] == "matrix" and params[n].ndim == 2]
    aux = [n for n in decayed if n not in muon]
    groups = [
        group("muon", muon, use_muon=True, lr=opts["muon_lr"] if opts["muon_lr"] is not None else opts["lr"],
              weight_decay=opts["weight_decay"], momentum=opts["muon_momentum"],
              nesterov=opts["muon_nesterov"], ns_steps=opts["muon_ns_steps"],
              adjust_lr=opts["muon_adjust_lr"], ns_dtype=opts["muon_ns_dtype"],
              row_splits=[[rows for _part, _start, rows in fused[n]] if n in fused else None for n in muon]),
        group("adamw_decay", aux, use_muon=False, weight_decay=opts["weight_decay"], **adam),
        group("adamw_no_decay", plain, use_muon=False, weight_decay=0.0, **adam),
        tables,
    ]
    return MuonWithAdamW([g for g in groups if g["params"]])


# ---------------------------------------------------------------------------- schedules


def lr_lambda(kind: str, warmup: int, total: int, min_ratio: float = 0.1,
              decay_fraction: float = 0.2) -> Callable[[int], float]:
    """A multiplier of the base lr as a pure function of the step (for `LambdaLR`).

    Steps 0..warmup-1 rise linearly as (step+1)/warmup. Then
    "cosine": from 1 at `warmup` to `min_ratio` at `total` (and after);
    "wsd": 1 until `total - decay_fraction·total`, then linear to `min_ratio` at `total`;
    "constant": 1.
    """
    if kind not in SCHEDULES:
        raise _unknown("schedule", kind, SCHEDULES)
    if warmup < 0 or total <= 0 or warmup > total:
        raise OptimizerError(f"schedule needs 0 <= warmup <= total and total > 0 (got warmup={warmup}, "
                             f"total={total})")
    if not 0 <= min_ratio <= 1 or not 0 < decay_fraction <= 1:
        raise OptimizerError(f"need 0 <= min_ratio <= 1 and 0 < decay_fraction <= 1 (got {min_ratio}, "
                             f"{decay_fraction})")
    decay_start = max(warmup, total - round(decay_fraction * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        if kind == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
        return 1.0 - (1 - min_ratio) * progress

    schedule.__qualname__ = schedule.__name__ = f"lr_lambda_{kind}"
    return schedule
