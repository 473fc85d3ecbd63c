"""Weights in and out: canonical names, fused layouts, and Hugging Face checkpoints."""
