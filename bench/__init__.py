"""Benchmarks: each prints figures for an issue, with the command that made them."""
