"""On the real model: RoPE re-applied to k_proj outputs reproduces the cache's keys, and reference attention the model's."""

import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "capture_smollm2_kv.py"


@pytest.fixture(scope="module")
def capture_script():
    spec = importlib.util.spec_from_file_location("capture_smollm2_kv", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.model
def test_capture_rope_identity_on_real_model(smollm2, capture_script):
    model, tok = smollm2
    from kvq_core.models import pydoc_text

    ids = tok(pydoc_text("calibration"), return_tensors="pt").input_ids[:, :97]
    layers = (0, 15, 29)
    acts = capture_script.capture(model, ids, layers)
    assert acts["L15.k_pre"].shape == (3, 97, 64) and acts["L15.q_pre"].shape == (9, 97, 64)
    errs = capture_script.check(acts, layers, float(model.config.rope_parameters["rope_theta"]))
    for i in layers:
        assert errs[f"L{i}.rope_rel"] < 1e-6  # same cos/sin, same fp32 ops: 0.0 measured
        assert errs[f"L{i}.attn_rel"] < 1e-5  # fp32 model vs fp64 reference: ~6e-7 measured
    assert errs["rope_table"] < 1e-5  # fp32 angles at positions < 97: ~97 * 2**-24
