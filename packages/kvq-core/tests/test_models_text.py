"""The offline text (kvq_core.models.pydoc_text): deterministic, and calibration disjoint from evaluation."""

import hashlib
import os
import subprocess
import sys

import pytest

from kvq_core.models import TEXT_SPLITS, pydoc_text, pydoc_topics


def test_splits_are_disjoint_whole_topics_covering_everything():
    topics = pydoc_topics()
    ev, cal = pydoc_text("evaluation"), pydoc_text("calibration")
    assert pydoc_text("all") == ev + "\n\n" + cal
    in_eval = [name for name, text in topics if text in ev]
    in_cal = [name for name, text in topics if text in cal]
    assert not set(in_eval) & set(in_cal)
    assert len(in_eval) + len(in_cal) == len(topics)
    assert 0.4 < len(ev) / (len(ev) + len(cal)) < 0.6


def test_deterministic_sorted_order():
    assert [name for name, _ in pydoc_topics()] == sorted(name for name, _ in pydoc_topics())
    # the same text in another interpreter with another hash seed (set or dict order would change it)
    code = "import hashlib; from kvq_core.models import pydoc_text; print(hashlib.sha256(pydoc_text('evaluation').encode()).hexdigest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert other.strip() == hashlib.sha256(pydoc_text("evaluation").encode()).hexdigest()


def test_unknown_split_lists_valid_ones():
    with pytest.raises(ValueError, match="valid: " + ", ".join(TEXT_SPLITS)):
        pydoc_text("test")


def test_import_is_torch_free():
    import subprocess
    import sys

    code = "import sys, kvq_core.models; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
