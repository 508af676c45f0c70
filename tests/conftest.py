"""Shared fixtures of the repository-level tests: the K/V sample (the real SmolLM2 model is the root conftest's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

KV_SAMPLE = Path(__file__).parent / "data" / "smollm2_kv_sample.safetensors"


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
