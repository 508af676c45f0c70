"""kvq-kernels: Triton kernels for quantize/append and fused dequantize + decode attention."""

__version__ = "0.1.0"
