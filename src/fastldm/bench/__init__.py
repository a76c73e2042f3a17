"""Benchmarks that ship with the package (`fastldm bench ...`)."""
