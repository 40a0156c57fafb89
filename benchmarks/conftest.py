"""pytest wiring for the benchmarks; the helpers live in ``_bench.py`` (imported by the test files)."""

from _bench import memory_floor_gbps  # noqa: F401  (the session fixture)
