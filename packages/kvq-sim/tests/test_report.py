"""`kvq-sim report`: the data module computes what the pages show, figures carry the expected series, labels,
colours and panels, the PDF is byte-identical across renders with one page per section and no blank page, and
bad or missing inputs degrade as documented (warnings on stderr, never on a page)."""

import re
import subprocess
import sys
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from kvq_sim import figures, report, report_data
from kvq_sim.cli import main
from kvq_sim.hardware import load_hardware

ROOT = Path(__file__).resolve().parents[3]
METHODS = "kivi:2,kivi:4,kvquant:3"
CONTEXTS = (4096, 262144, 1 << 20)  # three points keep the test fast


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    """a100-80g, l40s and h100-80g (same memory as the a100-80g), fp16 + three series, the repository's
    measurements and an empty quality folder."""
    empty = tmp_path_factory.mktemp("quality")
    return report_data.resolve_inputs(
        "llama-7b", ["a100-80g", "l40s", "h100-80g"], METHODS, CONTEXTS, ROOT / "reports" / "measurements", empty
    )


@pytest.fixture(scope="module")
def data(inp):
    return report_data.report_data(inp)


@pytest.fixture(scope="module")
def pages(data):
    with matplotlib.rc_context(figures.rc()):
        pages = figures.build_pages(data)
        for fig in pages:
            FigureCanvasAgg(fig).draw()  # tick labels are set when drawn
    return pages


def _texts(fig) -> str:
    """The page's text with wrapped lines joined, for phrase searches."""
    return " ".join(" ".join(figures.page_text(fig)).split())


def test_parse_methods_puts_fp16_first_once():
    s = report_data.parse_methods("kivi:2, fp16 ,kivi:2,skvq:k2v1.5")
    assert [x.label for x in s] == ["fp16", "kivi 2-bit", "skvq k2v1.5-bit"]


def test_report_data_imports_without_matplotlib_or_torch():
    code = (
        "import sys, kvq_sim.report_data; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'torch', 'triton')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_same_memory_gpus_share_one_panel_with_the_reason(data, pages):
    # a100-80g and h100-80g: 85,017,493,504 usable bytes and the same reserve each, so the same limits
    assert data.memory["a100-80g"] == data.memory["h100-80g"] != data.memory["l40s"]
    assert data.memory_groups == (("a100-80g", "h100-80g"), ("l40s",))
    for i in (1, 2, 3):  # memory, max context, max batch: memory alone decides them
        titles = [ax.get_title() for ax in pages[i].axes if ax.get_title()]
        assert titles == ["a100-80g, h100-80g (79.18 GiB usable)", "l40s (47.18 GiB usable)"], i
        assert "a100-80g and h100-80g have the same usable memory and reserve" in _texts(pages[i]), i
    assert [ax.get_title() for ax in pages[4].axes[:3]] == [  # latency differs, and where its efficiencies come from
        "a100-80g\ntransferred from h100-80g",
        "l40s\ntransferred from h100-80g",
        "h100-80g\ncalibrated",
    ]


def test_memory_page_bars_and_left_labels(data, pages):
    ax = pages[1].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["fp16", "kivi 2-bit", "kivi 4-bit", "kvquant 3-bit"]
    assert ax.get_xlabel() == "memory per GPU (GiB)"
    assert "the label at the left end of each bar" in _texts(pages[1])
    assert len(ax.patches) == 9 * 4  # 9 parts x 4 series stacked
    ends = {}
    for p in ax.patches:
        y = round(p.get_y(), 3)
        ends[y] = max(ends.get(y, 0), p.get_x() + p.get_width())
    assert all(70 < e <= 79.19 for e in ends.values())
    labels = [t for t in ax.texts if "tokens" in t.get_text()]
    assert labels[0].get_text() == "134,400 tokens, 16.00 bits" and labels[0].get_position()[0] < 5  # at the left


def test_token_counts_exact_and_context_axes_state_the_unit(pages):
    """No '131K' (K = 1024) anywhere: labels give exact tokens, axes count KiTok and say what it is."""
    for i, fig in enumerate(pages):
        text = "\n".join(t.get_text() for t in fig.findobj(Text))  # tick labels included
        assert not re.search(r"\b\d+(\.\d+)?[KMG]\b", text), (i + 1, re.findall(r"\b\d+(?:\.\d+)?[KMG]\b", text))
    assert "fp16: 134,400 tokens" in _texts(pages[2])
    for ax in pages[3].axes[:2] + pages[4].axes[3:6]:
        assert ax.get_xlabel() == "context (KiTok = 1,024 tokens)"
        assert [t.get_text() for t in ax.get_xticklabels()][:3] == ["4", "16", "64"]


def test_one_colour_per_family_one_marker_per_bit_width(inp, data, pages):
    st = figures.styles(data)
    kivi2, kivi4 = (s for s in inp.series if s.method == "kivi")
    assert st.colour("kivi") == st.handle(kivi2).get_color() == st.handle(kivi4).get_color()
    assert st.marker(kivi2.bits) != st.marker(kivi4.bits) and st.linestyles[kivi2] != st.linestyles[kivi4]
    assert st.colour("fp16") == "black"
    assert len({st.colour(m) for m in data.methods}) == len(data.methods)
    ax = pages[3].axes[0]  # max batch, a100-80g and h100-80g
    assert [ln.get_label() for ln in ax.get_lines()] == ["fp16", "kivi 2-bit", "kivi 4-bit", "kvquant 3-bit"]
    assert [ln.get_color() for ln in ax.get_lines()] == [st.colour(s.method) for s in inp.series]
    # fp16 fits 134,400 tokens on an A100 and kivi 2-bit 714,757: the fp16 curve stops at 4K, kivi 2-bit at 256K
    fp16, kivi = ax.get_lines()[:2]
    assert max(fp16.get_xdata()) == 4096 and max(kivi.get_xdata()) == 262144


def test_latency_page_labels(pages):
    lat = pages[4].axes
    assert lat[0].get_ylabel() == "decode step, batch 1 (ms)" and lat[3].get_ylabel() == "tokens/s at max batch"
    legend_texts = {t.get_text() for leg in pages[4].legends for t in leg.get_texts()}
    # kvq has kernels for fp16 and kivi (measured on the H100, transferred to the others); none for kvquant
    assert {
        "fp16\nKV read: kvq kernel",
        "kivi 2-bit\nKV read: kvq kernel",
        "kvquant 3-bit\nKV read: no kernel, prior",
        "kv",
    } <= legend_texts


def test_report_provenance_is_plans_for_every_term(inp, data):
    """Every GPU and series carries all five terms, from the function `kvq-sim plan` prints."""
    from kvq_sim import api
    from kvq_sim.provenance import TERMS

    assert set(data.provenance) == set(inp.deps)
    for (g, s), p in data.provenance.items():
        assert tuple(p.terms) == TERMS, (g, s)
        plan = api.plan("llama-7b", g, bits=s.bits, method=s.method, context=4096)
        assert {k: t.text for k, t in p.terms.items()} == plan.term_sources, (g, s)
    kinds = {(g, s.label): p.terms["kv_read"].kind for (g, s), p in data.provenance.items()}
    assert kinds["h100-80g", "kivi 2-bit"] == "measured" and kinds["a100-80g", "kivi 2-bit"] == "transferred"
    assert kinds["h100-80g", "kvquant 3-bit"] == kinds["l40s", "kvquant 3-bit"] == "prior"
    assert data.provenance["h100-80g", inp.series[0]].terms["interconnect"].kind == "none"
    as_json = report_data.to_dict(data)["provenance"]
    assert {g: {s: set(t) for s, t in by.items()} for g, by in as_json.items()} == {
        g: {s.label: set(TERMS) for s in inp.series} for g in inp.gpus
    }


def test_report_refuses_provenance_without_a_term(inp):
    from kvq_sim.provenance import term_provenance

    terms = term_provenance(inp.deps["h100-80g", inp.series[0]])
    del terms["compute"]
    with pytest.raises(ValueError, match="lacks a term"):
        report_data.TermProvenance("h100-80g", inp.series[0], terms)


def test_provenance_page_names_each_term_and_kind(data, pages):
    text = _texts(pages[5])
    assert text.count("KV read, kvquant 3-bit prior no kvq kernel for kvquant") == 3  # one per GPU
    assert "KV read, kivi 2-bit measured kernel family kvq_kivi_2b_mha, measured on h100-80g" in text
    eff = load_hardware("a100-80g").calibration.weight_bandwidth_efficiency  # the fitted transfer rule's
    assert f"weights transferred GEMV efficiency {eff:.3f}, transferred (rule:" in text
    assert text.count("interconnect none none (1 GPU)") == 3


def test_roofline_points_on_the_roof(data):
    r = data.rooflines["a100-80g"]
    att = {p.series.label: p for p in r.points if p.series}
    # 2-bit codes read ~5x fewer bytes per FLOP than fp16: higher intensity, memory bound below the ridge
    assert att["kivi 2-bit"].intensity > 4 * att["fp16"].intensity
    assert all(p.tflops <= r.eff_peak_tflops + 1e-9 for p in r.points)


def test_measured_page_numbers_come_from_the_data(data, pages):
    kernel = data.comparisons[0]
    assert kernel.path.name == report_data.KERNEL_CSV and kernel.missing is None
    errs = sorted(abs(e) for e in kernel.rel_errors)
    assert kernel.median_abs_error_pct == pytest.approx(100 * float(np.median(errs)))
    assert kernel.p90_abs_error_pct == pytest.approx(100 * float(np.percentile(errs, 90)))
    fig = pages[7]
    labels = {t.get_text() for t in fig.axes[1].get_legend().get_texts()}
    assert {"kvq_fp16", "kvq_kivi 2-bit", "sdpa_flash_fp16", "predicted = measured"} <= labels
    assert f"median |error| {kernel.median_abs_error_pct:.1f}%" in _texts(fig)


def test_measured_page_ticks_do_not_overlap(pages):
    fig = pages[7]
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            boxes = [t.get_window_extent(renderer) for t in axis.get_ticklabels() if t.get_text()]
            boxes = [b for b in boxes if b.width > 0]
            for a, b in zip(boxes, boxes[1:]):
                assert not a.overlaps(b), [t.get_text() for t in axis.get_ticklabels()]


def test_missing_inputs_degrade_to_explanations(tmp_path):
    inp = report_data.resolve_inputs("llama-7b", ["a100-80g"], "kivi:2", CONTEXTS, tmp_path / "none", tmp_path / "x")
    d = report_data.report_data(inp)
    with matplotlib.rc_context(figures.rc()):
        measured, quality = figures.measured_page(d), figures.quality_page(d)
    assert not measured.axes and f"{report_data.KERNEL_CSV} is missing" in measured.texts[-1].get_text()
    assert not quality.axes and "No usable quality results" in quality.texts[-1].get_text()


def test_series_that_tie_on_bits_and_context_and_a_sliding_window_model_render(tmp_path):
    """Two fp8 formats hold the same bits and context (the max-context page once compared their series and raised);
    a sliding-window model has no memory-bound context (the page says so instead of scaling an empty axis)."""
    with matplotlib.rc_context(figures.rc()):
        for model, methods in (("llama-7b", "fp8-e4m3:8,fp8-e5m2:8"), ("mistral-7b", "kivi:2")):
            inp = report_data.resolve_inputs(model, ["h100-80g"], methods, CONTEXTS, tmp_path / "none", tmp_path / "x")
            fig = figures.max_context_page(report_data.report_data(inp))
            FigureCanvasAgg(fig).draw()
            if model == "mistral-7b":
                assert "Any context fits in memory at batch 1" in _texts(fig)
            else:
                assert len(fig.axes[0].collections) == 3  # fp16 and both fp8 series


def test_quality_panels_one_window_each_warnings_on_stderr(tmp_path, capsys):
    """A windowed file with kvq-eval's change and 95% interval, a legacy file without them (change computed from
    perplexity against its fp16 row, no interval), a legacy file without a reference row and a foreign file."""
    q = tmp_path / "q"
    q.mkdir()
    head = "method,bits,avg_bits,held_bits_per_element,ppl,protocol,params\n"
    (q / "short.csv").write_text(
        head + "fp16,,16,16,11.74,decode,prefill=384 scored=128\nkivi,2,3.0,3.5,12.9,decode,prefill=384 scored=128\n"
        "kivi,4,5.0,5.5,11.8,decode,prefill=384 scored=128\nint,2,2.25,2.25,40.0,decode,prefill=384 scored=128\n"
    )
    (q / "long.csv").write_text(
        "method,bits,avg_bits,held_bits_per_element,ppl,change,change_low,change_high,protocol,params\n"
        "full,,32,32,10.0,0.0,0.0,0.0,decode,prefill=3968 scored=128\n"
        "kivi,2,2.2,3.25,12.5,0.25,0.125,0.375,decode,prefill=3968 scored=128\n"
        "kivi,4,5.0,5.25,10.5,0.05,,,decode,prefill=3968 scored=128\n"
    )
    (q / "orphan.csv").write_text(head + "kivi,2,3.0,3.5,12.9,teacher-forced,window=512 prefix=1 chunk=16\n")
    (q / "zero.csv").write_text(head + "kivi,2,3.0,3.5,0,decode,prefill=384 scored=128\n")
    (q / "other.csv").write_text("cache,ppl\nfull,11.7\n")
    rows = [
        report_data.QualityRow("m", None, x, x, 0, y, None, False, "f")
        for x, y in [(16, 0.1), (3, 9.9), (5, 0.5), (2.25, 240), (4, 11)]
    ]
    assert report_data.pareto(rows) == [(2.25, 240), (3, 9.9), (5, 0.5), (16, 0.1)]
    inp = report_data.resolve_inputs("llama-7b", ["a100-80g"], METHODS, CONTEXTS, q, q)
    d = report_data.report_data(inp)
    long, short = d.quality.panels  # the longest decode window first; orphan.csv's only row is skipped
    assert (long.window_tokens, long.reference, long.without_interval) == (4096, "", ("long.csv",))
    assert [(r.label, r.held_bits, r.change_pct, r.interval_pct, r.computed) for r in long.rows] == [
        ("full", 32.0, 0.0, (0.0, 0.0), False),
        ("kivi 2-bit", 3.25, 25.0, (12.5, 37.5), False),
        ("kivi 4-bit", 5.25, 5.0, None, False),  # a change without its interval: no error bar
    ]
    assert (short.window_tokens, short.reference) == (512, "fp16 row of short.csv")
    kivi2 = short.rows[1]
    assert (kivi2.change_pct, kivi2.interval_pct, kivi2.computed) == (100 * (12.9 / 11.74 - 1), None, True)
    with matplotlib.rc_context(figures.rc()):
        fig, table = figures.quality_page(d), figures.quality_table_page(d)
        FigureCanvasAgg(fig).draw()
    assert [ax.get_title() for ax in fig.axes] == ["decode, 4,096-token window", "decode, 512-token window"]
    assert len(fig.axes[1].collections) == 4 and not fig.axes[1].containers  # one marker per row, no interval
    bars = list(fig.axes[0].containers)  # error bars: the two rows with an interval
    assert [tuple(c.lines[2][0].get_segments()[0][:, 1]) for c in bars] == [(0.0, 0.0), (12.5, 37.5)]
    assert "no interval: long.csv" in _texts(fig) and "against the fp16 row of short.csv" in _texts(fig)
    assert "other.csv" not in _texts(fig) and "skipped" not in _texts(fig)
    text = _texts(table)
    assert "kivi 2-bit 3.25 12.500 +25.00% [+12.50%, +37.50%]" in text
    assert "kivi 4-bit 5.25 10.500 +5.00% -" in text and "reference for rows without change: fp16 row" in text
    report.write_report(inp, tmp_path / "r.pdf")
    err = capsys.readouterr().err
    assert "warning: quality file skipped: other.csv: lacks columns method, bits, avg_bits" in err
    assert "orphan.csv, row 2: no change column and no full-cache or fp16 row to compute it" in err
    assert "zero.csv, row 2: ppl must be positive and bits not negative" in err


def test_committed_quality_page_has_distinct_colours_and_no_warning(tmp_path):
    inp = report_data.resolve_inputs("llama-7b", ["a100-80g"], METHODS, CONTEXTS, tmp_path, ROOT / "reports/quality")
    d = report_data.report_data(inp)
    with matplotlib.rc_context(figures.rc()):
        fig = figures.quality_page(d)
    method_legend = fig.legends[0]
    colours = [h.get_color() for h in method_legend.legend_handles]
    assert len(colours) > 20 and len(set(colours)) == len(colours)
    windows = [(p.protocol, p.window_tokens) for p in d.quality.panels]
    assert len(windows) == len(set(windows)) and ("decode", 4096) in windows and ("decode", 512) in windows
    assert "lacks columns" not in _texts(fig)


def test_pages_not_blank_on_agg_canvas(pages):
    for i, fig in enumerate(pages):
        canvas = FigureCanvasAgg(fig)
        canvas.draw()
        rgb = np.asarray(canvas.buffer_rgba())[..., :3]
        inked = (rgb < 200).any(axis=-1).mean()
        assert inked > 0.003, f"page {i + 1} is nearly blank ({inked:.4f} of pixels inked)"


def test_pdf_deterministic_page_count_and_fingerprint(inp, tmp_path):
    a, b = tmp_path / "a.pdf", tmp_path / "b.pdf"
    assert report.write_report(inp, a) == len(figures.PAGES) == 10
    report.write_report(inp, b)
    data = a.read_bytes()
    assert data == b.read_bytes(), "two renders of the same inputs differ"
    assert len(re.findall(rb"/Type /Page\b", data)) == 10
    assert b"CreationDate" not in data and b"/Producer (kvq-sim report)" in data
    assert re.fullmatch(r"[0-9a-f]{64}", report.read_fingerprint(data))
    assert "matplotlib " + matplotlib.__version__ in report.read_environment(data)


def test_write_pngs(inp, tmp_path):
    pngs = report.write_pngs(inp, tmp_path / "png", dpi=20)
    assert [p.name for p in pngs] == [f"page-{i}.png" for i in range(1, 11)]
    assert all(matplotlib.image.imread(p).shape[1] == 220 for p in pngs)  # 11 in x 20 dpi


def test_source_date_epoch_sets_the_date(monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    assert report_data.report_date().year == 2023
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(report.SimInputError, match="SOURCE_DATE_EPOCH"):
        report_data.report_date()


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
    monkeypatch.setattr(figures, "build_pages", lambda _data: ["page 3"])
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
