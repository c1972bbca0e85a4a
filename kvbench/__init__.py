"""kvbench: a benchmarking harness for KV-cache eviction in LLM inference."""

__version__ = "0.1.0"
