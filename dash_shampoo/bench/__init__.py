"""Benchmarks: solver study, optimizer-step timings, peers."""
