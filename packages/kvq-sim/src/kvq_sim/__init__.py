"""kvq-sim: memory, bandwidth and decode-latency simulator for quantized KV caches (imports no torch)."""

__version__ = "0.1.0"
