"""A transformers `Cache` whose layers are kvq-core streaming layers: drop-in for `model.generate`.

    >>> from kvq_core.hf_cache import KVQCache
    >>> cache = KVQCache("kivi", bits=2, model=model)
    >>> model.generate(**inputs, past_key_values=cache, max_new_tokens=32)

Semantics (as KIVI and transformers' QuantizedCache): the prefill attends in full precision and is
then stored quantized; every later step attends over the dequantized history plus its own tokens as
the method stores them (e.g. in the full-precision residual window). History is never re-quantized.

Pre-RoPE methods (`fmt.pre_rope_keys`, KVQuant): the model hands the cache post-RoPE keys; the cache
un-rotates them with the inverse rotation at their positions (RoPE is orthogonal, so this is exact up
to fp32 rounding, ~1e-7 relative), quantizes the pre-RoPE keys, and re-applies RoPE after
dequantization. Positions are the indices of a sequence's own tokens (0, 1, ...; padding not counted).

Left-padded batches (`model.generate(ids, attention_mask=mask, ...)` with a left-padding tokenizer):
the cache reads each forward's `attention_mask` through a forward pre-hook on `model` (or
`KVQCache.set_attention_mask`). When a row has padding, the cache holds one independent set of layers
per batch row with only that row's real tokens, so padding never enters scales, groups, windows,
outlier thresholds, token scores, eviction or state fitted on the fly, and each row stores what it
would store alone. `update` hands attention the rows right-aligned in one ``[B, H_kv, T, D]`` tensor,
padded slots zero and hidden by the model's padding mask. Right padding and masks with holes are
refused. An unpadded batch (no mask, or all ones) keeps one set of batched layers.

Methods that pick tokens by attention score (ZipCache, MiKV, heavy-hitter eviction: formats with
`StreamFormat.tiers`, `KVFormat.layer` "tiered") need each step's queries. The cache registers a forward hook on every
attention module's `q_proj` that stashes its output; `update` reshapes it to ``[B, H_q, t, D]``,
applies RoPE at the new tokens' positions (models that normalise q after q_proj, e.g. q_norm, are
refused) and passes it to the layer. `KVQCache.remove_hooks()` detaches the hooks. With eviction a
layer holds fewer tokens than it has seen; `get_mask_sizes` reports the held length and, as the
offset, the number evicted, so the causal mask stays right for the new tokens.
The layers of a format follow from `KVFormat.layer`: one `hf_layer.KVQLayer` per decoder layer, or
the model-wide layers of `MODEL_LAYERS`. XQuant / XQuant-CL (`fmt.cache_input` "x" / "x-delta", `cache_xquant`) store each layer's input
hidden state instead of K/V, captured by forward pre-hooks (k_proj's input, or the decoder layer's
for the cross-layer deltas), and rematerialize K, V from the model's own k_proj / v_proj weights at
every step. MiniCache (`fmt.merge_depth_fraction`, `cache_minicache`) holds adjacent deep layers as
merged pairs; `KVQCache.retained` reports the unmerged tokens each pair holds, and `nbytes` equals
``batch * fmt.model_bytes(T, kv_heads, head_dim, num_layers, retained=cache.retained)``.
This module is the torch reference path; it imports transformers when it is imported.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache_minicache import minicache_layers, minicache_row
from .cache_xquant import attach_xquant, xquant_row
from .calibration_file import load_calibration, save_calibration
from .formats import KVFormat, get_format
from .hf_layer import KVQLayer, _find_rotary, _Rope

__all__ = [
    "KVQCache",
    "KVQLayer",
    "left_padding",
    "load_calibration",
    "save_calibration",
]  # the file functions live in calibration_file

# Inputs that hooks stash on a layer before its update, each [B, t, ...]; in a padded batch every
# row's layer gets its own slice
_HOOKED_INPUTS = ("pending_queries", "pending_x")


def _xquant_layers(cache: KVQCache, fmt: KVFormat, model: torch.nn.Module) -> list[CacheLayerMixin]:
    return attach_xquant(cache, fmt, model, _Rope(_find_rotary(model)))


def _minicache_layers(cache: KVQCache, fmt: KVFormat, model: torch.nn.Module) -> list[CacheLayerMixin]:
    return minicache_layers(fmt, model.config.get_text_config(decoder=True).num_hidden_layers)


#: the layers of the formats that are not one `KVQLayer` per decoder layer, by `KVFormat.layer`:
#: (cache, fmt, model) -> the model's layers, with any hooks registered on `cache`.
MODEL_LAYERS = {"xquant": _xquant_layers, "minicache": _minicache_layers}

#: the same formats' layers for one row of a padded batch: (fmt, the batched layers) -> the row's layers.
ROW_LAYERS = {"xquant": xquant_row, "minicache": minicache_row}


class KVQCache(Cache):
    """A transformers `Cache` storing K/V in a kvq-core format.

    method, bits:  a kvq-core method and width (`kvq_core.formats.METHODS`), or `fmt=` a `KVFormat`.
    model:         the causal LM; needed for pre-RoPE methods (its rotary embedding) and to size layers.
    calibration:   a dict or a path saved by `save_calibration` with per-layer codec state.
    kernels:       "auto" (default): kvq-kernels' fused quantize/append and decode-attention kernels when
                   the format has them (KIVI, 2/3/4/8 bits), `model` is given and on a CUDA device, and
                   kvq_kernels imports; else the torch reference path. True: the kernels or a clear error
                   (on CPU they run only under TRITON_INTERPRET=1). False: the torch path. The kernel path
                   switches `model` to the "kvq" attention function (`kvq_kernels.hf_attention.enable`),
                   which runs torch SDPA for everything but this cache's decode steps. A left-padded
                   batch runs the torch path under "auto"; kernels=True refuses it.

    Padding: with `model`, a forward pre-hook reads the `attention_mask` of every forward that uses this
    cache (`set_attention_mask`). A mask with leading zeros (left padding) switches the cache to one set
    of layers per row (`rows`) holding only that row's tokens; see the module docstring. Without `model`,
    call `set_attention_mask` before each forward of a padded batch.
    """

    def __init__(
        self,
        method: str | None = None,
        bits=None,
        *,
        fmt: KVFormat | None = None,
        model: torch.nn.Module | None = None,
        calibration: dict | str | Path | None = None,
        kernels: bool | str = "auto",
    ):
        if fmt is None:
            if method is None:
                raise ValueError("give a method name (e.g. 'kivi') or fmt=KVFormat")
            fmt = get_format(method, bits)
        if calibration is not None and model is None:
            raise ValueError("calibration= needs model=...: its state is per model layer, and the cache builds one "
                             "layer per model layer to load it")  # fmt: skip
        self.kernels = _use_kernels(kernels, fmt, model)
        state = load_calibration(calibration, model) if calibration is not None else {}
        self.fmt = fmt
        needs_rope = fmt.pre_rope_keys or fmt.key.tiered
        rope = _Rope(_find_rotary(model)) if (needs_rope and model is not None) else None
        if fmt.pre_rope_keys and rope is None:
            raise ValueError(f"{fmt.name} stores pre-RoPE keys: pass model=... so the cache can apply RoPE")
        if fmt.key.tiered and rope is None:
            raise ValueError(f"{fmt.name} scores tokens by attention: pass model=... so the cache can read queries")
        make = functools.partial(KVQLayer, fmt, rope, kernels=self.kernels)
        self._row_layer = functools.partial(KVQLayer, fmt, rope, kernels=False)  # a padded batch's rows
        self._state = state
        self._kernels_required = kernels is True
        self.rows: list[list[CacheLayerMixin]] | None = None  # per-row layers once a batch is padded
        self._row_seen: dict[int, int] = {}  # positions (padding included) each layer index has taken
        self._lead: list[int] = []  # leading padded positions of each row, from the latest mask
        self._positions = 0  # positions the latest mask covers
        self._hooks: list = []
        if fmt.layer in MODEL_LAYERS:
            if model is None:
                raise ValueError(f"{fmt.name} needs the model: pass model=... (its weights or its layer count)")
            super().__init__(layers=MODEL_LAYERS[fmt.layer](self, fmt, model))
        elif model is not None:
            n = model.config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[make(state.get(i)) for i in range(n)])
            if fmt.key.tiered:
                self._hook_queries(model)
        else:
            super().__init__(layer_class_to_replicate=make)
        if model is not None:
            self._hook_mask(model)

    def _new_row(self) -> list[CacheLayerMixin]:
        """A fresh set of torch-path layers for one row of a padded batch, built like the batched ones but
        without hooks: `update` hands each row layer its slice of what the hooks stash on `self.layers`."""
        if self.fmt.layer in ROW_LAYERS:
            return ROW_LAYERS[self.fmt.layer](self.fmt, self.layers)
        return [self._row_layer(self._state.get(i)) for i in range(len(self.layers))]

    def _hook_mask(self, model: torch.nn.Module) -> None:
        """A forward pre-hook on `model` that passes this cache the forward's attention_mask whenever the
        forward's past_key_values is this cache (other caches on the same model are left alone)."""
        names = list(inspect.signature(model.forward).parameters)  # to read positional arguments
        ref = weakref.ref(self)  # the hook must not keep a finished cache alive

        def read_mask(module, args, kwargs):
            cache = ref()
            if cache is None:  # the cache is gone: so is the need for its hook on a model that lives on
                handle.remove()
                return
            given = {**dict(zip(names, args)), **kwargs}
            if given.get("past_key_values") is cache:
                cache.set_attention_mask(given.get("attention_mask"))

        handle = model.register_forward_pre_hook(read_mask, with_kwargs=True)
        self._hooks.append(handle)

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Give the cache the attention mask of the next forward (the hook installed with `model=` does this).

        attention_mask: ``[B, positions]``, 1 (or True) for a token, 0 for padding, covering the cached
        positions and the forward's new tokens (as transformers takes it); None: no padding. Each row
        must be zeros then ones (left padding), padding must show from the batch's first forward, and
        cached positions keep their value. The first padded mask switches the cache to per-row layers.
        """
        if attention_mask is None:
            if self.rows is not None:
                raise ValueError("this KVQCache holds a left-padded batch: pass its attention_mask to every forward")
            return
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"KVQCache reads a 2-D attention_mask [batch, positions], got {shape}")
        lead = left_padding(attention_mask)
        seen, positions = self.get_seq_length(), attention_mask.shape[1]
        if positions <= seen:
            raise ValueError(f"attention_mask covers {positions} positions; the cache already holds {seen}")
        if self.rows is None:
            if not any(lead):
                return
            if seen:
                raise ValueError(
                    "attention_mask marks cached positions as padding; give a batch's padding from its first forward"
                )
            if self._kernels_required:
                raise ValueError(
                    "kernels=True: the kvq kernel path takes unpadded batches only; "
                    "use kernels='auto' or False for a left-padded batch"
                )
            self.rows = [self._new_row() for _ in lead]
        elif len(lead) != len(self.rows):
            raise ValueError(f"attention_mask has {len(lead)} rows; the cache holds a batch of {len(self.rows)}")
        else:
            for i, (old, new) in enumerate(zip(self._lead, lead)):
                settled = old < seen  # the row has tokens cached, so its padding is fixed
                if (settled and new != old) or (not settled and new < seen):
                    raise ValueError(f"attention_mask row {i} changes which cached positions are padding")
        self._lead, self._positions = lead, positions

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.rows is None:
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)
        return self._update_rows(key_states, value_states, layer_idx, *args, **kwargs)

    def _update_rows(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Padded batch: each row's real tokens go to that row's layer; the rows' K/V come back right-aligned
        in ``[B, H_kv, kv_length, D]`` (`get_mask_sizes`), the padded slots before them zero."""
        b, h, t, _ = key_states.shape
        seen = self._row_seen.get(layer_idx, 0)
        if b != len(self.rows):
            raise ValueError(f"the cache holds a batch of {len(self.rows)} rows; this forward has {b}")
        if seen + t != self._positions:
            raise ValueError(
                f"layer {layer_idx} holds {seen} positions and takes {t}, but the attention_mask covers "
                f"{self._positions}: give each forward's mask (set_attention_mask) before the forward"
            )
        hooked = {}
        if layer_idx < len(self.layers):
            template = self.layers[layer_idx]
            for name in _HOOKED_INPUTS:
                if getattr(template, name, None) is not None:
                    hooked[name] = getattr(template, name)
                    setattr(template, name, None)
        kv_length, kv_offset = self.get_mask_sizes(t, layer_idx)
        keys = key_states.new_zeros(b, h, kv_length, key_states.shape[-1])  # k: [B, H_kv, kv_length, D]
        values = value_states.new_zeros(b, h, kv_length, value_states.shape[-1])
        for i, row in enumerate(self.rows):
            while len(row) <= layer_idx:  # a cache built without model= grows its layers on first use
                row.append(self._row_layer())
            first = min(max(self._lead[i] - seen, 0), t)  # the row's first real token in this block
            hidden = max(0, min(self._lead[i], seen + t) - kv_offset)  # its leading slots the mask hides
            if first == t:
                continue  # still all padding
            layer = row[layer_idx]
            for name, x in hooked.items():
                setattr(layer, name, x[i : i + 1, first:])
            k, v = layer.update(key_states[i : i + 1, :, first:], value_states[i : i + 1, :, first:], *args, **kwargs)
            n = k.shape[2]
            if n + hidden != kv_length:
                raise ValueError(
                    f"{self.fmt.name}: row {i} of layer {layer_idx} holds {n} tokens after {hidden} masked "
                    f"positions, but the mask spans {kv_length}; this format cannot hold this padded batch"
                )
            keys[i, :, kv_length - n :] = k[0]
            values[i, :, kv_length - n :] = v[0]
        self._row_seen[layer_idx] = seen + t
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.rows is None:
            return super().get_seq_length(layer_idx)
        return self._row_seen.get(layer_idx, 0)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if self.rows is None:
            return super().get_mask_sizes(query_length, layer_idx)
        seen = self._row_seen.get(layer_idx, 0)
        if seen == 0:  # the prefill attends to its own full-precision tokens
            return query_length, 0
        held = self.fmt.stored_tokens(seen + query_length)  # < seen only with eviction, as in KVQLayer
        return held, seen + query_length - held

    def reset(self) -> None:
        super().reset()
        self.rows, self._row_seen, self._lead, self._positions = None, {}, [], 0

    @property
    def retained(self) -> dict[tuple[int, int], tuple[int, int]]:
        """MiniCache: unmerged tokens held per merged pair, {(l, l+1): (n_k, n_v)}; {} for other methods."""
        if self.rows is not None:
            raise ValueError("a left-padded batch is held row by row, each row retaining its own tokens: see rows")
        return {lay.pair.layers: lay.pair.retained for lay in self.layers if getattr(lay, "side", None) == 0}

    def _hook_queries(self, model: torch.nn.Module) -> None:
        """Forward hooks on each attention module's q_proj that stash its output in the matching layer."""
        attns = [m for m in model.modules() if hasattr(m, "q_proj") and hasattr(m, "layer_idx")]
        if len(attns) != len(self.layers):
            raise ValueError(f"found {len(attns)} attention modules with q_proj for {len(self.layers)} layers")
        for attn in attns:
            if hasattr(attn, "q_norm"):
                raise ValueError(
                    f"{type(attn).__name__} normalises queries after q_proj; token scoring cannot read them"
                )
            ref = weakref.ref(self.layers[attn.layer_idx])  # the hook must not keep a finished cache alive

            def stash(module, args, out, ref=ref):
                layer = ref()
                if layer is not None:
                    layer.pending_queries = out.detach()

            self._hooks.append(attn.q_proj.register_forward_hook(stash))

    def remove_hooks(self) -> None:
        """Detach the hooks: attention-mask, q_proj (tiered formats) or XQuant's hidden-state hooks; the
        cache cannot take more tokens after this (a padded batch, tiered formats and XQuant need them)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (equals the format's count, layers x batch; a padded
        batch: the sum of each row's count for its own tokens)."""
        if self.rows is not None:
            return sum(layer.nbytes for row in self.rows for layer in row)
        return sum(layer.nbytes for layer in self.layers)


def left_padding(attention_mask: torch.Tensor) -> list[int]:
    """Leading padded positions of each row of a 2-D mask (1 / True = token, 0 = padding).

    >>> left_padding(torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    [2, 0]

    Raises on values other than 0 and 1 and on padding after a token (right padding, holes).
    """
    m = attention_mask
    if m.dtype != torch.bool:
        if ((m != 0) & (m != 1)).any():
            raise ValueError("attention_mask must hold 0 (padding) and 1 (token)")
        m = m != 0
    lead = (~m).long().cumprod(1).sum(1)  # zeros before each row's first token
    bad = torch.nonzero(lead + m.sum(1) != m.shape[1]).flatten()
    if bad.numel():
        raise ValueError(
            f"attention_mask row {int(bad[0])} has padding after a token (right padding or a hole); "
            "KVQCache takes left padding only"
        )
    return lead.tolist()


def _use_kernels(kernels: bool | str, fmt: KVFormat, model: torch.nn.Module | None) -> bool:
    """Resolve KVQCache's `kernels` argument (see its docstring); switches `model` to the "kvq" attention."""
    if kernels not in (True, False, "auto"):
        raise ValueError(f"kernels must be True, False or 'auto', got {kernels!r}")
    if kernels is False:
        return False
    want = kernels is True
    try:
        from kvq_kernels import interpreting
        from kvq_kernels.hf_attention import enable, kivi_params
    except ImportError as e:  # kvq-kernels (or triton) not installed
        if want:
            raise ValueError(f"kernels=True needs kvq-kernels and triton: {e}") from None
        return False
    reason = None
    if kivi_params(fmt) is None:
        reason = f"{fmt.name} has no fused kernel (KIVI formats with 2/3/4/8 bits, group a power of two >= 16 do)"
    elif model is None:
        reason = "pass model=... so the cache can switch its attention to the fused kernel"
    else:
        device = next(model.parameters()).device
        if device.type != "cuda" and not (want and interpreting()):  # "auto" never picks the slow interpreter
            reason = f"the model is on {device}; the kernels run on CUDA (or, with kernels=True, on CPU under TRITON_INTERPRET=1)"
    if reason:
        if want:
            raise ValueError(f"kernels=True: {reason}")
        return False
    enable(model)
    return True
