"""`kvq-sim report`: assemble the pages of `figures` (drawn from `report_data`) into one deterministic PDF.

Determinism: the PDF carries no creation date unless SOURCE_DATE_EPOCH is set (then that date), a fixed
Producer, and no absolute paths, so the same inputs and versions give byte-identical files. Its `Keywords`
hold a fingerprint: sha256 of the data JSON and of every page's text (`figures.page_text`: no tick labels,
no versions line), which a test recomputes to tell whether the committed report is current on any matplotlib version;
its `Subject` names the versions that drew it. `python -m kvq_sim.report ... --png DIR` writes the pages
as PNG for review (no poppler needed).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

from .errors import SimInputError
from .files import check_destination, replacing
from .report_data import DEFAULT_METHODS, Inputs, ReportData, report_data, resolve_inputs, to_json

__all__ = ["DEFAULT_METHODS", "SimInputError", "check_output", "fingerprint", "resolve_inputs", "write_report"]

PRODUCER = "kvq-sim report"
PDF_MAGIC = b"%PDF-"
FINGERPRINT_PREFIX = "kvq-sim report sha256:"


def check_output(out: Path) -> None:
    """Before any rendering: `out` can be written, and is not an existing file other than a PDF (a report
    replaces only an earlier PDF, whose bytes it keeps in a new backup, `files.next_backup`)."""
    check_destination(out, "report")
    if out.is_file():
        with open(out, "rb") as f:
            head = f.read(len(PDF_MAGIC))
        if head != PDF_MAGIC:
            raise SimInputError(
                f"report {out} exists and is not a PDF; refusing to overwrite it (remove it or choose another -o)"
            )


def fingerprint(data_json: str, page_texts: list[list[str]]) -> str:
    """sha256 of the data JSON and of each page's text, in page order."""
    h = hashlib.sha256(data_json.encode())
    for i, texts in enumerate(page_texts, 1):
        h.update(f"\n-- page {i}\n".encode())
        h.update("\n".join(texts).encode())
    return h.hexdigest()


def read_fingerprint(pdf: bytes) -> str | None:
    """The fingerprint a report PDF carries in its Keywords, or None."""
    m = re.search(rb"/Keywords \(" + re.escape(FINGERPRINT_PREFIX.encode()) + rb"([0-9a-f]{64})\)", pdf)
    return m[1].decode() if m else None


def environment(d: ReportData) -> str:
    """'kvq-core 0.1.0, kvq-sim 0.1.0, matplotlib 3.11.2, ...': the versions that decide the PDF's bytes."""
    return ", ".join(f"{k} {v}" for k, v in d.versions.items())


def read_environment(pdf: bytes) -> str | None:
    """The versions a report PDF names in its Subject, or None."""
    m = re.search(rb"/Subject \(([^)]*)\)", pdf)
    return m[1].decode() if m else None


def _warn_skipped(d: ReportData) -> None:
    for s in d.quality.skipped:
        print(f"warning: quality file skipped: {s}", file=sys.stderr)


def write_report(inp: Inputs, out: Path) -> int:
    """Draw every page into `out` (a PDF) atomically; return the page count. `check_output` first.
    Quality files that cannot be read are named on stderr, never on a page."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages

    from . import figures

    data = report_data(inp)
    _warn_skipped(data)
    meta = {"Creator": PRODUCER, "Producer": PRODUCER, "CreationDate": data.date, "ModDate": data.date}
    meta["Title"] = f"kvq-sim report: {inp.model} on {', '.join(inp.gpus)}"
    meta["Subject"] = environment(data)
    with matplotlib.rc_context(figures.rc()):
        pages = figures.build_pages(data)
        with replacing(out) as tmp, PdfPages(tmp, metadata=meta) as pdf:
            for fig in pages:
                pdf.savefig(fig)
            texts = [figures.page_text(fig) for fig in pages]  # after drawing: tick labels are final
            pdf.infodict()["Keywords"] = FINGERPRINT_PREFIX + fingerprint(to_json(data), texts)
    return len(pages)


def write_pngs(inp: Inputs, directory: Path, dpi: int = 100) -> list[Path]:
    """Every page as `<directory>/page-<n>.png`, drawn by matplotlib from the same figures as the PDF."""
    import matplotlib

    from . import figures

    data = report_data(inp)
    _warn_skipped(data)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    with matplotlib.rc_context(figures.rc()):
        for i, fig in enumerate(figures.build_pages(data), 1):
            out.append(directory / f"page-{i}.png")
            fig.savefig(out[-1], dpi=dpi)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write the report's pages as PNG files (the PDF itself is `kvq-sim report`)."""
    ap = argparse.ArgumentParser(prog="python -m kvq_sim.report", description=main.__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--gpu", dest="gpus", action="append", required=True)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--measurements", type=Path, default=Path("reports/measurements"))
    ap.add_argument("--quality", type=Path, default=Path("reports/quality"))
    ap.add_argument("--png", type=Path, required=True, help="folder for page-<n>.png")
    ap.add_argument("--dpi", type=int, default=100)
    a = ap.parse_args(argv)
    try:
        inp = resolve_inputs(a.model, a.gpus, a.methods, measurements_dir=a.measurements, quality_dir=a.quality)
    except SimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in write_pngs(inp, a.png, a.dpi):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
