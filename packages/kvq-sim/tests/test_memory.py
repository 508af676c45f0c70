"""Memory model against hand arithmetic: byte-exact KV per method, GQA, TP/CP sharding, weights, rounding."""

import math

import pytest

from kvq_sim.api import deployment
from kvq_sim.memory import alloc_bytes, memory

L7, H7, D = 32, 32, 128  # llama-7b: layers, KV heads, head_dim (docs/references.md §6)


def kv(model, gpu, bits, method, batch, context, gpus=1, parallel="tp"):
    return memory(deployment(model, gpu, bits, method, 16, gpus, parallel), batch, context).kv_bytes


def test_fp16_kv_is_two_bytes_per_element():
    assert kv("llama-7b", "a100-80g", None, "fp16", 3, 1000) == L7 * 3 * 1000 * 2 * H7 * D * 2


def test_int4_per_token_per_head():
    # 64 B of codes + fp16 scale + fp16 zero per token per head, K and V
    assert kv("llama-7b", "a100-80g", 4, "int", 2, 999) == L7 * 2 * 999 * 2 * H7 * (D // 2 + 4)


def test_kivi2_blocks_and_window():
    t, g, r = 1000, 32, 128
    k_res = t % r  # keys flush in blocks of 128: 104 fp16 tokens remain
    k_q = t - k_res
    v_res = r  # values keep a sliding window of the last 128
    v_q = t - v_res
    keys = H7 * k_q * D // 4 + 2 * 2 * math.ceil(k_q / g) * D * H7  # 2-bit codes + fp16 scale/zero per channel group
    values = H7 * v_q * D // 4 + 2 * 2 * v_q * H7 * (D // g)  # 2-bit codes + fp16 scale/zero per 32 channels
    resid = (k_res + v_res) * H7 * D * 2
    assert kv("llama-7b", "a100-80g", 2, "kivi", 5, t) == L7 * 5 * (keys + values + resid)


def test_skvq_k2v15_gqa():
    h, t, sinks, win, g = 8, 1000, 5, 128, 128  # llama-3-8b: 8 KV heads
    tq = t - sinks - win
    groups = tq * (h * D // g)  # groups span the token's whole 1024-element vector
    keys = h * tq * D // 4 + 2 * groups  # 2-bit codes + fp8 scale + fp8 zero
    values = h * tq * math.ceil(D / 5) + 2 * groups  # ternary: 5 trits per byte
    full = 2 * (sinks + win) * h * D * 2
    shared = 2 * h * D * 2  # int16 channel order per stream
    assert kv("llama-3-8b", "h100-80g", "k2v1.5", "skvq", 3, t) == 32 * (3 * (keys + values + full) + shared)


def test_kvquant2_outliers_and_codebooks():
    t = 777
    tq = t - 1  # the first token is an fp16 sink
    k = math.ceil(0.01 * H7 * D)  # 41 outliers per token
    outliers = tq * k * (2 + 2)  # fp16 value + 16-bit index (H*D = 4096 channels need more than 8 bits) each
    keys = H7 * tq * D // 4 + outliers + tq * 2  # per-channel thresholds: a 16-bit count of outliers per token
    values = H7 * tq * D // 4 + outliers + tq * (2 + 2)  # top-k: fixed count, no row metadata; fp16 scale + zero
    sinks = 2 * H7 * D * 2
    shared = 2 * (4 * 2) + H7 * D * 2 * 2  # two 4-level fp16 codebooks; static per-channel key scale+zero
    assert kv("llama-7b", "a100-80g", 2, "kvquant", 2, t) == L7 * (2 * (keys + values + sinks) + shared)


def test_tp_splits_heads_and_replicates_kv_heads():
    per_layer_token = 2 * D * 2  # one KV head, fp16 K and V
    # llama-2-70b: 8 KV heads; tp=8 -> 1 per GPU; tp=16 -> still 1 (replicated)
    assert kv("llama-2-70b", "h200", None, "fp16", 1, 4096, gpus=8) == 80 * 4096 * per_layer_token
    assert kv("llama-2-70b", "h200", None, "fp16", 1, 4096, gpus=16) == 80 * 4096 * per_layer_token


def test_tp_weights_per_gpu():
    dep = deployment("llama-2-70b", "8x-h100", None, "fp16", 16, 8, "tp")
    h, q, kvs, ffn, v = 8192, 8192, 1024, 28672, 32000
    per_layer = h * q // 8 * 2 + h * kvs // 8 * 2 + 3 * h * ffn // 8 + 2 * h
    assert memory(dep, 1, 1).weights_bytes == 2 * (80 * per_layer + 2 * v // 8 * h + h)


def test_cp_splits_tokens_and_window_caps():
    assert kv("llama-7b", "8x-a100-80g", None, "fp16", 1, 8001, 8, "cp") == L7 * 1001 * 2 * H7 * D * 2
    assert kv("mistral-7b", "a100-80g", None, "fp16", 1, 100_000) == kv("mistral-7b", "a100-80g", None, "fp16", 1, 4096)


def test_int4_weights_group_metadata():
    dep = deployment("llama-7b", "a100-80g", 2, "kivi", 4)
    linear = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    meta = 32 * 2 * 2 * (4 * 4096 * 32 + 2 * 11008 * 32 + 4096 * 86)  # fp16 scale+zero per 128 inputs
    fp16 = 2 * (32 * 2 * 4096 + 2 * 32000 * 4096 + 4096)  # norms, embeddings, LM head
    assert memory(dep, 1, 1).weights_bytes == linear // 2 + meta + fp16


def test_allocator_rounding():
    assert alloc_bytes(0) == 0 and alloc_bytes(1) == 512 and alloc_bytes(1 << 20) == 1 << 20
    assert alloc_bytes((1 << 20) + 1) == 2 << 20 and alloc_bytes(3 << 20) == 4 << 20


@pytest.mark.parametrize("batch,context", [(1, 1), (7, 1025), (64, 32768)])
def test_total_is_sum_of_parts_and_monotone(batch, context):
    dep = deployment("llama-3-8b", "h100-80g", 2, "kivi")
    m = memory(dep, batch, context)
    assert m.total_bytes == (
        m.weights_bytes + m.kv_bytes + m.activation_bytes + m.allocator_rounding_bytes + m.reserve_bytes
    )
    assert memory(dep, batch + 1, context).total_bytes > m.total_bytes
    assert memory(dep, batch, context + 1).total_bytes >= m.total_bytes
