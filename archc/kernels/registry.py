"""The kernel registry: every kernel family, its faces, the rule `auto` follows, and its limits.

A family is one computation (masked attention, causal linear attention, Mamba-2's SSD, the
gated delta rule, Native Sparse Attention, grouped GEMM) with several faces that compute the
same thing: a plain-PyTorch `reference`, a fast PyTorch form (`chunked`, `gather`, `torch`,
SDPA / flex_attention for attention) and, where there is one, `triton`. `auto` is decided per
call, on the device the tensors live on: the Triton face on CUDA when triton is installed and
the shape fits its limits, else the family's fallback.

The compiler's `choose_kernels` pass reads this registry to record a kernel per layer (and why),
and the command line's `--kernel` help lists the faces from here. Nothing here imports torch or
triton: asking what exists must not load them.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["FAMILIES", "KernelFamily", "TRITON_MAX_HEAD_DIM", "face", "head_dims_unfit", "nsa_triton_unfit",
           "triton_available"]

# The Triton kernels hold whole K×V states and K-wide tiles in registers: head (and state) dims up to this.
TRITON_MAX_HEAD_DIM = 256
NSA_TRITON_MAX_GROUP = 64  # query heads per KV group NSA's Triton kernel holds in one tile
NSA_TRITON_MAX_SELECT_BLOCK = 128  # selection-block tokens per tile


@functools.cache
def triton_available() -> bool:
    """triton is importable (it may still need TRITON_INTERPRET=1 for CPU tensors)."""
    return importlib.util.find_spec("triton") is not None


def head_dims_unfit(**dims: int) -> str | None:
    """Why the Triton kernels cannot hold these head / state dims, or None."""
    big = {k: v for k, v in dims.items() if v > TRITON_MAX_HEAD_DIM}
    if not big:
        return None
    return ", ".join(f"{k}={v}" for k, v in big.items()) + f" exceed the Triton kernels' {TRITON_MAX_HEAD_DIM}"


def nsa_triton_unfit(heads: int, kv_heads: int, head_dim: int, value_dim: int, select_block: int) -> str | None:
    """Why NSA's Triton selection kernel cannot tile this shape, or None when it can."""
    group = heads // kv_heads
    if group > NSA_TRITON_MAX_GROUP:
        return f"GQA group of {group} query heads exceeds the Triton kernel's {NSA_TRITON_MAX_GROUP}"
    big = {k: v for k, v in (("head_dim", head_dim), ("value_dim", value_dim)) if v > TRITON_MAX_HEAD_DIM}
    if big:
        return ", ".join(f"{k}={v}" for k, v in big.items()) + f" exceed the Triton kernel's {TRITON_MAX_HEAD_DIM}"
    if select_block > NSA_TRITON_MAX_SELECT_BLOCK:
        return f"select_block={select_block} exceeds the Triton kernel's {NSA_TRITON_MAX_SELECT_BLOCK}"
    return None


@dataclass(frozen=True)
class KernelFamily:
    name: str
    faces: tuple[str, ...]  # what the family's entry point takes as `impl` / `kernel`, "auto" first
    auto: str  # the rule "auto" follows, in words (also the compiler's recorded reason)
    fallback: str | None = None  # what "auto" runs where the Triton face cannot
    fallback_words: str = ""  # the fallback in words, for recorded reasons
    limits: Callable[..., str | None] | None = None  # why the Triton face cannot run a shape, or None
    runtime_faces: tuple[str, ...] = ()  # further faces the runtime modules provide (flash-linear-attention)
    per_layer: bool = True  # the compiler records a kernel per layer (`--kernel` can force one)
    word: str = "impl"  # the entry point's argument name
    notes: dict[str, str] = field(default_factory=dict)  # face -> what it is

    @property
    def choices(self) -> tuple[str, ...]:
        """Every kernel `--kernel` may name for this family."""
        return (*self.faces, *self.runtime_faces)

    def triton_unfit(self, **dims: int) -> str | None:
        return self.limits(**dims) if self.limits else None


_MIXER_AUTO = "at run time: Triton on CUDA, else chunked PyTorch; one-token steps use the recurrence"
_MIXER_FACES = ("auto", "reference", "chunked", "triton")
_CHUNKED = "the chunked PyTorch form"

FAMILIES: dict[str, KernelFamily] = {f.name: f for f in (
    KernelFamily(
        "attention", ("auto", "sdpa", "sdpa_mask", "flex", "local", "math"),
        "plain masks: SDPA's is_causal; other masks, soft-caps and position biases: flex_attention (block-sparse, "
        "a score_mod) on CUDA; elsewhere the math kernel for a soft-cap, SDPA with a float mask for a bias, the "
        "blocked local kernel with a window, SDPA with a boolean mask otherwise (archc.kernels.attention.resolve)",
        word="kernel",
        notes={"sdpa": "torch's SDPA, no mask or is_causal", "sdpa_mask": "SDPA with a boolean (or biased float) mask",
               "flex": "flex_attention with a BlockMask and a score_mod",
               "local": "blocked sliding window, linear in T",
               "math": "the explicit-score reference (mask, soft-cap, bias)"}),
    KernelFamily("linear_attention", _MIXER_FACES, _MIXER_AUTO, "chunked", _CHUNKED, head_dims_unfit,
                 runtime_faces=("fla",)),
    KernelFamily("ssd", _MIXER_FACES, _MIXER_AUTO, "chunked", _CHUNKED, head_dims_unfit, runtime_faces=("fla",)),
    KernelFamily("delta_rule", _MIXER_FACES, _MIXER_AUTO, "chunked", _CHUNKED, head_dims_unfit,
                 runtime_faces=("fla",)),
    KernelFamily("nsa", ("auto", "reference", "gather", "triton"),
                 "at run time: Triton selection kernel on CUDA, else the gather path", "gather", "the gather path",
                 nsa_triton_unfit, word="kernel"),
    KernelFamily("grouped_gemm", ("auto", "reference", "torch", "triton"),
                 "Triton on CUDA for fp32 / bf16 / fp16, else torch._grouped_mm where the device and dtype allow, "
                 "else the reference loop", per_layer=False),
)}


def face(family: str, requested: str, *, cuda: bool, fallback: str | None = None, **dims: int) -> str:
    """The face a call runs: `requested`, checked; or for "auto" the Triton face when the tensors are on CUDA,
    triton is installed and the shape fits its limits, else the family's fallback (or `fallback`)."""
    fam = FAMILIES[family]
    if requested not in fam.faces:
        raise ValueError(f"{family}: unknown {fam.word} {requested!r}; {fam.word} must be one of "
                         f"{', '.join(fam.faces)}")
    if requested != "auto":
        return requested
    if cuda and triton_available() and fam.triton_unfit(**dims) is None:
        return "triton"
    return fallback or fam.fallback
