"""Benchmarks: ``python -m bench.throughput --help`` measures training throughput on CPU or CUDA."""
