"""archc: a compiler for neural-network architectures.

    import archc
    compiled = archc.compile("specs/llama.arch", d_model=256)
    model = compiled.build()
"""

__version__ = "0.1.0"

from archc.compiler.api import Compiled, compile  # noqa: E402
from archc.dsl.diagnostics import SpecError  # noqa: E402

__all__ = ["Compiled", "SpecError", "__version__", "compile"]
