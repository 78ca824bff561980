"""Benchmarks of imagen_jax against its PyTorch peers (see README.md; run with benchmarks/run.py)."""
