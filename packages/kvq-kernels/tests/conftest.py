"""Kernel tests run on the Triton CPU interpreter (TRITON_INTERPRET=1, set by `make test`) or on a GPU."""

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if INTERPRET or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="kvq-kernels tests need TRITON_INTERPRET=1 (CPU interpreter) or a CUDA GPU")
    for item in items:
        if "kvq-kernels" in str(item.fspath):
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cpu" if INTERPRET else "cuda"


@pytest.fixture
def dtype() -> torch.dtype:
    # the interpreter computes in numpy: fp32 inputs (its fp16/bf16 dots are not the GPU's)
    return torch.float32 if INTERPRET else torch.float16
