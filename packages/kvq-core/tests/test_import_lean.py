"""The format descriptions must import without torch (the simulator and CLI depend on it)."""

import subprocess
import sys


def test_formats_import_without_torch():
    code = "import sys, kvq_core.formats, kvq_core; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
