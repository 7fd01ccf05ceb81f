"""Fixtures shared by the CPU test modules."""

from jit_fakes import cache_root  # noqa: F401  (a fixture: an isolated cache dir and a clean environment)
