"""Accelerator descriptions for `archc plan`: peak FLOP/s per dtype, memory, and link bandwidths.

The known ones are data (hardware.toml, every value with its public source); `--hardware local`
is measured on this machine by `archc.training.hardware_probe` (the compiler never imports torch).
"""

from __future__ import annotations

import tomllib
from importlib import resources

import attrs

from archc.dsl.diagnostics import SpecError, did_you_mean

# Bytes per value of each dtype a plan can compute in.
ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "fp4": 0.5}


@attrs.frozen
class Hardware:
    name: str
    title: str
    flops: dict[str, float]  # dtype -> peak dense matmul FLOP/s
    hbm_bytes: float
    hbm_bw: float  # bytes/s
    intra_bw: float  # one device's collective bandwidth inside its node, bytes/s one way
    inter_bw: float  # one node's bandwidth to other nodes (all its NICs), bytes/s one way
    devices_per_node: int
    ici_axes: int = 0  # a TPU's torus axes, which split intra_bw between them; 0 for a switched fabric
    triton: bool = True  # mixers run their Triton kernels (False: their chunked PyTorch form, as on a CPU)
    note: str = ""  # how the numbers were obtained, when measured

    def axes(self, count: int) -> Hardware:
        """This hardware as seen by a collective that gets `count` of its torus axes (all of a switch)."""
        if not self.ici_axes:
            return self
        return attrs.evolve(self, intra_bw=self.intra_bw * min(count, self.ici_axes) / self.ici_axes)

    def peak(self, dtype: str) -> float:
        if dtype not in ITEMSIZE:
            raise SpecError(f"--dtype {dtype}: not a dtype a plan knows", hint=did_you_mean(dtype, ITEMSIZE)
                            or f"dtypes: {', '.join(ITEMSIZE)}")
        if dtype not in self.flops:
            raise SpecError(f"--dtype {dtype}: {self.title} lists no {dtype} peak",
                            hint=f"its dtypes: {', '.join(self.flops)}")
        return self.flops[dtype]

    def ridge(self, dtype: str) -> float:
        """FLOPs per byte of memory traffic above which an op is compute-bound (the roofline's ridge point)."""
        return self.peak(dtype) / self.hbm_bw


def _table() -> dict:
    text = resources.files("archc.compiler").joinpath("hardware.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


def names() -> list[str]:
    return [*_table(), "local"]


def load(name: str) -> Hardware:
    """A known accelerator by name (`h100`, `v5p`, ...); `local` must be measured (hardware_probe)."""
    table = _table()
    if name not in table:
        if name == "local":
            raise SpecError("--hardware local is measured on this machine: pass "
                            "archc.training.hardware_probe.measure() to plan() (the `archc plan` command does)")
        raise SpecError(f"--hardware {name}: no such hardware", hint=did_you_mean(name, names())
                        or f"known: {', '.join(names())}")
    entry = dict(table[name])
    return Hardware(name=name, flops={k: float(v) for k, v in entry.pop("flops").items()},
                    **{k: (int(v) if k in ("devices_per_node", "ici_axes") else v) for k, v in entry.items()})
