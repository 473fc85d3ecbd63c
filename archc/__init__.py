"""archc: a compiler for neural-network architectures.

    import archc
    compiled = archc.compile("specs/llama.arch", d_model=256)
    model = compiled.build()
"""

__version__ = "0.1.0"

__all__ = ["Compiled", "SpecError", "__version__", "compile"]


def __getattr__(name: str):
    # Lazy, so that generated modules (which import archc.runtime) never load the compiler, lark or networkx.
    if name in ("Compiled", "compile"):
        from archc.compiler import api

        return getattr(api, name)
    if name == "SpecError":
        from archc.dsl.diagnostics import SpecError

        return SpecError
    raise AttributeError(f"module 'archc' has no attribute {name!r}")
