"""XQuant / XQuant-CL (Tomar et al., arXiv:2508.10395): cache the layer input X, rematerialize K and V.

XQuant ("x"): each layer stores its post-RMSNorm input X ``[B, T, hidden]`` (the tensor entering
k_proj and v_proj), quantized per token (`formats.methods.xquant_format`), and at every step rebuilds
``K = RoPE(X_hat W_k^T + b_k)`` at the tokens' positions 0, 1, ... and ``V = X_hat W_v^T + b_v``.

XQuant-CL ("x-delta"): the pre-norm residual stream R_l entering decoder layer l changes little
from layer to layer, so layer l stores ``Q(R_l - R_hat_{l-1})`` with the accumulator
``R_hat_l = R_hat_{l-1} + deq(Q(R_l - R_hat_{l-1}))`` (R_hat_{-1} = 0: layer 0 stores its input),
and rebuilds ``X_hat_l = input_layernorm_l(R_hat_l)``. Quantizing against the reconstruction, not
the true R_{l-1}, keeps errors from adding up over depth. The accumulator is workspace rebuilt in
every forward pass (layer 0 resets it), not cache storage.

The hidden state is captured by forward pre-hooks (k_proj for "x", the decoder layer for
"x-delta"); the K/V that the attention module hands `update` are used only in the prefill, which
attends in full precision like every kvq method. Later steps attend over K/V rematerialized from the
stored codes for every token, the new ones included (XQuant keeps no full-precision window).
Each layer's codes live in a `cache.QuantizedStream` with one "head" of `hidden` channels, so the
bytes held equal ``fmt.bytes(T, kv_heads, head_dim, hidden_size=hidden)`` per sequence.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .cache import QuantizedStream
from .formats import KVFormat
from .hf_layer import KVQLayer

__all__ = ["XQuantLayer", "attach_xquant", "xquant_row"]


class _Accumulator:
    """XQuant-CL's running reconstruction R_hat ``[B, T, hidden]`` fp32 over the layers of one forward."""

    def __init__(self):
        self.r_hat: torch.Tensor | None = None


class XQuantLayer(KVQLayer):
    """One decoder layer's XQuant cache: quantized X (or X delta) codes; K/V rematerialized on read."""

    def __init__(self, fmt: KVFormat, attn: torch.nn.Module, rope, norm: torch.nn.Module | None, acc: _Accumulator):
        super().__init__(fmt)
        if fmt.cache_input not in ("x", "x-delta"):
            raise ValueError(f"{fmt.name} stores K/V, not X")
        self.attn_ref = weakref.ref(attn)  # the weights live in the model; the cache must not keep it alive
        self.x_rope = rope
        self.norm = norm
        self.acc = acc
        self.layer_idx = attn.layer_idx
        self.pending_x: torch.Tensor | None = None  # [B, t, hidden], set by the hook

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.layer = QuantizedStream(self.fmt.key, self.pending_x.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending_x is None:
            raise ValueError(f"{self.fmt.name} needs the layer input but the hook saw none (remove_hooks() called?)")
        first = not self.is_initialized
        if first:
            self.lazy_initialization(key_states, value_states)
        x, self.pending_x = self.pending_x.float(), None
        if self.fmt.cache_input == "x":
            self.layer.append(x[:, None])  # one "head": [B, 1, t, hidden]
            x_hat = self.layer.dequantized()[:, 0]  # [B, T, hidden]
        else:
            x_hat = self._append_delta(x)
        if first:
            return key_states, value_states  # the prefill attends in full precision
        return self.rematerialize(x_hat)

    def _append_delta(self, r: torch.Tensor) -> torch.Tensor:
        """XQuant-CL: store Q(R_l - R_hat_{l-1}) for the new tokens; return X_hat_l for all tokens."""
        total = self.layer.tokens + r.shape[1]
        if self.layer_idx == 0:  # a new forward pass: R_hat_{-1} = 0
            self.acc.r_hat = torch.zeros(r.shape[0], total, r.shape[2], device=r.device)
        prev = self.acc.r_hat
        if prev is None or prev.shape[1] != total:
            raise ValueError("XQuant-CL layers must be updated in order from layer 0 in every forward pass")
        self.layer.append((r - prev[:, -r.shape[1] :])[:, None])
        self.acc.r_hat = prev + self.layer.dequantized()[:, 0]
        return self.norm(self.acc.r_hat.to(self.norm.weight.dtype)).float()

    def rematerialize(self, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K ``[B, H_kv, T, D]`` (RoPE at positions 0..T-1) and V from X_hat ``[B, T, hidden]``."""
        attn = self.attn_ref()
        d = attn.head_dim
        w_dtype = attn.k_proj.weight.dtype
        xs = x_hat.to(w_dtype)
        k = F.linear(xs, attn.k_proj.weight, attn.k_proj.bias)  # [B, T, H_kv * D]
        v = F.linear(xs, attn.v_proj.weight, attn.v_proj.bias)
        b, t, _ = k.shape
        k = k.view(b, t, -1, d).transpose(1, 2)  # k: [B, H_kv, T, D]
        v = v.view(b, t, -1, d).transpose(1, 2)
        return self.x_rope.apply(k.float(), 0).to(self.dtype), v.to(self.dtype)


def attach_xquant(cache, fmt: KVFormat, model: torch.nn.Module, rope) -> list[XQuantLayer]:
    """Build one `XQuantLayer` per decoder layer of `model` and hook the hidden state into it.

    "x" hooks each attention's k_proj input; "x-delta" hooks each decoder layer's input (pre-norm).
    Models that normalise K after k_proj (k_norm) are refused: rematerialization would need it too.
    """
    decoders = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "input_layernorm")]
    acc = _Accumulator()
    layers = []
    for dec in decoders:
        attn = dec.self_attn
        if not all(hasattr(attn, a) for a in ("k_proj", "v_proj", "layer_idx", "head_dim")):
            raise ValueError(f"{type(attn).__name__} lacks k_proj / v_proj / layer_idx / head_dim; XQuant needs them")
        if hasattr(attn, "k_norm"):
            raise ValueError(f"{type(attn).__name__} normalises keys after k_proj; XQuant does not rebuild that")
        layers.append(XQuantLayer(fmt, attn, rope, dec.input_layernorm, acc))
    if [layer.layer_idx for layer in layers] != list(range(len(layers))) or not layers:
        raise ValueError(f"found decoder layers {[layer.layer_idx for layer in layers]}; expected 0..L-1")
    for dec, layer in zip(decoders, layers):
        ref = weakref.ref(layer)

        def stash(module, args, kwargs, ref=ref):
            target = ref()
            if target is not None:
                target.pending_x = (args[0] if args else kwargs["hidden_states"]).detach()

        if fmt.cache_input == "x":
            cache._hooks.append(dec.self_attn.k_proj.register_forward_pre_hook(stash, with_kwargs=True))
        else:
            cache._hooks.append(dec.register_forward_pre_hook(stash, with_kwargs=True))
    return layers


def xquant_row(fmt: KVFormat, layers: list[XQuantLayer]) -> list[XQuantLayer]:
    """XQuant layers for one row of a padded batch: the batched `layers`' modules, no hooks (the cache
    hands each row its slice of what the batched layers' hooks stash), and the row's own accumulator."""
    acc = _Accumulator()  # XQuant-CL's running reconstruction, one per row
    return [XQuantLayer(fmt, lay.attn_ref(), lay.x_rope, lay.norm, acc) for lay in layers]
