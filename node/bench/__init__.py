"""Benchmarks behind `atoll bench ...`: each writes a table, JSON and a plot."""
