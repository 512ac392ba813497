"""Benchmark suite: drain rate, latency, memory, write and consume cost of every relay source."""
