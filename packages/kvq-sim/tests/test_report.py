"""`kvq-sim report`: figures carry the expected series and labels, the PDF is byte-identical across renders,
has one page per section, its pages are not blank, and bad or missing inputs degrade as documented."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg

from kvq_sim import figures, report
from kvq_sim.cli import main

ROOT = Path(__file__).resolve().parents[3]
METHODS = "kivi:2,kvquant:3"
CONTEXTS = (4096, 262144, 1 << 20)  # three points keep the test fast


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    """Two GPUs, fp16 + two methods, the repository's measurements and an empty quality folder."""
    empty = tmp_path_factory.mktemp("quality")
    return report.resolve_inputs(
        "llama-7b", ["a100-80g", "l40s"], METHODS, CONTEXTS, ROOT / "reports" / "measurements", empty
    )


@pytest.fixture(scope="module")
def pages(inp):
    with matplotlib.rc_context(figures.rc()):
        return figures.build_pages(inp)


def test_parse_methods_puts_fp16_first_once():
    s = report.parse_methods("kivi:2, fp16 ,kivi:2,skvq:k2v1.5")
    assert [x.label for x in s] == ["fp16", "kivi 2-bit", "skvq k2v1.5-bit"]


def test_memory_page_bars_per_series_and_gpu(pages):
    ax_a100, ax_l40s = pages[1].axes
    assert ax_a100.get_title().startswith("a100-80g") and ax_l40s.get_title().startswith("l40s")
    assert [t.get_text() for t in ax_a100.get_yticklabels()] == ["fp16", "kivi 2-bit", "kvquant 3-bit"]
    assert ax_a100.get_xlabel() == "memory per GPU (GiB)"
    # 9 parts x 3 series stacked; each bar ends at or below the usable memory (max context fits)
    assert len(ax_a100.patches) == 9 * 3
    ends = {}
    for p in ax_a100.patches:
        y = round(p.get_y(), 3)
        ends[y] = max(ends.get(y, 0), p.get_x() + p.get_width())
    assert all(70 < e <= 79.19 for e in ends.values())


def test_context_pages_carry_series_and_units(inp, pages):
    colours = figures.series_colours(inp.series)
    ax = pages[3].axes[0]  # max batch vs context, a100-80g
    assert [ln.get_label() for ln in ax.get_lines()] == ["fp16", "kivi 2-bit", "kvquant 3-bit"]
    assert [ln.get_color() for ln in ax.get_lines()] == [colours[s] for s in inp.series]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "tokens" in ax.get_xlabel() and "sequences" in ax.get_ylabel()
    # fp16 fits 131K tokens on an A100 and kivi 2-bit 698K: the fp16 curve stops at 4K, kivi at 256K
    fp16, kivi = ax.get_lines()[:2]
    assert max(fp16.get_xdata()) == 4096 and max(kivi.get_xdata()) == 262144
    lat = pages[4].axes
    assert lat[0].get_ylabel() == "decode step, batch 1 (ms)" and lat[2].get_ylabel() == "tokens/s at max batch"
    legend_texts = {t.get_text() for leg in pages[4].legends for t in leg.get_texts()}
    assert {"fp16", "kivi 2-bit", "kvquant 3-bit", "kv"} <= legend_texts


def test_max_context_page_marks_fp16(pages):
    ax = pages[2].axes[0]
    notes = [t.get_text() for t in ax.texts]
    assert any(n.startswith("fp16, a100-80g: 131K") for n in notes) and any(n.startswith("fp16, l40s") for n in notes)
    assert "bits" in ax.get_xlabel() and "tokens" in ax.get_ylabel()


def test_roofline_points_on_the_roof(inp):
    r = report.roofline(inp, "a100-80g")
    att = {p.series.label: p for p in r.points if p.series}
    # 2-bit codes read ~5x fewer bytes per FLOP than fp16: higher intensity, memory bound below the ridge
    assert att["kivi 2-bit"].intensity > 4 * att["fp16"].intensity
    assert all(p.tflops <= r.eff_peak_tflops + 1e-9 for p in r.points)


def test_measured_page_uses_kernel_csv_and_explains_missing_e2e(pages):
    fig = pages[6]
    scatter = fig.axes[0]
    labels = {t.get_text() for t in scatter.get_legend().get_texts()}
    assert {"kvq_fp16", "kvq_kivi 2-bit", "predicted = measured"} <= labels
    text = "\n".join(t.get_text() for t in fig.texts)
    if not (ROOT / "reports/measurements/e2e_decode_h100.csv").exists():
        assert "e2e_decode_h100.csv is missing" in text and "benchmarks/e2e_decode.py" in text


def test_missing_inputs_degrade_to_explanations(tmp_path):
    inp = report.resolve_inputs("llama-7b", ["a100-80g"], "kivi:2", CONTEXTS, tmp_path / "none", tmp_path / "none")
    with matplotlib.rc_context(figures.rc()):
        measured, quality = figures.measured_page(inp), figures.quality_page(inp)
    assert not measured.axes and "kernel_decode_h100.csv is missing" in measured.texts[-1].get_text()
    assert not quality.axes and "No usable quality results" in quality.texts[-1].get_text()


def test_quality_pareto_page(tmp_path, inp):
    q = tmp_path / "q"
    q.mkdir()
    (q / "smollm2.csv").write_text(
        "method,bits,avg_bits,ppl,protocol\nfp16,16,16,11.74,decode\nkivi,2,3.0,12.9,decode\n"
        "kivi,4,5.0,11.8,decode\nint,2,2.25,40.0,decode\n"
    )
    (q / "other.csv").write_text("cache,ppl\nfull,11.7\n")
    assert report.pareto([(16, 11.74), (3, 12.9), (5, 11.8), (2.25, 40.0), (4, 13.0)]) == [
        (2.25, 40.0),
        (3, 12.9),
        (5, 11.8),
        (16, 11.74),
    ]
    with matplotlib.rc_context(figures.rc()):
        fig = figures.quality_page(report.resolve_inputs("llama-7b", ["a100-80g"], METHODS, CONTEXTS, q, q))
    ax = fig.axes[0]
    assert ax.get_xlabel() == "average bits per K/V element" and ax.get_ylabel() == "perplexity"
    assert len(ax.collections) == 4  # one marker per row
    assert "other.csv: lacks columns method, bits, avg_bits" in fig.texts[-1].get_text()


def test_pages_not_blank_on_agg_canvas(pages):
    for i, fig in enumerate(pages):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        rgb = np.asarray(canvas.buffer_rgba())[..., :3]
        inked = (rgb < 200).any(axis=-1).mean()
        assert inked > 0.003, f"page {i + 1} is nearly blank ({inked:.4f} of pixels inked)"


def test_pdf_deterministic_page_count_and_png(inp, tmp_path):
    a, b = tmp_path / "a.pdf", tmp_path / "b.pdf"
    assert report.write_report(inp, a) == len(figures.PAGES) == 8
    report.write_report(inp, b)
    data = a.read_bytes()
    assert data == b.read_bytes(), "two renders of the same inputs differ"
    assert len(re.findall(rb"/Type /Page\b", data)) == 8
    assert b"CreationDate" not in data and b"/Producer (kvq-sim report)" in data
    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm not installed (apt-get install poppler-utils): PNG rendering of the PDF not checked")
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(a), str(tmp_path / "p")], check=True)
    pngs = sorted(tmp_path.glob("p-*.png"))
    assert len(pngs) == 8
    for png in pngs:
        img = matplotlib.image.imread(png)[..., :3]
        assert (img < 0.8).any(axis=-1).mean() > 0.003, f"{png.name} is nearly blank"


def test_source_date_epoch_sets_the_date(inp, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert report.report_date().year == 2023
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(report.SimInputError, match="SOURCE_DATE_EPOCH"):
        report.report_date()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "llama-9b", "--gpu", "a100-80g"], "unknown model 'llama-9b'; valid: "),
        (["--model", "llama-7b", "--gpu", "a100"], "unknown GPU 'a100'; valid: "),
        (["--model", "llama-7b", "--gpu", "a100-80g", "--methods", "foo:2"], "unknown method 'foo'; valid: "),
        (["--model", "llama-2-70b", "--gpu", "l40s"], "weights alone need"),
    ],
)
def test_report_bad_input_one_line_exit_2(args, message, tmp_path):
    r = CliRunner().invoke(main, ["report", *args, "-o", str(tmp_path / "x.pdf")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and message in r.output and r.output.count("\n") == 1
    assert not (tmp_path / "x.pdf").exists()


def test_plan_does_not_import_matplotlib():
    code = (
        "import sys; from kvq_sim import cli, api; print(sorted(m for m in sys.modules if m.startswith('matplotlib')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_failed_render_leaves_the_earlier_pdf_and_no_temporary(inp, tmp_path, monkeypatch):
    out = tmp_path / "r.pdf"
    out.write_bytes(b"%PDF-1.4 earlier\n")
    report.check_output(out)  # an earlier PDF may be replaced

    # a page matplotlib cannot save fails inside the PDF writer, after the temporary file was opened
    monkeypatch.setattr(figures, "build_pages", lambda _inp: ["page 3"])
    with pytest.raises(ValueError, match="page 3"):
        report.write_report(inp, out)
    assert out.read_bytes() == b"%PDF-1.4 earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pdf"]


def test_check_output_refuses_a_file_that_is_not_a_pdf(tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("# notes\n")
    with pytest.raises(report.SimInputError, match=r"notes\.md exists and is not a PDF; refusing to overwrite it"):
        report.check_output(notes)
    assert notes.read_text() == "# notes\n"
