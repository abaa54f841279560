"""Benchmarks run through the engine (`dsv4 bench ...`)."""
