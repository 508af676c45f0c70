"""kvq-core: KV-cache quantizers with exact storage formats.

`kvq_core.formats` is pure data and imports without torch; the quantizers (torch) load on first use.
"""

from __future__ import annotations

import importlib

from .formats import METHODS, KVFormat, StreamFormat, get_format

__version__ = "0.1.0"

_LAZY = {
    "StreamingLayer": "kvq_core.cache",
    "QuantizedStream": "kvq_core.cache",
    "KVQCache": "kvq_core.hf_cache",
}

__all__ = ["METHODS", "KVFormat", "StreamFormat", "get_format", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvq_core' has no attribute {name!r}")
