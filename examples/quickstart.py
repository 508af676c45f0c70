"""Quantize one layer's K/V with KIVI-2 and check the bytes held against the format's count."""

import torch

from kvq_core import StreamingLayer, get_format

torch.manual_seed(0)
fmt = get_format("kivi", 2)  # per-channel keys / per-token values, G=32, fp16 residual of 128
layer = StreamingLayer(fmt, head_dim=128)
k, v = torch.randn(2, 8, 1000, 128), torch.randn(2, 8, 1000, 128)  # [batch, kv_heads, tokens, head_dim]
layer.append(k[:, :, :997], v[:, :, :997])  # prefill
for t in range(997, 1000):  # three decode steps
    layer.append(k[:, :, t : t + 1], v[:, :, t : t + 1])

bd = fmt.breakdown(1000, kv_heads=8, head_dim=128)
print(f"format: {fmt.name}, {fmt.avg_bits(1000, 8, 128):.3f} bits/element at 1000 tokens")
print(f"predicted bytes: {2 * bd.per_sequence + bd.shared:,}  held bytes: {layer.nbytes:,}")
print(f"key relative error: {float((layer.keys() - k).norm() / k.norm()):.3f}")
