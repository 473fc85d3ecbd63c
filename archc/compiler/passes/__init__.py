"""The optimisation passes, one file each; `PASSES` is their order in `archc.compile()`."""

from archc.compiler.passes.choose_kernels import choose_kernels
from archc.compiler.passes.cse import cse
from archc.compiler.passes.dce import dce
from archc.compiler.passes.fold_params import fold_params
from archc.compiler.passes.fuse_experts import fuse_experts
from archc.compiler.passes.fuse_projections import fuse_projections
from archc.compiler.passes.infer_shapes import infer_shapes

# (name, function, can be turned off with --no-pass)
PASSES = (
    ("fold_params", fold_params, False),
    ("infer_shapes", infer_shapes, False),
    ("dce", dce, True),
    ("cse", cse, True),
    ("fuse_experts", fuse_experts, True),
    ("fuse_projections", fuse_projections, True),
    ("choose_kernels", choose_kernels, False),
)
PASS_NAMES = tuple(name for name, _fn, _optional in PASSES)

__all__ = ["PASSES", "PASS_NAMES", "choose_kernels", "cse", "dce", "fold_params",
           "fuse_experts", "fuse_projections", "infer_shapes"]
