"""The pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``); see conftest.py."""
