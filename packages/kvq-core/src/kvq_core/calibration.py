"""Calibration of per-layer quantizer state on real text: codebooks, channel order, clip, key ranges.

One forward (and, for Fisher weights, backward) pass of the model over calibration tokens records
every layer's K and V as the cache would receive them. KVQuant's nuq codebooks are k-means weighted
by the diagonal Fisher information, i.e. the squared gradient of the language-model loss with
respect to each K/V activation (arXiv:2401.18079, section 3.3); SKVQ's channel order and clip ratio
come from the same activations. Pre-RoPE formats see pre-RoPE keys (and gradients): both are
un-rotated with the inverse RoPE rotation, which is orthogonal, so the Fisher weights carry over.

The result is a dict {layer: {"k": state, "v": state}} that `hf_cache.save_calibration` writes and
`KVQCache(..., calibration=path)` loads.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache import StreamingLayer
from .formats import KVFormat, get_format
from .hf_cache import _find_rotary, _Rope

__all__ = ["record_kv", "calibrate"]


class _RecordingLayer(CacheLayerMixin):
    """Returns K/V unchanged (attention as without a cache) and keeps references to them."""

    is_sliding = False

    def __init__(self):
        super().__init__()
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if self.k is not None:
            raise ValueError("calibration records one forward pass; got a second update")
        self.is_initialized = True
        if key_states.requires_grad:
            key_states.retain_grad()
            value_states.retain_grad()
        self.k, self.v = key_states, value_states
        return key_states, value_states

    def get_seq_length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1


def record_kv(model: torch.nn.Module, input_ids: torch.Tensor, fisher: bool = True):
    """Per-layer (K, V, dLoss/dK, dLoss/dV) of one pass over `input_ids` [B, T]; grads None if not fisher.

    K is post-RoPE, as transformers passes it to a cache. Shapes: [B, H_kv, T, D].
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"calibration needs input_ids [batch, tokens >= 2], got shape {tuple(input_ids.shape)}")
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = Cache(layers=[_RecordingLayer() for _ in range(n_layers)])
    was_training = model.training
    model.eval()
    with torch.set_grad_enabled(fisher):
        out = model(input_ids, past_key_values=cache, use_cache=True, labels=input_ids if fisher else None)
        if fisher:
            model.zero_grad(set_to_none=True)
            out.loss.backward()
    model.train(was_training)
    records = []
    for layer in cache.layers:
        kg = layer.k.grad if fisher else None
        vg = layer.v.grad if fisher else None
        records.append((layer.k.detach(), layer.v.detach(), kg, vg))
    if fisher:
        model.zero_grad(set_to_none=True)
    return records


def calibrate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    method: str | None = None,
    bits=None,
    *,
    fmt: KVFormat | None = None,
    fisher: bool = True,
) -> dict:
    """Calibrated codec state per layer for a method, from one pass over calibration `input_ids`."""
    fmt = fmt or get_format(method, bits)
    rope = _Rope(_find_rotary(model)) if fmt.pre_rope_keys else None
    state = {}
    for i, (k, v, kg, vg) in enumerate(record_kv(model, input_ids, fisher)):
        if rope is not None:  # gradients rotate like the keys (the rotation is orthogonal)
            k = rope.unapply(k, 0)
            kg = rope.unapply(kg, 0) if kg is not None else None
        layer = StreamingLayer(fmt, k.shape[-1])
        fisher_k = kg.pow(2) if kg is not None else None  # diagonal Fisher information
        fisher_v = vg.pow(2) if vg is not None else None
        layer.calibrate(k.float(), v.float(), fisher_k, fisher_v)
        state[i] = {
            name: stream.codec.state_dict()
            for name, stream in (("k", layer.k), ("v", layer.v))
            if stream.codec is not None
        }
    return state
