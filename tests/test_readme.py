"""The README's generated sections match what the code produces now."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    return text[text.index(start) + len(start) : text.index(end)]


def test_methods_table_is_current():
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "methods_table.py")], capture_output=True, text=True, check=True
    ).stdout
    assert _section("methods-table") == out, "regenerate with: python scripts/methods_table.py"


def test_quickstart_output_is_current():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, check=True
    ).stdout
    readme = (ROOT / "README.md").read_text()
    for line in out.strip().splitlines():
        assert line in readme, line
