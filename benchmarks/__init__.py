"""Benchmarks: Mneme against Avalanche's own strategies and a plain PyTorch loop.

``python -m benchmarks.vs_avalanche --help`` (results in ``benchmarks/RESULTS.md``).
"""
