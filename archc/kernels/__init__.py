"""Kernels, each with a plain-PyTorch reference, a fast path and a Triton face."""
