"""The op families, one module each; importing this package registers every op and built-in.

The list below is the registry: a new family is one module here (its ops, its built-ins, their
checks) added to it, a runtime module for what its generated code calls, kernels if any, tests
and docs.
"""

from archc.compiler.ops import (  # noqa: F401  (each registers its ops)
    attention,
    basic,
    diffusion,
    elementwise,
    engram,
    gated,
    lanes,
    linalg,
    losses,
    mixers,
    mla,
    moe,
    nsa,
    params,
    patching,
    tensor,
)
from archc.compiler.ops.base import (
    COMPOSITES,
    REGISTRY,
    REQUIRED,
    A,
    Composite,
    LowerContext,
    OpDef,
    Width,
    bind,
    dim_symbols,
    dim_value,
    fmt_shape,
    numel,
    vocabulary,
)
from archc.compiler.ops.elementwise import BINARY_OPS

__all__ = ["A", "BINARY_OPS", "COMPOSITES", "Composite", "LowerContext", "OpDef", "REGISTRY", "REQUIRED", "Width",
           "bind", "dim_symbols", "dim_value", "fmt_shape", "numel", "vocabulary"]
