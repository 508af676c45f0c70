"""Calibration of per-layer quantizer state on real text: codebooks, channel order, clip, key ranges.

One forward (and, for Fisher weights, backward) pass of the model over calibration tokens records
every layer's K and V as the cache would receive them. KVQuant's nuq codebooks are k-means weighted
by the diagonal Fisher information, i.e. the squared gradient of the language-model loss with
respect to each K/V activation (arXiv:2401.18079, section 3.3); SKVQ's channel order and clip ratio
come from the same activations. Pre-RoPE formats see pre-RoPE keys (and gradients): both are
un-rotated with the inverse RoPE rotation, which is orthogonal, so the Fisher weights carry over.
A left-padded batch (`attention_mask`) is calibrated on its rows' own tokens only: each row at its own
positions 0, 1, ..., padding out of the loss, and only real tokens reach the quantizer's fit. The first
token of each row (the attention sink, whose keys and values are outliers of their own that every cache
with sinks keeps in fp16) is not fitted (`skip_first`, KVQuant's attention-sink-aware calibration); the
rows' fitted tokens go to the quantizer end to end, ``[1, H_kv, rows x (T - skip_first), D]``.

The result is a dict {layer: {"k": state, "v": state}} that `hf_cache.save_calibration` writes and
`KVQCache(..., calibration=path)` loads. MiniCache calibrates which layer pairs to merge instead
(`calibrate_pairs`, measured on calibration text through `KVQCache`; see `cache_minicache`).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .cache import StreamingLayer
from .formats import KVFormat, get_format, minicache_format
from .hf_cache import KVQCache, left_padding
from .hf_layer import _find_rotary, _Rope

__all__ = ["record_kv", "calibrate", "calibrate_pairs"]


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


def record_kv(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    fisher: bool = True,
    attention_mask: torch.Tensor | None = None,
):
    """Per-layer (K, V, dLoss/dK, dLoss/dV) of one pass over `input_ids` [B, T]; grads None if not fisher.

    K is post-RoPE, as transformers passes it to a cache. Shapes: [B, H_kv, T, D].
    attention_mask: [B, T], 1 = token, 0 = left padding (None: none). Each row runs at its own positions
    0, 1, ...; padded positions hold the model's K/V for the padding tokens, get no loss (gradient 0)
    and are for the caller to drop (`calibrate` does). The loss is the mean over all rows' tokens.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"calibration needs input_ids [batch, tokens >= 2], got shape {tuple(input_ids.shape)}")
    inputs = {"labels": input_ids if fisher else None}
    if any(_padding(input_ids, attention_mask)):  # each row at its own positions; padding out of the loss
        mask = attention_mask.long()
        inputs.update(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
        # a row's first token has no prediction alone; in the batch a padded position would predict it
        predicted = mask * torch.nn.functional.pad(mask[:, :-1], (1, 0))
        inputs["labels"] = input_ids.masked_fill(predicted == 0, -100) if fisher else None
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    cache = Cache(layers=[_RecordingLayer() for _ in range(n_layers)])
    was_training = model.training
    model.eval()
    with torch.set_grad_enabled(fisher):
        out = model(input_ids, past_key_values=cache, use_cache=True, **inputs)
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
    attention_mask: torch.Tensor | None = None,
    skip_first: int = 1,
) -> dict:
    """Calibrated codec state per layer for a method, from one pass over calibration `input_ids` [B, T]
    (`attention_mask` [B, T]: left padding, see `record_kv`; only the rows' own tokens are fitted, less the
    first `skip_first` of each row: the attention sink is not fitted)."""
    fmt = fmt or get_format(method, bits)
    rope = _Rope(_find_rotary(model)) if fmt.pre_rope_keys else None
    lead = _padding(input_ids, attention_mask)
    if skip_first < 0 or any(input_ids.shape[1] - p - skip_first < 1 for p in lead):
        raise ValueError(f"skip_first={skip_first} leaves a calibration row without a token to fit")
    state = {}
    for i, (k, v, kg, vg) in enumerate(record_kv(model, input_ids, fisher, attention_mask)):
        # each row's own tokens past the sink, rows end to end: [1, H_kv, fitted tokens, D]; keys and their
        # gradients un-rotated at the row's positions (the rotation is orthogonal)
        k, kg = (None if x is None else _own_tokens(x, lead, rope, skip_first) for x in (k, kg))
        v, vg = (None if x is None else _own_tokens(x, lead, None, skip_first) for x in (v, vg))
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


def _padding(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    """Leading padded positions per row (left padding only), checked against `input_ids`."""
    if attention_mask is None:
        return [0] * input_ids.shape[0]
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    lead = left_padding(attention_mask)
    short = [i for i, p in enumerate(lead) if input_ids.shape[1] - p < 2]
    if short:
        raise ValueError(f"calibration needs >= 2 tokens in every row; row {short[0]} has fewer besides padding")
    return lead


def _own_tokens(x: torch.Tensor, lead: list[int], rope: _Rope | None, skip: int = 0) -> torch.Tensor:
    """Rows' unpadded tokens past their first `skip`, ``[1, H, sum(T - lead - skip), D]``, from
    ``x: [B, H, T, D]``; with `rope`, each row un-rotated at its own positions 0, 1, ... (gradients rotate
    like the keys)."""
    rows = [x[i : i + 1, :, p:] for i, p in enumerate(lead)]
    if rope is not None:
        rows = [rope.unapply(r, 0) for r in rows]
    return torch.cat([r[:, :, skip:] for r in rows], 2)


# -- MiniCache: which layer pairs to merge -----------------------------------------------------------
def _chunked_nll(model, ids: torch.Tensor, fmt: KVFormat, prefill: int, chunk: int) -> float:
    """Mean NLL of ids[prefill:] when ids [1, T] is prefilled to `prefill` then fed `chunk` tokens at a
    time through a fresh cache of `fmt` (each chunk attends over the cache's restored history)."""
    cache = KVQCache(fmt=fmt, model=model, kernels=False)
    nll, n, pos, t = 0.0, 0, 0, ids.shape[1]
    with torch.no_grad():
        while pos < t - 1:
            end = prefill if pos == 0 else min(pos + chunk, t - 1)
            logits = model(ids[:, pos:end], past_key_values=cache, use_cache=True).logits[0].double()
            if pos > 0:
                lp = torch.log_softmax(logits, -1).gather(-1, ids[0, pos + 1 : end + 1, None])
                nll, n = nll - lp.sum().item(), n + lp.numel()
            pos = end
    return nll / n


def calibrate_pairs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    fmt: KVFormat | None = None,
    *,
    tolerance: float = 0.05,
    prefill: int | None = None,
    chunk: int = 16,
) -> KVFormat:
    """The MiniCache format that merges only the layer pairs the calibration text says it can afford.

    Candidates: every adjacent pair (l, l + 1) inside the paper's merged region (layers from
    L - floor(merge_depth_fraction * L), `KVFormat.merge_pairs`), at the format's retention and t.
    Each is measured alone: the increase of the mean NLL of `input_ids` [1, T] (calibration text,
    disjoint from any evaluation text) over the fp16 cache, prefilling `prefill` tokens (default T/2)
    and feeding the rest `chunk` tokens at a time, so the scored tokens attend over the merged history.
    Greedy: candidates in increasing cost are added when disjoint from those chosen and the measured
    increase of all chosen together stays within log(1 + tolerance), i.e. calibration perplexity at
    most `tolerance` (5%) above fp16's. The result is `minicache_format(..., pairs=chosen)` (possibly
    no pair), with ``extra["calibration"]``: the tolerance, each candidate's and the chosen set's NLL
    increase, and the calibration tokens.
    """
    fmt = fmt or get_format("minicache", 16)
    if not fmt.merge_depth_fraction:
        raise ValueError(f"{fmt.name} merges no layers")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"calibration needs input_ids [1, tokens], got shape {tuple(input_ids.shape)}")
    t = input_ids.shape[1]
    prefill = t // 2 if prefill is None else prefill
    if not 1 <= prefill < t - 1 or chunk < 1 or tolerance < 0:
        raise ValueError(
            f"need 1 <= prefill < tokens - 1, chunk >= 1, tolerance >= 0; got {prefill}, {chunk}, {tolerance}"
        )
    n_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    start = n_layers - math.floor(fmt.merge_depth_fraction * n_layers)
    candidates = [(i, i + 1) for i in range(start, n_layers - 1)]
    f, r, st = fmt.merge_depth_fraction, fmt.retain_fraction, fmt.extra.get("slerp_t", 0.6)

    def cost(pairs) -> float:
        return _chunked_nll(model, input_ids, minicache_format(f, r, st, pairs=pairs), prefill, chunk) - base

    base = _chunked_nll(model, input_ids, get_format("fp16"), prefill, chunk)
    alone = {p: cost((p,)) for p in candidates}
    budget = math.log1p(tolerance)
    chosen: list[tuple[int, int]] = []
    total = 0.0
    for p in sorted(candidates, key=alone.__getitem__):
        if alone[p] > budget:
            break
        if any(set(p) & set(q) for q in chosen):
            continue
        trial = cost((*chosen, p))
        if trial <= budget:
            chosen, total = [*chosen, p], trial
    out = minicache_format(f, r, st, pairs=tuple(chosen))
    info = {
        "tolerance": tolerance,
        "tokens": t,
        "prefill": prefill,
        "chunk": chunk,
        "nll_increase": total,
        "pair_nll_increase": alone,
    }
    return out.with_(extra={**out.extra, "calibration": info})
