"""DiLoCo and Streaming DiLoCo over torch.distributed (one process = one replica).

DiLoCo (Douillard et al. 2023, arXiv:2311.08105): every replica trains its own copy with its own inner
optimizer (state never leaves the replica) on its own data; every H inner steps
the outer gradient Δ = θ_global − θ_local is averaged over replicas
(all_reduce), the outer optimizer (Nesterov SGD, lr 0.7, momentum 0.9) steps the
global copy — which every replica holds identically, with the outer momentum —
and θ_local ← θ_global.

Streaming DiLoCo (Douillard et al. 2025, arXiv:2501.18512): the parameters are split into P fragments of layers
(from the IR's layer scopes `layers.{i}`; `strided`: layer l → fragment l mod P,
`sequential`: consecutive layers). Parameters outside the layers join the
fragment of the first layer (those before it, e.g. the embedding) or of the last
layer (those after it, e.g. the final norm and head). Fragment p syncs after
inner step t when t ≡ offset_p (mod H), offset_p = (p+1)·H/P mod H, so each
fragment syncs exactly every H steps and a different one every ~H/P steps. With
overlap τ > 0 the collective is started at t and consumed at t+τ (the replica
keeps training meanwhile) and merged as θ_local ← α·θ_local + (1−α)·θ_global
(α = 0.5 by default then; α = 0 without overlap, i.e. plain replacement). With
fp4 the outer gradients go over the wire as 4-bit floats (fp4.py), per block
of `block` values, summed in fp32.

Bytes are counted as what this rank sends with ring algorithms: all_reduce
2·(W−1)/W·n·4, all_gather of packed codes (W−1)·packed bytes.

The collective goes through a `comm` seam: by default torch.distributed on the
default group; under --fault-tolerant, ft.FTComm routes it through a torchft
Manager (quorum, fault-tolerant all_reduce, commit vote). A sync whose commit
vote fails is dropped: the fragment's local copy returns to the global copy
and the outer optimizer does not step (as torchft's own DiLoCo does).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.distributed as dist

from archc.dsl.diagnostics import did_you_mean
from archc.training.distributed import fp4


class DiLoCoError(ValueError):
    """A bad --diloco option: one line naming the key and the fix."""


@dataclass
class DiLoCoConfig:
    replicas: int = 2
    inner_steps: int = 50  # H
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    streaming: int = 0  # fragments; 0 or 1 = plain DiLoCo (the whole model at once)
    assign: str = "strided"  # strided | sequential
    tau: int = 0  # overlap: inner steps between starting a sync and using it
    alpha: float | None = None  # mixing; default 0.5 with overlap, 0 without
    fp4: str | None = None  # e3m0 | e2m1: quantise outer gradients on the wire
    block: int = 128  # values per fp4 scale

    @property
    def fragments(self) -> int:
        return max(1, self.streaming)

    @property
    def mix(self) -> float:
        return self.alpha if self.alpha is not None else (0.5 if self.tau > 0 else 0.0)

    def check(self) -> DiLoCoConfig:
        if self.replicas < 1 or self.inner_steps < 1:
            raise DiLoCoError("--diloco: replicas and inner_steps must be at least 1")
        if not (math.isfinite(self.outer_lr) and self.outer_lr > 0):
            raise DiLoCoError(f"--diloco outer_lr={self.outer_lr}: expected a finite number above 0")
        if not 0 <= self.outer_momentum < 1:
            raise DiLoCoError(f"--diloco outer_momentum={self.outer_momentum}: expected a number in [0, 1)")
        if self.streaming < 0:
            raise DiLoCoError(f"--diloco streaming={self.streaming}: expected a number of fragments, at least 0 "
                              "(0 or 1: plain DiLoCo)")
        if self.block < 1:
            raise DiLoCoError(f"--diloco block={self.block}: expected values per fp4 scale, at least 1")
        if not 0 <= self.tau < self.inner_steps:
            raise DiLoCoError(f"--diloco tau={self.tau}: the overlap must be in [0, inner_steps)")
        if self.alpha is not None and not 0 <= self.alpha <= 1:
            raise DiLoCoError(f"--diloco alpha={self.alpha}: must be in [0, 1]")
        if self.assign not in ("strided", "sequential"):
            raise DiLoCoError(f"--diloco assign={self.assign}: "
                              + (did_you_mean(self.assign, ("strided", "sequential")) or "strided or sequential"))
        if self.fp4 is not None and self.fp4 not in fp4.FORMATS:
            raise DiLoCoError(f"--diloco fp4={self.fp4}: "
                              + (did_you_mean(self.fp4, fp4.FORMATS) or "choose e3m0 or e2m1"))
        return self


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def parse_diloco(text: str) -> DiLoCoConfig:
    """`replicas=R,inner_steps=H[,outer_lr=..,outer_momentum=..,streaming=P,tau=..,alpha=..,fp4=e3m0]`."""
    kinds = {f.name: f.type for f in fields(DiLoCoConfig)}
    aliases = {"H": "inner_steps", "h": "inner_steps", "R": "replicas", "fragments": "streaming"}
    values: dict[str, Any] = {}
    if not text.strip():
        raise DiLoCoError("--diloco '': expected KEY=VALUE,... e.g. --diloco replicas=2,inner_steps=50")
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        key = aliases.get(key.strip(), key.strip())
        if not sep or not value.strip():
            raise DiLoCoError(f"--diloco {item!r}: expected KEY=VALUE")
        if key not in kinds:
            hint = did_you_mean(key, kinds) or f"keys: {', '.join(kinds)}"
            raise DiLoCoError(f"--diloco: unknown key `{key}`; {hint}")
        kind, value = str(kinds[key]), value.strip()
        try:
            if key in ("fp4",):
                values[key] = None if value in ("none", "off") else value
            elif key == "nesterov":
                values[key] = _BOOLEANS[value.lower()]
            elif kind.startswith("int"):
                values[key] = int(value)
            elif kind.startswith("float"):
                values[key] = float(value)
            else:
                values[key] = value
        except (ValueError, KeyError):
            expected = "true or false" if key == "nesterov" else kind.split(" ")[0]
            raise DiLoCoError(f"--diloco {key}={value}: expected {expected}") from None
    return DiLoCoConfig(**values).check()


# ------------------------------------------------------------------------------------------- fragments


def layer_scopes(compiled) -> list[str]:
    """The repeated layer scopes of the IR (`layers.0`, `layers.1`, ...), in order."""
    by_prefix: dict[str, list[tuple[int, str]]] = {}
    for name in compiled.ir.scopes:
        m = re.fullmatch(r"(.*?)\.?(\d+)", name)
        if m:
            by_prefix.setdefault(m.group(1), []).append((int(m.group(2)), name))
    if not by_prefix:
        return []
    best = max(by_prefix.values(), key=len)
    return [name for _, name in sorted(best)]


def fragment_params(compiled, model: torch.nn.Module, n: int, assign: str = "strided") -> list[list[str]]:
    """Parameter names of each of n fragments, built from the layer scopes."""
    names = [name for name, _ in model.named_parameters()]
    if n <= 1:
        return [names]
    layers = layer_scopes(compiled)
    if len(layers) < n:
        raise DiLoCoError(f"--diloco streaming={n}: the model has {len(layers)} layer(s); use at most that many "
                          "fragments")
    if assign == "strided":
        frag_of_layer = {layer: i % n for i, layer in enumerate(layers)}
    else:
        per, extra = divmod(len(layers), n)
        sizes = [per + (p < extra) for p in range(n)]
        frag_of_layer, i = {}, 0
        for p, size in enumerate(sizes):
            for layer in layers[i:i + size]:
                frag_of_layer[layer] = p
            i += size
    out: list[list[str]] = [[] for _ in range(n)]
    seen_layer = False
    for name in names:
        layer = next((l for l in layers if name.startswith(l + ".")), None)
        if layer is not None:
            seen_layer = True
            out[frag_of_layer[layer]].append(name)
        else:  # before the layers -> with the first layer; after -> with the last
            out[frag_of_layer[layers[-1] if seen_layer else layers[0]]].append(name)
    return out


# --------------------------------------------------------------------------------------------- DiLoCo


@dataclass
class _Fragment:
    index: int
    names: list[str]
    local: list[torch.Tensor]
    glob: list[torch.nn.Parameter]
    outer: torch.optim.Optimizer
    offset: int
    pending: Any = None  # (apply_step, handle, flat_delta, started)


@dataclass
class SyncStats:
    bytes_sent: int = 0
    comm_seconds: float = 0.0
    syncs: int = 0
    peak_bytes: int = 0
    schedule: list = field(default_factory=list)  # (inner step, fragment, "start" | "apply")


class DiLoCo:
    """Outer loop around a replica's model: call `after_inner_step(t)` after inner step t (1-based)."""

    def __init__(self, model: torch.nn.Module, fragments: list[list[str]], config: DiLoCoConfig, group=None,
                 comm=None):
        self.config, self.group, self.comm = config, group, comm
        self.world = dist.get_world_size(group) if comm is None and dist.is_initialized() else 1
        params = dict(model.named_parameters())
        H, P = config.inner_steps, len(fragments)
        self.fragments = []
        for p, names in enumerate(fragments):
            local = [params[n] for n in names]
            glob = [torch.nn.Parameter(t.detach().clone().float(), requires_grad=False) for t in local]
            outer = torch.optim.SGD(glob, lr=config.outer_lr, momentum=config.outer_momentum,
                                    nesterov=config.nesterov and config.outer_momentum > 0)
            self.fragments.append(_Fragment(p, names, local, glob, outer, ((p + 1) * H // P) % H))
        self.stats = SyncStats()

    # -- the outer step, split into start (send) and apply (consume) so it can overlap inner steps
    def _start(self, frag: _Fragment, step: int) -> None:
        # under torchft the quorum comes first: it may heal this replica (replacing every state it holds)
        weight = self.comm.begin(frag.index) if self.comm is not None else 1.0
        with torch.no_grad():
            delta = torch.cat([(g - l.detach().float()).reshape(-1) for g, l in zip(frag.glob, frag.local)])
        W, n = self.world, delta.numel()
        if self.comm is not None:
            handle, sent = self.comm.average(delta, weight)
        elif self.config.fp4:
            sent = (W - 1) * fp4.packed_bytes(n, self.config.block)
            handle = (fp4.quantized_all_reduce(delta, self.group, self.config.fp4, self.config.block, async_op=True)
                      if W > 1 else _Done(fp4.dequantize(fp4.quantize(delta, self.config.fp4, self.config.block))))
        else:
            sent = 2 * (W - 1) * n * 4 // W
            handle = _Work(dist.all_reduce(delta, group=self.group, async_op=True), delta, W) if W > 1 \
                else _Done(delta)
        self.stats.bytes_sent += sent
        self.stats.peak_bytes = max(self.stats.peak_bytes, sent)
        self.stats.syncs += 1
        self.stats.schedule.append((step, frag.index, "start"))
        frag.pending = (step + self.config.tau, handle)

    def _apply(self, frag: _Fragment, step: int) -> None:
        _, handle = frag.pending
        frag.pending = None
        t0 = time.perf_counter()
        delta = handle.wait()
        committed = self.comm.commit() if self.comm is not None else True
        self.stats.comm_seconds += time.perf_counter() - t0
        if not committed:  # drop this sync: back to the last global copy, no outer step
            with torch.no_grad():
                for g, l in zip(frag.glob, frag.local):
                    l.copy_(g)
            self.stats.schedule.append((step, frag.index, "dropped"))
            return
        i = 0
        for g in frag.glob:
            g.grad = delta[i:i + g.numel()].view_as(g).clone()
            i += g.numel()
        frag.outer.step()
        alpha = self.config.mix
        with torch.no_grad():
            for g, l in zip(frag.glob, frag.local):
                if alpha == 0:
                    l.copy_(g)
                else:
                    l.copy_(alpha * l.float() + (1 - alpha) * g)
        self.stats.schedule.append((step, frag.index, "apply"))

    def after_inner_step(self, step: int, first: int = 0) -> None:
        """Run the syncs due after inner step `step`; `first` > 0 resumes a step's syncs at that fragment
        (a replica that joined through a quorum already open for it: applied syncs are done then)."""
        if first == 0:
            for frag in self.fragments:
                if frag.pending is not None and frag.pending[0] == step:
                    self._apply(frag, step)
        for frag in self.fragments[first:]:
            if step % self.config.inner_steps == frag.offset:
                self._start(frag, step)
                if self.config.tau == 0:
                    self._apply(frag, step)

    def finish(self, step: int) -> None:
        """Consume syncs still in flight (so no collective is left half done)."""
        for frag in self.fragments:
            if frag.pending is not None:
                self._apply(frag, step)

    @torch.no_grad()
    def global_state(self) -> dict[str, torch.Tensor]:
        return {n: g.detach().clone() for f in self.fragments for n, g in zip(f.names, f.glob)}

    def swap_in_global(self):
        """Context manager: the model holds the global parameters inside it (for evaluation)."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            saved = [[l.detach().clone() for l in f.local] for f in self.fragments]
            with torch.no_grad():
                for f in self.fragments:
                    for g, l in zip(f.glob, f.local):
                        l.copy_(g)
            try:
                yield
            finally:
                with torch.no_grad():
                    for f, s in zip(self.fragments, saved):
                        for l, v in zip(f.local, s):
                            l.copy_(v)
        return ctx()

    def state_dict(self) -> dict:
        """Global copies, outer optimizer states, sync statistics, and the syncs in flight (overlap τ > 0).

        An in-flight collective is waited for here and its averaged outer gradient
        stored with the step it is due at: the same value a later wait returns, so
        saving changes no number. (Not under torchft: there the commit vote
        belongs to the apply step; ft.check keeps heals away from syncs in flight.)
        """
        pending = []
        for f in self.fragments:
            if f.pending is not None:
                if self.comm is not None:
                    raise RuntimeError("DiLoCo.state_dict() under torchft with a sync in flight")
                due, handle = f.pending
                t0 = time.perf_counter()
                delta = handle.wait()
                self.stats.comm_seconds += time.perf_counter() - t0
                f.pending = (due, _Done(delta))
                pending.append({"fragment": f.index, "due": due, "delta": delta.clone()})
        return {"global": self.global_state(), "outer": [copy.deepcopy(f.outer.state_dict()) for f in self.fragments],
                "stats": dataclasses.asdict(self.stats), "pending": pending}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for f, outer in zip(self.fragments, state["outer"], strict=True):
            for n, g in zip(f.names, f.glob):
                g.copy_(state["global"][n])
            f.outer.load_state_dict(outer)
            f.pending = None
        for item in state.get("pending", []):
            self.fragments[item["fragment"]].pending = (item["due"], _Done(item["delta"].clone()))
        stats = dict(state["stats"])
        stats["schedule"] = [tuple(e) for e in stats["schedule"]]
        self.stats = SyncStats(**stats)


class _Work:
    def __init__(self, work, tensor, world):
        self.work, self.tensor, self.world = work, tensor, world

    def wait(self):
        self.work.wait()
        return self.tensor / self.world


class _Done:
    def __init__(self, tensor):
        self.tensor = tensor

    def wait(self):
        return self.tensor


__all__ = ["DiLoCo", "DiLoCoConfig", "DiLoCoError", "fragment_params", "layer_scopes", "parse_diloco"]
