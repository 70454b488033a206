"""Profiling: throughput and peak memory over batch sizes, precisions and activation checkpointing; the knee.

Modules, one job each: ``analysis`` (pure math over numbers: the knee, the memory line, the timing budget).
"""
