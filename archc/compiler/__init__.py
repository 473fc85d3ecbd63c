"""Lowering, the graph IR, passes, code generation, analyses and the public API."""
