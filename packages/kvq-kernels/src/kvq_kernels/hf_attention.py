"""The fused-kernel path behind kvq_core's transformers cache: a growing packed KIVI store per layer and
a transformers attention function ("kvq") that decodes over it with `decode_kivi`.

`kvq_core.hf_cache.KVQCache(..., kernels=...)` uses this for KIVI formats (uniform 2/3/4/8 bits) on a
CUDA device (or on CPU tensors under TRITON_INTERPRET=1, which is how CI tests it):

- every new token goes through `append_kivi` (quantize-and-flush in Triton; the store keeps the lengths on
  the host, so appending does not read them back from the GPU) and nothing already stored is touched
  again: no step dequantizes or re-quantizes the history;
- the prefill attends in full precision (as the torch path and KIVI), through torch SDPA;
- each decode step's attention is one `decode_kivi` launch (+ its combine) over the packed codes, the fp16
  residual ring and the new token, in the layer's own store. The layer hands transformers the step's own
  one-token K/V and marks it (`KiviKernelStore.mark`); the "kvq" attention function finds the mark and runs the kernel.
  Anything unmarked (prefill, other caches, other layers) goes to torch SDPA unchanged, so a model switched
  to "kvq" (`enable`) still runs with any other cache.
Inputs must be unpadded (every sequence of the batch equally long), as on the torch path.
"""

from __future__ import annotations

import math

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .decode_kivi import decode_kivi
from .kivi_layout import KiviCache, allocate
from .quantize_append import append_kivi

ATTENTION_NAME = "kvq"
_PENDING: dict[int, tuple[torch.Tensor, KiviKernelStore]] = {}
#: The last attention mask found to hide no token. transformers passes one mask tensor to every layer of a
#: step, so the check (a device-to-host read) runs once a step instead of once a layer.
_UNPADDED_MASK: list[torch.Tensor] = []


def kivi_params(fmt) -> tuple[int, int, int] | None:
    """(bits, group_size, residual_tokens) when `fmt` is a KIVI format the kernels store exactly, else None."""
    from kvq_core.formats import kivi_format

    g, r = fmt.extra.get("group_size"), fmt.extra.get("residual_tokens")
    bits = fmt.key.bits
    if g is None or r is None or bits not in (2, 3, 4, 8) or fmt.value.bits != bits:
        return None
    if g < 16 or g & (g - 1) or r < g or r % g:
        return None
    return (int(bits), g, r) if fmt == kivi_format(int(bits), g, r) else None


class KiviKernelStore:
    """One layer's packed KIVI cache for a batch, grown by doubling; token count tracked on the host."""

    def __init__(self, bits: int, group_size: int, residual_tokens: int, batch: int, kv_heads: int, head_dim: int,
                 device: torch.device, capacity: int = 0):  # fmt: skip
        if head_dim < 16 or head_dim & (head_dim - 1):
            raise ValueError(f"the kvq kernels need head_dim a power of two >= 16, got {head_dim}")
        self.bits, self.group, self.residual = bits, group_size, residual_tokens
        self.batch, self.kv_heads, self.head_dim, self.device = batch, kv_heads, head_dim, device
        self.tokens = 0
        self.cache: KiviCache = self._allocate(max(capacity, 2 * residual_tokens))
        # 0, or NaN once a decode step stored a non-finite key or value; `attend` adds it to its output
        self.nonfinite = torch.zeros((), dtype=torch.float32, device=device)

    def _allocate(self, capacity: int) -> KiviCache:
        return allocate(self.batch, self.kv_heads, self.head_dim, capacity, self.bits, self.group, self.residual,
                        0, device=self.device)  # fmt: skip

    def _grow(self, need: int) -> None:
        old = self.cache
        new = self._allocate(max(need, 2 * old.capacity))
        for name in ("k_codes", "k_zero", "k_scale", "v_codes", "v_scale", "v_zero"):
            src, dst = getattr(old, name), getattr(new, name)
            rows = src.shape[2]
            dst[:, :, :rows].copy_(src)
        for name in ("k_res", "v_win", "lens"):
            getattr(new, name).copy_(getattr(old, name))
        self.cache = new

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new tokens k, v [B, H_kv, n, D] (any float dtype; kept as fp16 like the format's residual,
        so a value beyond fp16's +-65504 is stored as Inf).

        NaN/Inf in a prefill block (n > 1, or the first append) raise a ValueError (append_kivi's
        check_values: one device sync per layer per prompt). A decode step is not checked on the host (a
        sync per layer per token would stall the GPU queue): a non-finite key or value there sets
        `nonfinite` on the device (about six tiny kernels, no sync) and every later `attend` of this layer
        returns NaN, never attention over a silently finite code."""
        n = k.shape[2]
        if self.tokens + n > self.cache.capacity:
            self._grow(self.tokens + n)
        k16, v16 = k.to(torch.float16).contiguous(), v.to(torch.float16).contiguous()
        prefill = n > 1 or self.tokens == 0
        append_kivi(self.cache, k16, v16, lens_host=[self.tokens] * self.batch, check_values=prefill)
        if not prefill:
            bad = ~(torch.isfinite(k16).all() & torch.isfinite(v16).all())
            self.nonfinite = torch.where(bad, float("nan"), self.nonfinite)
        self.tokens += n

    def attend(self, q: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Decode attention of q [B, H_q, D] over everything stored; [B, H_q, D] in q's dtype."""
        qq = q if q.dtype in (torch.float16, torch.float32) else q.float()
        rest = self.tokens
        n_kq = rest - rest % self.residual
        out = decode_kivi(qq.contiguous(), self.cache, sm_scale=scaling, max_len=max(n_kq, 1), validate_lens=False)
        return (out + self.nonfinite).to(q.dtype)  # NaN after a non-finite decode token (see `append`)

    def mark(self, key: torch.Tensor) -> None:
        """Tell the "kvq" attention function that this key tensor's attention is this store's decode step."""
        _PENDING[id(key)] = (key, self)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of the preallocated tensors (capacity); `KVQLayer.nbytes` reports the format's count."""
        c = self.cache
        names = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_res", "v_win", "lens")
        return sum(getattr(c, n).nbytes for n in names)


def kvq_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: fused KIVI decode for marked keys, torch SDPA for the rest."""
    hit = _PENDING.pop(id(key), None)
    if hit is None or hit[0] is not key:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)  # fmt: skip
    if query.shape[2] != 1:
        raise ValueError(f"the kvq kernel path decodes one token per step, got {query.shape[2]} query tokens")
    if attention_mask is not None and not (_UNPADDED_MASK and _UNPADDED_MASK[0] is attention_mask):
        full = attention_mask.all() if attention_mask.dtype == torch.bool else (attention_mask == 0).all()
        if not bool(full):
            raise ValueError("the kvq kernel path needs unpadded inputs (this attention mask hides tokens)")
        _UNPADDED_MASK[:] = [attention_mask]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    out = hit[1].attend(query[:, :, 0], scale)  # [B, H_q, D]
    return out.unsqueeze(1), None  # [B, 1, H_q, D], as transformers' attention functions return


def enable(model) -> None:
    """Register the "kvq" attention function (and SDPA's mask for it) with transformers and switch `model`
    to it. Unmarked attention still runs torch SDPA, so the model works unchanged with any other cache."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvq_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    if getattr(model.config, "_attn_implementation", None) != ATTENTION_NAME:
        model.set_attn_implementation(ATTENTION_NAME)
