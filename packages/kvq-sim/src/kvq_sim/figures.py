"""The pages of `kvq-sim report` as matplotlib Figures (Agg/PDF, no pyplot state), drawn from `report`'s data.

One colour per KV series on every page (`series_colours`), fp16 always black; bound markers are shared.
"""

from __future__ import annotations

import textwrap

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from . import report
from .report import Inputs, Series

PAGE_SIZE_IN = (11.0, 7.0)  # landscape; each page one figure
BOUND_MARKERS = {"kv": "o", "weights": "s", "compute": "^", "launch": "x", "interconnect": "D"}
GPU_MARKERS = ("o", "s", "^", "D", "v", "P")
PART_COLOURS = (
    "#7f7f7f",  # weights
    "#1f4e9a",  # KV codes
    "#5b8fd6",  # KV scales + zeros
    "#c03d3d",  # KV outliers
    "#e8a33c",  # KV fp16 residual + sinks
    "#8c6bb1",  # KV per-layer shared
    "#4daf4a",  # activations
    "#bcbd22",  # allocator rounding
    "#d9d9d9",  # CUDA context + workspace
)


def rc() -> dict:
    """Matplotlib settings of every page: embedded TrueType fonts, sizes readable at paper scale."""
    return {
        "font.family": "DejaVu Sans",
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "pdf.fonttype": 42,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "grid.linewidth": 0.5,
        "path.simplify": False,
    }


def series_colours(series: tuple[Series, ...]) -> dict[Series, str]:
    """fp16 black; the others from tab10 (minus its grey) in order, tab20 past nine."""
    import matplotlib

    others = [s for s in series if s.method != "fp16"]
    cmap = matplotlib.colormaps["tab10" if len(others) <= 9 else "tab20"]
    n = 10 if len(others) <= 9 else 20
    palette = [cmap(i) for i in range(n) if not (n == 10 and i == 7)]
    out = {s: palette[i % len(palette)] for i, s in enumerate(others)}
    out.update({s: "black" for s in series if s.method == "fp16"})
    return out


def tokens_label(n: float) -> str:
    """1024 -> '1K', 1048576 -> '1M' (binary prefixes: contexts are powers of two)."""
    for div, unit in ((1 << 30, "G"), (1 << 20, "M"), (1 << 10, "K")):
        if n >= div:
            v = n / div
            return f"{v:.0f}{unit}" if v >= 10 or v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}"


def _context_axis(ax, contexts, axis="x") -> None:
    """Log2 context axis with ticks every 4x labelled 1K, 4K, ..."""
    lo, hi = min(contexts), max(contexts)
    ticks = [1 << k for k in range(0, 40, 2) if lo <= (1 << k) <= hi]
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    a.set_major_locator(FixedLocator(ticks))
    a.set_major_formatter(FuncFormatter(lambda v, _: tokens_label(v)))
    a.set_minor_locator(NullLocator())


def _page(title: str, subtitle: str = "") -> Figure:
    fig = Figure(figsize=PAGE_SIZE_IN)
    subtitle = textwrap.fill(subtitle, 150)
    fig.suptitle(title, x=0.02, y=0.975, ha="left", fontsize=14, fontweight="bold")
    if subtitle:
        fig.text(0.02, 0.925, subtitle, ha="left", va="top", fontsize=9.5, color="#333333")
    return fig


def _explain(fig: Figure, text: str, y: float = 0.8) -> None:
    body = "\n".join(textwrap.fill(line, 120, subsequent_indent="    ") if line else "" for line in text.splitlines())
    fig.text(0.04, y, body, ha="left", va="top", family="DejaVu Sans Mono", fontsize=9)


# ---- pages ------------------------------------------------------------------------------------------


def title_page(inp: Inputs) -> Figure:
    fig = _page(
        f"kvq-sim report: {inp.model}", "memory, context limits, decode speed and quality of quantized KV caches"
    )
    v = report.versions()
    date = report.report_date()
    hw_lines = []
    for g in inp.gpus:
        h = inp.deps[g, inp.series[0]].hardware
        cal = h.calibration.status
        hw_lines.append(
            f"  {g:<12} {h.usable_memory_gib:6.2f} GiB usable  {h.hbm_bandwidth_gb_s:6,.0f} GB/s  "
            f"{h.fp16_dense_tflops:5,.0f} TFLOP/s fp16   latency efficiencies: {cal}"
        )
    lines = [
        "inputs",
        f"  model      {inp.model}   (fp16 weights, batch 1 unless a page says otherwise, 1 GPU each)",
        f"  GPUs       {', '.join(inp.gpus)}",
        f"  KV series  {', '.join(s.label for s in inp.series)}",
        f"  contexts   {tokens_label(min(inp.contexts))} .. {tokens_label(max(inp.contexts))} tokens, powers of 2",
        f"  measured   {inp.measurements_dir}/    quality: {inp.quality_dir}/",
        "",
        "hardware",
        *hw_lines,
        "",
        "versions",
        "  " + "   ".join(f"{k} {val}" for k, val in v.items()),
        "  date: "
        + (date.strftime("%Y-%m-%d (SOURCE_DATE_EPOCH)") if date else "omitted so that the PDF is reproducible"),
        "",
        "pages",
        "  1 this page",
        "  2 memory breakdown at each method's max context (batch 1)",
        "  3 max context vs average KV bits per element, per GPU",
        "  4 max batch vs context",
        "  5 decode step time (batch 1) and throughput (max batch) vs context, with the bounding resource",
        "  6 roofline of the decode step's operators",
        "  7 predicted vs measured latency",
        "  8 quality (perplexity) vs average bits, Pareto front",
        "",
        "regenerate: kvq-sim report --model "
        + inp.model
        + "".join(f" --gpu {g}" for g in inp.gpus)
        + " --methods "
        + ",".join(s.method if s.bits is None else f"{s.method}:{s.bits}" for s in inp.series)
        + " -o <file>.pdf",
    ]
    _explain(fig, "\n".join(lines), y=0.86)
    return fig


def memory_page(inp: Inputs) -> Figure:
    colours = series_colours(inp.series)
    fig = _page(
        "Memory per GPU at each method's max context (batch 1)",
        "Bars stack every byte the simulator counts; the label at the right end is the max context and the KV "
        "average bits per element (metadata included).",
    )
    n = len(inp.gpus)
    axes = fig.subplots(1, n, sharey=True, squeeze=False)[0]
    fig.subplots_adjust(left=0.13, right=0.98, top=0.84, bottom=0.2, wspace=0.12)
    used_parts = set()
    for ax, g in zip(axes, inp.gpus):
        bars = report.memory_bars(inp, g)
        y = list(range(len(bars)))[::-1]
        left = [0.0] * len(bars)
        for (label, _), colour in zip(report.MEMORY_PARTS, PART_COLOURS):
            w = [b.gib[label] for b in bars]
            if any(x > 0 for x in w):
                used_parts.add(label)
            ax.barh(y, w, left=left, color=colour, height=0.7, label=label, edgecolor="white", linewidth=0.3)
            left = [a + b for a, b in zip(left, w)]
        usable = bars[0].usable_gib
        ax.axvline(usable, color="black", lw=0.8, ls="--")
        for yi, b in zip(y, bars):
            ctx = "sliding window" if b.max_context is None else f"{tokens_label(b.max_context)} tok"
            ax.text(
                usable * 0.02,
                yi,
                f"{ctx}, {b.avg_bits:.2f} b",
                va="center",
                ha="left",
                fontsize=7.5,
                color="white",
                fontweight="bold",
            )
        ax.set_xlim(0, usable * 1.04)
        ax.set_title(f"{g} ({usable:.1f} GiB usable, dashed)")
        ax.set_xlabel("memory per GPU (GiB)")
        ax.grid(axis="y", visible=False)
        ax.set_yticks(y)
        ax.set_yticklabels([b.series.label for b in bars])
        for tick, b in zip(ax.get_yticklabels(), bars):
            tick.set_color(colours[b.series])
    handles = [
        Line2D([], [], color=c, lw=8, label=label)
        for (label, _), c in zip(report.MEMORY_PARTS, PART_COLOURS)
        if label in used_parts
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False, bbox_to_anchor=(0.5, 0.01))
    return fig


def max_context_page(inp: Inputs) -> Figure:
    colours = series_colours(inp.series)
    fig = _page(
        "Max context at batch 1 vs KV bits per element",
        "Average bits at the max context, metadata included; dashed lines: fp16 KV on each GPU.",
    )
    ax = fig.add_axes((0.08, 0.1, 0.62, 0.76))
    all_ctx, fp16_gpus = [], {}
    for gi, g in enumerate(inp.gpus):
        marker = GPU_MARKERS[gi % len(GPU_MARKERS)]
        bars = report.memory_bars(inp, g)
        pts = sorted((b.avg_bits, b.max_context, b.series) for b in bars if b.max_context)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#999999", lw=0.8, ls=":", zorder=1)
        for x, c, s in pts:
            # later GPUs drawn smaller and on top, so GPUs with equal memory (a100-80g, h100-80g) both show
            ax.scatter(
                [x],
                [c],
                color=colours[s],
                marker=marker,
                s=max(70 - 25 * gi, 14),
                zorder=3 + gi,
                edgecolor="black",
                linewidth=0.4,
            )
            all_ctx.append(c)
        fp16 = next((b for b in bars if b.series.method == "fp16"), None)
        if fp16 and fp16.max_context:
            fp16_gpus.setdefault(fp16.max_context, []).append(g)
    for ctx, gs in fp16_gpus.items():  # one label per distinct fp16 limit, at the left where no point sits
        ax.axhline(ctx, color="black", lw=0.7, ls="--", zorder=0)
        label = f"fp16, {' / '.join(gs)}: {tokens_label(ctx)}"
        ax.annotate(label, (0.2, ctx), textcoords="offset points", xytext=(0, 3), ha="left", va="bottom", fontsize=8)
    _context_axis(ax, [min(all_ctx) / 2, max(all_ctx) * 2], axis="y")
    ax.yaxis.set_major_locator(FixedLocator([1 << k for k in range(10, 36)]))
    ax.set_ylim(min(all_ctx) / 1.6, max(all_ctx) * 1.6)
    same = [g for g in inp.gpus[1:] if report.memory_bars(inp, g) == report.memory_bars(inp, inp.gpus[0])]
    if same:
        ax.set_title(
            f"{', '.join(same)}: same usable memory as {inp.gpus[0]}, so the same limits (smaller markers)", fontsize=9
        )
    ax.set_xlim(0, 17)
    ax.set_xlabel("KV average bits per element (codes + metadata + fp16 window)")
    ax.set_ylabel("max context at batch 1 (tokens, log scale)")
    method_handles = [Line2D([], [], color=colours[s], marker="o", ls="", label=s.label) for s in inp.series]
    gpu_handles = [
        Line2D([], [], color="white", markeredgecolor="black", marker=GPU_MARKERS[i % 6], ls="", label=g)
        for i, g in enumerate(inp.gpus)
    ]
    leg = fig.legend(handles=method_handles, title="KV series", loc="upper left", bbox_to_anchor=(0.73, 0.88))
    fig.add_artist(leg)
    fig.legend(handles=gpu_handles, title="GPU", loc="upper left", bbox_to_anchor=(0.88, 0.88))
    return fig


def _per_gpu_axes(fig: Figure, inp: Inputs, rows: int = 1, **adjust):
    axes = fig.subplots(rows, len(inp.gpus), sharex=True, sharey="row", squeeze=False)
    fig.subplots_adjust(**{"left": 0.08, "right": 0.79, "top": 0.82, "bottom": 0.1, "wspace": 0.08} | adjust)
    return axes


def _series_legend(fig: Figure, inp: Inputs, extra=(), y: float = 0.85) -> None:
    colours = series_colours(inp.series)
    handles = [Line2D([], [], color=colours[s], lw=1.8, label=s.label) for s in inp.series]
    leg = fig.legend(handles=handles, title="KV series", loc="upper left", bbox_to_anchor=(0.81, y))
    if extra:
        fig.add_artist(leg)
        fig.legend(handles=list(extra), title="bound (largest term)", loc="lower left", bbox_to_anchor=(0.81, 0.1))


def max_batch_page(inp: Inputs) -> Figure:
    colours = series_colours(inp.series)
    fig = _page("Max batch vs context", "Sequences of the given length that fit at once on one GPU (log axes).")
    axes = _per_gpu_axes(fig, inp)[0]
    for ax, g in zip(axes, inp.gpus):
        for s in inp.series:
            sw = report.context_sweep(inp, g, s)
            ax.plot(sw.contexts, sw.max_batch, color=colours[s], lw=1.6, marker=".", ms=4, label=s.label)
        _context_axis(ax, inp.contexts)
        ax.set_yscale("log")
        ax.set_title(g)
        ax.set_xlabel("context (tokens per sequence)")
    axes[0].set_ylabel("max batch (sequences, log scale)")
    _series_legend(fig, inp)
    return fig


def latency_page(inp: Inputs) -> Figure:
    colours = series_colours(inp.series)
    fig = _page(
        "Decode speed vs context",
        "Top: one decode step at batch 1. Bottom: generated tokens/s at the max batch that fits that context. "
        "Marker: the resource with the largest share of the step.",
    )
    axes = _per_gpu_axes(fig, inp, rows=2, hspace=0.12)
    for col, g in enumerate(inp.gpus):
        top, bottom = axes[0][col], axes[1][col]
        for s in inp.series:
            sw = report.context_sweep(inp, g, s)
            top.plot(sw.contexts, sw.step_ms, color=colours[s], lw=1.4, label=s.label, zorder=2)
            bottom.plot(sw.contexts, sw.tokens_per_s, color=colours[s], lw=1.4, label=s.label, zorder=2)
            for ax, ys, bounds in ((top, sw.step_ms, sw.bound), (bottom, sw.tokens_per_s, sw.bound_at_max_batch)):
                for bound, m in BOUND_MARKERS.items():
                    pts = [(c, y) for c, y, b in zip(sw.contexts, ys, bounds) if b == bound]
                    if pts:
                        ax.scatter(
                            *zip(*pts),
                            marker=m,
                            s=16,
                            color=colours[s],
                            zorder=3,
                            facecolor="none" if m != "x" else colours[s],
                            linewidth=0.9,
                        )
        top.set_title(g)
        for ax in (top, bottom):
            ax.set_yscale("log")
            _context_axis(ax, inp.contexts)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_xlabel("context (tokens per sequence)")
    axes[0][0].set_ylabel("decode step, batch 1 (ms)")
    axes[1][0].set_ylabel("tokens/s at max batch")
    used = {
        b
        for g in inp.gpus
        for s in inp.series
        for sw in [report.context_sweep(inp, g, s)]
        for b in sw.bound + sw.bound_at_max_batch
    }
    bound_handles = [
        Line2D([], [], color="black", marker=m, ls="", markerfacecolor="none", label=b)
        for b, m in BOUND_MARKERS.items()
        if b in used
    ]
    _series_legend(fig, inp, bound_handles)
    return fig


def roofline_page(inp: Inputs) -> Figure:
    import numpy as np

    colours = series_colours(inp.series)
    fig = _page(
        "Roofline of the decode step",
        f"Solid: datasheet HBM bandwidth and fp16 dense peak; dashed: with the efficiencies kvq-sim uses. Attention "
        f"at {tokens_label(report.ROOFLINE_CONTEXT)} tokens, batch 1; GEMMs (all weight matrices) at batch "
        f"{', '.join(map(str, report.ROOFLINE_BATCHES))}.",
    )
    axes = _per_gpu_axes(fig, inp)[0]
    x = np.logspace(-1, 3.5, 200)
    for ax, g in zip(axes, inp.gpus):
        r = report.roofline(inp, g)
        ax.plot(x, np.minimum(r.peak_tflops, x * r.hbm_tb_s), color="#444444", lw=1.2)
        ax.plot(x, np.minimum(r.eff_peak_tflops, x * r.eff_weight_tb_s), color="#444444", lw=1.0, ls="--")
        for p in r.points:
            if p.series is None:
                ax.scatter(
                    [p.intensity],
                    [p.tflops],
                    marker="s",
                    color="#7f7f7f",
                    s=30,
                    zorder=3,
                    edgecolor="black",
                    linewidth=0.4,
                )
                ax.annotate(
                    f"b={p.label.rsplit(' ', 1)[1]}",
                    (p.intensity, p.tflops),
                    textcoords="offset points",
                    xytext=(-4, 4),
                    ha="right",
                    fontsize=7.5,
                )
            else:
                ax.scatter(
                    [p.intensity],
                    [p.tflops],
                    marker="o",
                    color=colours[p.series],
                    s=30,
                    zorder=4,
                    edgecolor="black",
                    linewidth=0.4,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(0.05, r.peak_tflops * 2.5)
        ax.set_title(f"{g}: {r.hbm_tb_s:.2f} TB/s, {r.peak_tflops:,.0f} TFLOP/s")
        ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    axes[0].set_ylabel("attainable TFLOP/s (log scale)")
    extra = [
        Line2D([], [], color="#7f7f7f", marker="s", ls="", markeredgecolor="black", label="weight GEMMs\n(b = batch)"),
        Line2D([], [], color="#444444", lw=1.2, label="datasheet roof"),
        Line2D([], [], color="#444444", lw=1.0, ls="--", label="effective roof"),
    ]
    colours_h = [Line2D([], [], color=colours[s], marker="o", ls="", label=f"attention, {s.label}") for s in inp.series]
    leg = fig.legend(handles=colours_h, title="operator", loc="upper left", bbox_to_anchor=(0.81, 0.85))
    fig.add_artist(leg)
    fig.legend(handles=extra, loc="lower left", bbox_to_anchor=(0.81, 0.1))
    return fig


def _comparison_axes(ax_scatter, ax_err, comp: report.Comparison, colours_by_label: dict) -> str:
    import numpy as np

    errs = np.abs(np.array(comp.rel_errors))
    # the band is a factor either way (log axes): 90% of points have max(p/m, m/p) <= band
    factor = 1 / (1 + np.array(comp.rel_errors))  # measured / predicted
    band = float(np.percentile(np.maximum(factor, 1 / factor), 90))
    lo = min(min(v[0] + v[1]) for v in comp.groups.values()) / 1.5
    hi = max(max(v[0] + v[1]) for v in comp.groups.values()) * 1.5
    xs = np.array([lo, hi])
    ax_scatter.fill_between(
        xs,
        xs / band,
        xs * band,
        color="#cccccc",
        alpha=0.6,
        lw=0,
        label=f"90% of points within a factor {band:.2f}",
    )
    ax_scatter.plot(xs, xs, color="black", lw=0.8, label="predicted = measured")
    palette = iter(["#7f7f7f", "#17becf", "#bcbd22", "#8c564b", "#e377c2"])
    for key in sorted(comp.groups):
        pred, meas, ctx = comp.groups[key]
        c = colours_by_label.get(key) or next(palette, "#7f7f7f")
        ax_scatter.scatter(pred, meas, s=14, color=c, label=key, zorder=3, edgecolor="black", linewidth=0.3)
        ax_err.scatter(
            ctx,
            [100 * (p / m - 1) for p, m in zip(pred, meas)],
            s=14,
            color=c,
            zorder=3,
            edgecolor="black",
            linewidth=0.3,
        )
    ax_scatter.set_xscale("log")
    ax_scatter.set_yscale("log")
    ax_scatter.set_xlim(lo, hi)
    ax_scatter.set_ylim(lo, hi)
    ax_scatter.set_aspect("equal")
    ax_scatter.set_xlabel("predicted (us, log scale)")
    ax_scatter.set_ylabel("measured (us, log scale)")
    ax_scatter.set_title(comp.title)
    ax_scatter.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7, frameon=False)  # beside: no data hidden
    ax_err.axhline(0, color="black", lw=0.8)
    ax_err.set_xscale("log", base=2)
    ax_err.set_xlabel("context (tokens)")
    ax_err.set_ylabel("error (%): predicted / measured - 1")
    ax_err.set_title("error vs context")
    ctxs = [c for v in comp.groups.values() for c in v[2]]
    _context_axis(ax_err, ctxs)
    n = len(errs)
    return (
        f"{comp.path.name}: {n} points, median |error| {100 * float(np.median(errs)):.0f}%, "
        f"90th percentile {100 * float(np.percentile(errs, 90)):.0f}%. {comp.model_note}"
    )


def measured_page(inp: Inputs) -> Figure:
    colours = series_colours(inp.series)
    by_label = {s.label: colours[s] for s in inp.series}
    by_label.update({f"kvq_kivi {s.bits}-bit": colours[s] for s in inp.series if s.method == "kivi"})
    by_label.update({f"kvq {s.bits}-bit": colours[s] for s in inp.series if s.method == "kivi"})
    by_label.update({"kvq_fp16": "black", "kvq fp16": "black"})
    comps = [report.kernel_comparison(inp.measurements_dir), report.e2e_comparison(inp.measurements_dir, "llama-7b")]
    fig = _page("Predicted vs measured decode latency", "Grey band: the spread that holds 90% of the points.")
    usable = [c for c in comps if c.missing is None]
    notes = [c.missing for c in comps if c.missing]
    gs = fig.add_gridspec(len(usable) or 1, 2, left=0.06, right=0.97, top=0.85, bottom=0.2, wspace=0.9, hspace=0.45)
    for i, comp in enumerate(usable):
        notes.insert(i, _comparison_axes(fig.add_subplot(gs[i, 0]), fig.add_subplot(gs[i, 1]), comp, by_label))
    if not usable:
        notes.insert(0, "No measurement file could be used:")
    _explain(fig, "\n".join(notes), y=0.13 if usable else 0.8)
    return fig


def quality_page(inp: Inputs) -> Figure:
    q = report.quality(inp.quality_dir)
    fig = _page(
        "Quality vs average KV bits", "Perplexity (lower is better) against bits per K/V element; line: Pareto front."
    )
    if q.missing:
        _explain(fig, q.missing, y=0.8)
        return fig
    colours = series_colours(inp.series)
    by_method = {s.method: colours[s] for s in inp.series}
    groups = sorted({(r["model"], r["protocol"]) for r in q.rows})
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    fig.subplots_adjust(left=0.08, right=0.8, top=0.85, bottom=0.12, wspace=0.25)
    for ax, (model, protocol) in zip(axes, groups):
        rows = [r for r in q.rows if (r["model"], r["protocol"]) == (model, protocol)]
        front = report.pareto([(r["avg_bits"], r["ppl"]) for r in rows])
        ax.step(*zip(*front), where="post", color="black", lw=0.9, zorder=2)
        for r in rows:
            ax.scatter(
                [r["avg_bits"]],
                [r["ppl"]],
                color=by_method.get(r["method"], "#7f7f7f"),
                s=30,
                zorder=3,
                edgecolor="black",
                linewidth=0.4,
            )
        ax.set_xlabel("average bits per K/V element")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{model or 'model'}, {protocol} protocol")
    methods = sorted({r["method"] for r in q.rows})
    handles = [Line2D([], [], color=by_method.get(m, "#7f7f7f"), marker="o", ls="", label=m) for m in methods]
    fig.legend(handles=handles, title="method", loc="upper left", bbox_to_anchor=(0.81, 0.85))
    if q.skipped:
        _explain(fig, "skipped:\n" + "\n".join(q.skipped), y=0.06)
    return fig


PAGES = (
    title_page,
    memory_page,
    max_context_page,
    max_batch_page,
    latency_page,
    roofline_page,
    measured_page,
    quality_page,
)


def build_pages(inp: Inputs) -> list[Figure]:
    """Every page, in order (call inside `matplotlib.rc_context(rc())`)."""
    return [page(inp) for page in PAGES]
