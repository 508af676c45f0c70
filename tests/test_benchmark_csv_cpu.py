"""CPU checks of the benchmarks' shared pieces: model shapes from configs/models, RoPE against kvq_core's, and the
CSV columns each benchmark writes equal to its committed file's (kvq_sim.measurements reads them by name)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
MEASUREMENTS = ROOT / "reports" / "measurements"
sys.path.insert(0, str(ROOT / "benchmarks"))


def header(name: str) -> list[str]:
    with open(MEASUREMENTS / name, newline="") as f:
        return next(csv.reader(f))


def test_e2e_shape_is_configs_models_llama_7b():
    from e2e_decode import Shape, model_shape

    assert model_shape("llama-7b") == Shape("llama-7b", 32, 4096, 32, 32, 128, 11008, 32000, 10000.0)
    assert model_shape("llama-2-70b").kv_heads == 8


@pytest.mark.parametrize(
    ("name", "message"),
    [("llama7b", "unknown model 'llama7b'; valid: .*llama-7b"), ("mixtral-8x7b", "dense full-attention")],
)
def test_unknown_or_unsupported_models_are_refused(name, message):
    from e2e_decode import model_shape

    with pytest.raises(ValueError, match=message):
        model_shape(name)


def test_rope_equals_kvq_core_reference_at_each_sequence_position():
    """The step's per-sequence RoPE equals kvq_core's spec (fp64 tables along T) row by row."""
    from e2e_decode import rope

    from kvq_core.attention import apply_rope

    torch.manual_seed(0)
    x = torch.randn(3, 4, 1, 64)  # [B, H, 1, D]
    pos = torch.tensor([0, 97, 4099])
    got = rope(x, pos, 10000.0)
    for b, p in enumerate(pos.tolist()):
        want = apply_rope(x[b], torch.tensor([p]), theta=10000.0)  # [H, 1, D]
        # fp32 tables: the angle p * inv_freq rounds by ~p * 6e-8 rad (2.5e-4 at 4099); a wrong pairing errs by ~1
        torch.testing.assert_close(got[b], want, atol=1e-3, rtol=0)


def test_kernel_sweep_columns_equal_the_committed_csv():
    from kvq_core.provenance import CSV_FIELDS
    from kvq_kernels.benchmarking import KERNEL_FIELDS

    assert [*CSV_FIELDS, *KERNEL_FIELDS] == header("kernel_decode_h100.csv")
    for name in ("flush_effect_h100.csv", "replay_overhead_h100.csv", "weight_gemv_h100.csv"):
        assert header(name)[: len(CSV_FIELDS)] == list(CSV_FIELDS), name


def test_e2e_provenance_columns_equal_the_committed_csv():
    from kvq_core.provenance import CSV_FIELDS

    assert header("e2e_decode_h100.csv")[-len(CSV_FIELDS) :] == list(CSV_FIELDS)


def test_hf_cache_decode_columns_and_shapes():
    pytest.importorskip("transformers")
    import hf_cache_decode

    for name in ("hf_cache_decode_smollm2_h100.csv", "hf_cache_decode_llama7b_h100.csv"):
        assert list(hf_cache_decode.COLUMNS) == header(name)
    cfg = hf_cache_decode.llama_config("smollm2-135m")
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (
        30,
        9,
        3,
        64,
    )
    assert cfg["tie_word_embeddings"] and cfg["rope_theta"] == 100000.0
    assert not hf_cache_decode.llama_config("llama-7b")["tie_word_embeddings"]


def test_multigpu_decode_columns_equal_the_committed_csv():
    import multigpu_decode

    assert list(multigpu_decode.CSV_FIELDS) == header("multigpu_decode_h100.csv")


def test_weight_gemv_shapes_are_the_committed_ones():
    sys.path.insert(0, str(ROOT / "packages" / "kvq-kernels" / "benchmarks"))
    import weight_gemv

    with open(MEASUREMENTS / "weight_gemv_h100.csv", newline="") as f:
        committed = {r["proj"]: (int(r["n"]), int(r["k"])) for r in csv.DictReader(f)}
    assert weight_gemv.projection_shapes(weight_gemv.MODEL) == committed
