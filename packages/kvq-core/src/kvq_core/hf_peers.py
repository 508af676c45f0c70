"""transformers' own KV caches as named factories: the peers kvq is compared with at equal bits.

Names (looked up exactly):
    full                  DynamicCache: K/V kept in the model's dtype (float32 for SmolLM2 from GGUF)
    quanto-2, quanto-4    QuantizedCache("quanto"): optimum-quanto int2/int4
    hqq-2, hqq-3, hqq-4   QuantizedCache("hqq"): HQQ 2/3/4-bit
    fp8                   QuantizedCache("fp8"): float8 e4m3, one scale per layer tensor, frozen at prefill

The group-wise backends use transformers' defaults (5.23): q_group_size 64, residual_length 128 tokens
kept in full precision, axis_key = axis_value = 0. Each backend's first `update` (the prefill) attends
in full precision and then quantizes; later steps dequantize the whole quantized history every step and
re-quantize it whenever the residual fills. quanto needs `optimum-quanto` (it compiles a C++ extension
on first use, ~30 s), HQQ needs `hqq`.

`held_bits_per_element` measures what a cache actually holds: the bytes of every tensor in its layers
(quantized codes, scales, zeros/shifts, the full-precision residual), per cached K/V element.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["PEER_CACHES", "peer_cache_factory", "held_bits_per_element"]

# name -> (backend, nbits); backend None is the full-precision DynamicCache
PEER_CACHES: dict[str, tuple[str | None, int | None]] = {
    "full": (None, None),
    "quanto-2": ("quanto", 2),
    "quanto-4": ("quanto", 4),
    "hqq-2": ("hqq", 2),
    "hqq-3": ("hqq", 3),
    "hqq-4": ("hqq", 4),
    "fp8": ("fp8", None),
}

_PIP = {"quanto": "optimum-quanto", "hqq": "hqq"}


def _check_backend(backend: str) -> None:
    from transformers.utils import is_hqq_available, is_optimum_quanto_available

    available = {"quanto": is_optimum_quanto_available, "hqq": is_hqq_available}.get(backend)
    if available is not None and not available():
        raise ImportError(f"the {backend} KV cache needs `pip install {_PIP[backend]}`")


def peer_cache_factory(name: str, config) -> Callable[[], object]:
    """A callable returning a fresh transformers cache for peer `name` (see module docstring) and model `config`."""
    if name not in PEER_CACHES:
        raise ValueError(f"unknown peer cache {name!r}; valid: {', '.join(PEER_CACHES)}")
    from transformers import DynamicCache, QuantizedCache

    backend, nbits = PEER_CACHES[name]
    if backend is None:
        return lambda: DynamicCache(config=config)
    _check_backend(backend)
    if nbits is None:
        return lambda: QuantizedCache(backend, config)
    return lambda: QuantizedCache(backend, config, nbits=nbits)


_HELD_ATTRS = ("keys", "values", "_quantized_keys", "_quantized_values")


def _tensor_bytes(obj) -> int:
    """Bytes of every tensor in obj: a tensor (tensor subclasses through their inner tensors), tuple, list or dict."""
    import torch

    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):  # e.g. quanto's QBitsTensor
            names, _ = obj.__tensor_flatten__()
            return sum(_tensor_bytes(getattr(obj, name)) for name in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(x) for x in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(x) for x in obj.values())
    return 0


def held_bits_per_element(cache, config, batch: int = 1) -> float:
    """Bits the cache's tensors occupy per cached K/V element (K and V together, all layers).

    Elements: 2 (K and V) x batch x kv_heads x head_dim x tokens seen by each layer. Example: a float32
    DynamicCache holds 32.0 bits per element; quanto int4 with group 64 holds 4 bits of codes plus
    its per-group scale and shift, plus the residual tokens still in full precision.
    """
    text = config.get_text_config(decoder=True)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    held, elements = 0, 0
    for layer in cache.layers:
        tokens = getattr(layer, "cumulative_length", None)
        if tokens is None:
            tokens = layer.get_seq_length()
        held += sum(_tensor_bytes(getattr(layer, name, None)) for name in _HELD_ATTRS)
        elements += 2 * batch * kv_heads * head_dim * tokens
    if elements == 0:
        raise ValueError("the cache holds no tokens yet")
    return 8 * held / elements
