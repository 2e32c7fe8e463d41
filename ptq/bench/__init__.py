"""Benchmarks at real scale on random weights: ``python -m ptq.bench`` (quantization speed and memory)
and ``python -m ptq.bench.infer`` (inference memory and speed with real low-bit kernels)."""
