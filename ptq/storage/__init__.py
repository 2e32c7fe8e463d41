"""Checkpoint formats other programs load: compressed-tensors (transformers, vLLM)."""
