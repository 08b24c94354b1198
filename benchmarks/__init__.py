"""Benchmarks of streamstore, run from the repository root with streamstore installed.

Each module is a script: ``python -m benchmarks.counting --help``. Every run
writes its figures and the machine's description to
``benchmarks/results/<name>-<UTC time>.json`` (:mod:`benchmarks.record`).
"""
