"""Benchmarks of mlseg_jax, run from the repository root: `python -m benchmarks.bench`
(speed, MFU, memory plan; see benchmarks/README.md), and the scripts beside it."""
