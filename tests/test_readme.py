"""The README's generated sections match what the code produces now."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import readme_sections  # noqa: E402


@pytest.mark.parametrize("name", list(readme_sections.SECTIONS))
def test_generated_section_is_current(name):
    text = (ROOT / "README.md").read_text()
    i, j = readme_sections.section(text, name)
    assert text[i:j] == readme_sections.SECTIONS[name](), "regenerate with: python scripts/readme_sections.py"


def test_quickstart_output_is_current():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, check=True
    ).stdout
    readme = (ROOT / "README.md").read_text()
    for line in out.strip().splitlines():
        assert line in readme, line
