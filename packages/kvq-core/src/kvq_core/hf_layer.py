"""One decoder layer of `hf_cache.KVQCache` behind transformers' layer API (`KVQLayer`), and RoPE at
given positions from the model's own rotary embedding (`_Rope`).

`KVQLayer` holds a `cache.StreamingLayer` (the torch reference path) or, on the kernel path, a
`kvq_kernels.hf_attention.KiviKernelStore`. The model-wide layers (`cache_xquant.XQuantLayer`,
`cache_minicache.MiniCacheLayer`) build on it; `hf_cache.KVQCache` picks the layers of a format.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from .attention import apply_rope, unapply_rope
from .cache import StreamingLayer
from .formats import KVFormat

__all__ = ["KVQLayer"]


class _Rope:
    """RoPE at given positions from the model's own rotary embedding module (any rope scaling)."""

    def __init__(self, rotary_emb: torch.nn.Module):
        self.rotary_emb = rotary_emb

    def cos_sin(self, x: torch.Tensor, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + length, device=x.device)[None]
        cos, sin = self.rotary_emb(x.float(), pos)  # [1, T, D]
        return cos[:, None].float(), sin[:, None].float()  # [1, 1, T, D]

    def apply(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        cos, sin = self.cos_sin(x, start, x.shape[2])
        return apply_rope(x, cos=cos, sin=sin)

    def unapply(self, x: torch.Tensor, start: int) -> torch.Tensor:
        cos, sin = self.cos_sin(x, start, x.shape[2])
        return unapply_rope(x, cos=cos, sin=sin)


def _find_rotary(model: torch.nn.Module) -> torch.nn.Module:
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            return module
    raise ValueError(f"{type(model).__name__} has no rotary embedding module; pre-RoPE methods need RoPE")


class KVQLayer(CacheLayerMixin):
    """One decoder layer's cache: a kvq-core `StreamingLayer` behind transformers' layer API."""

    is_sliding = False
    is_compileable = False

    def __init__(self, fmt: KVFormat, rope: _Rope | None = None, state: dict | None = None, kernels: bool = False):
        super().__init__()
        if fmt.pre_rope_keys and rope is None:
            raise ValueError(f"{fmt.name} stores pre-RoPE keys: pass model=... so the cache can apply RoPE")
        if fmt.key.tiered and rope is None:
            raise ValueError(f"{fmt.name} scores tokens by attention: pass model=... so the cache can read queries")
        self.fmt = fmt
        self.rope = rope if fmt.pre_rope_keys else None
        self.query_rope = rope if fmt.key.tiered else None
        self.state = state
        self.layer: StreamingLayer | None = None
        self.pending_queries: torch.Tensor | None = None  # q_proj output [B, t, H_q * D], set by the hook
        self.kernels = kernels  # store packed in kvq-kernels' layout and decode with its fused kernel
        self.store = None  # kvq_kernels.hf_attention.KiviKernelStore on the kernel path

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        if self.kernels:
            from kvq_kernels.hf_attention import KiviKernelStore, kivi_params

            b, h, _, d = key_states.shape
            self.store = KiviKernelStore(*kivi_params(self.fmt), b, h, d, key_states.device)
            self.is_initialized = True
            return
        self.layer = StreamingLayer(self.fmt, key_states.shape[-1])
        if self.state is not None:
            for stream, name in ((self.layer.k, "k"), (self.layer.v, "v")):
                if stream.codec is not None and name in self.state:
                    stream.codec.load_state_dict(self.state[name])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        if self.store is not None:
            return self._update_kernel(key_states, value_states, first)
        start = self.layer.tokens
        k_store = self.rope.unapply(key_states, start) if self.rope is not None else key_states
        self.layer.append(k_store, value_states, self._queries(key_states, start))
        if first:
            return key_states, value_states  # the prefill attends in full precision
        keys = self.layer.keys()
        if self.rope is not None:
            keys = self.rope.apply(keys, 0)
        return keys.to(self.dtype), self.layer.values(self.dtype)

    def _update_kernel(self, key_states: torch.Tensor, value_states: torch.Tensor, first: bool):
        """Kernel path: append through the fused quantize/append kernel; the prefill attends in full
        precision (torch SDPA), a decode step hands back its own token, marked for the fused decode."""
        if not first and key_states.shape[2] != 1:
            raise ValueError(
                f"the kvq kernel path decodes one token per step after the prefill, got {key_states.shape[2]}; "
                "use KVQCache(..., kernels=False) for chunked or speculative decoding"
            )
        self.store.append(key_states, value_states)
        if not first:
            self.store.mark(key_states)
        return key_states, value_states

    def _queries(self, key_states: torch.Tensor, start: int) -> torch.Tensor | None:
        """The step's post-RoPE queries ``[B, H_q, t, D]`` from the stashed q_proj output (tiered formats)."""
        if self.query_rope is None:
            return None
        q, self.pending_queries = self.pending_queries, None
        if q is None:
            raise ValueError(f"{self.fmt.name} needs queries but the q_proj hook saw none (was remove_hooks() called?)")
        b, t, _ = q.shape
        d = key_states.shape[-1]
        q = q.view(b, t, -1, d).transpose(1, 2)
        return self.query_rope.apply(q, start)

    def get_seq_length(self) -> int:
        if self.store is not None:
            return self.store.tokens
        return 0 if self.layer is None else self.layer.tokens

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.store is not None:
            return self.store.tokens + query_length, 0
        if self.layer is None:  # the prefill attends to its own full-precision tokens
            return query_length, 0
        seen = self.layer.tokens + query_length
        held = self.fmt.stored_tokens(seen)  # < seen only with eviction; evicted tokens precede the window
        return held, seen - held

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.layer = None
        self.store = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVQCache does not support beam search (it would reorder quantized history)")

    def offload(self):
        raise NotImplementedError("KVQCache does not support offloading")

    @property
    def nbytes(self) -> int:
        """Bytes the format stores for the tokens held (the kernel path preallocates more capacity:
        `store.allocated_bytes`)."""
        if self.store is not None:
            s = self.store
            return s.batch * self.fmt.bytes(s.tokens, s.kv_heads, s.head_dim)
        return 0 if self.layer is None else self.layer.nbytes
