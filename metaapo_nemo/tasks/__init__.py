"""Bundled synthetic tasks with a known (gold) reward, used by benchmarks and tests."""
