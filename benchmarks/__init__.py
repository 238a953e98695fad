"""Benchmark suite: orchestra_nb against its peers on the workloads of performance.md.

Run ``python -m benchmarks --help`` from the repository root.
"""
