"""The op families, one module each; importing this package registers every op and built-in.

The list below is the registry: a new family is one module here (its ops, its built-ins, their
checks) added to it, a runtime module for what its generated code calls, kernels if any, tests
and docs.
"""

from archc.compiler.ops import attention, basic, mixers, mla, moe, nsa  # noqa: F401  (each registers its ops)
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

__all__ = ["A", "COMPOSITES", "Composite", "LowerContext", "OpDef", "REGISTRY", "REQUIRED", "Width", "bind",
           "dim_symbols", "dim_value", "fmt_shape", "numel", "vocabulary"]
