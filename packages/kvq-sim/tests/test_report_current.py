"""The committed example report, its data and docs/reports.md are what `make report` writes now.

`make report` runs `kvq-sim report $(REPORT_ARGS) -o reports/llama-7b.pdf`, then writes the numbers the pages
show to reports/llama-7b.json and the generated section of docs/reports.md. These tests render the same way
into tmp_path (about 5 s on one core) and fail when the model, a config, a measurement or the drawing code
changed and nobody reran `make report`.

Why not compare PDF bytes alone: they depend on the matplotlib, numpy and font versions (content streams
and embedded font subsets change between matplotlib releases, and the title page names the versions), so a
machine with other versions would fail on a current report. What is compared instead holds on any versions
and is still exact: the data JSON (floats at 6 significant digits), the fingerprint in the PDF's Keywords
(sha256 of that JSON and of every page's titles, labels, notes and legends; tick labels and the title
page's versions line left out) and the page count.
Where this machine's versions are those the committed PDF names in its Subject, the bytes must match too.
"""

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from kvq_sim import figures, report, report_data
from kvq_sim.cli import main

ROOT = Path(__file__).resolve().parents[3]
PDF = ROOT / "reports" / "llama-7b.pdf"
JSON = ROOT / "reports" / "llama-7b.json"
DOC = ROOT / "docs" / "reports.md"
STALE = "stale: run `make report` and commit reports/llama-7b.pdf, reports/llama-7b.json and docs/reports.md"


def _report_args() -> list[str]:
    """REPORT_ARGS of the Makefile: the test renders exactly what `make report` renders."""
    make = (ROOT / "Makefile").read_text()
    return re.search(r"^REPORT_ARGS = (.+)$", make, re.M)[1].split()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """(PDF bytes, data JSON) rendered now as `make report` does, from the repository root."""
    out = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the default --measurements and --quality folders are relative, as in make
        mp.delenv("SOURCE_DATE_EPOCH", raising=False)
        r = CliRunner().invoke(main, ["report", *_report_args(), "-o", str(out / "llama-7b.pdf")])
        assert r.exit_code == 0, r.output
        assert report_data.main([*_report_args(), "-o", str(out / "llama-7b.json")]) == 0
    return (out / "llama-7b.pdf").read_bytes(), (out / "llama-7b.json").read_text()


def test_makefile_report_target_writes_the_committed_files():
    make = (ROOT / "Makefile").read_text()
    assert "\tkvq-sim report $(REPORT_ARGS) -o reports/llama-7b.pdf\n" in make
    assert "\t$(PYTHON) -m kvq_sim.report_data $(REPORT_ARGS) -o reports/llama-7b.json --doc docs/reports.md\n" in make


def test_committed_data_is_current(fresh):
    now, committed = json.loads(fresh[1]), json.loads(JSON.read_text())
    changed = sorted(k for k in now.keys() | committed.keys() if now.get(k) != committed.get(k))
    assert not changed, f"reports/llama-7b.json differs in {changed}; {STALE}"


def test_committed_pdf_is_current(fresh):
    now, committed = fresh[0], PDF.read_bytes()
    pages = [len(re.findall(rb"/Type /Page\b", b)) for b in (now, committed)]
    assert pages == [len(figures.PAGES)] * 2, f"page counts (now, committed) {pages}; {STALE}"
    assert report.read_fingerprint(now) == report.read_fingerprint(committed), f"page text or data differ; {STALE}"
    if report.read_environment(now) == report.read_environment(committed):
        assert now == committed, f"same versions ({report.read_environment(now)}) but other bytes; {STALE}"


def test_docs_generated_section_is_current():
    text = DOC.read_text()
    i, j = text.index(report_data.DOC_BEGIN) + len(report_data.DOC_BEGIN), text.index(report_data.DOC_END)
    assert text[i:j] == "\n" + report_data.summary(json.loads(JSON.read_text())), STALE


def test_docs_prose_numbers_are_checked():
    """Every number docs/reports.md states outside code and the generated section is one the code uses."""
    text = DOC.read_text()
    text = text[: text.index(report_data.DOC_BEGIN)] + text[text.index(report_data.DOC_END) :]
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # commands
    text = re.sub(r"`[^`]*`", "", text)  # names, paths, options
    text = re.sub(r"^\d+\. ", "", text, flags=re.M)  # page numbers of the page list
    data = json.loads(JSON.read_text())
    fp16_a100 = next(b["max_context"] for b in data["memory"]["a100-80g"] if b["series"] == "fp16")
    allowed = {
        fp16_a100,  # the exact-count example
        figures.KITOK,
        report_data.ROOFLINE_CONTEXT,
        *report_data.ROOFLINE_BATCHES,
        report_data.SPREAD_PCT,
        report_data.INTERVAL_PCT,
        report_data.JSON_DIGITS,
        figures.rc()["pdf.fonttype"],
        *range(1, len(figures.PAGES) + 1),  # page numbers; "1 KiTok", "batch 1"
    }
    numbers = re.findall(r"(?<![\w.,-])\d[\d,]*(?:\.\d+)?(?![\w-])", text)
    stated = {float(n.replace(",", "")) for n in numbers}
    assert stated <= allowed, f"unchecked numbers in docs/reports.md: {sorted(stated - allowed)}"
