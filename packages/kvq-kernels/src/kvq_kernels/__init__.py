"""kvq-kernels: Triton kernels for quantize/append and fused dequantize + decode attention."""

from ._launch import interpreting

__version__ = "0.1.0"

__all__ = ["interpreting"]
