"""The pages of `kvq-sim report` as matplotlib Figures (Agg/PDF, no pyplot state), drawn from a `ReportData`.

Figures compute nothing a reader sees: every number comes from `report_data`. One colour per method family
(kivi 2/3/4-bit share one), one marker per bit width and, on line plots, one line style per series within its
family, so a series looks the same on every page; fp16 is always black. Token counts are exact ("134,400
tokens", as `kvq-sim plan` prints them); context axes count KiTok and say 1 KiTok = 1,024 tokens.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from matplotlib.axis import Tick
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from .report_data import (
    INTERVAL_PCT,
    MEMORY_PARTS,
    ROOFLINE_BATCHES,
    ROOFLINE_CONTEXT,
    SPREAD_PCT,
    Comparison,
    ReportData,
    Series,
    bits_value,
    provenance_rows,
)

PAGE_SIZE_IN = (11.0, 7.0)  # landscape; each page one figure
BOUND_MARKERS = {"kv": "o", "weights": "s", "compute": "^", "launch": "x", "interconnect": "D"}
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
#: baselines keep fixed colours; the other method families take FAMILY_COLOURS in order (the report's
#: series first, so the pages with few methods get the strongest colours)
FIXED_COLOURS = {"fp16": "black", "full": "#7f7f7f"}
#: 26 colours told apart on white (Trubetskoy's 20 distinct colours without white, grey and black, plus 9)
FAMILY_COLOURS = (
    "#4363d8",  # blue
    "#e6194b",  # red
    "#3cb44b",  # green
    "#f58231",  # orange
    "#911eb4",  # purple
    "#42d4f4",  # cyan
    "#f032e6",  # magenta
    "#9a6324",  # brown
    "#469990",  # teal
    "#bfef45",  # lime
    "#800000",  # maroon
    "#808000",  # olive
    "#000075",  # navy
    "#ffe119",  # yellow
    "#fabed4",  # pink
    "#dcbeff",  # lavender
    "#aaffc3",  # mint
    "#ffd8b1",  # apricot
    "#b8860b",  # dark gold
    "#006400",  # dark green
    "#ffb000",  # amber
    "#708090",  # slate grey
    "#4b0082",  # indigo
    "#c71585",  # violet red
    "#2f4f4f",  # dark slate
    "#ff7f50",  # coral
)
#: bit specs in increasing order take these markers; fp16 (no bit spec) is always a star
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "d")
FP16_MARKER = "*"
LINESTYLES = ("-", "--", ":", "-.")
KITOK = 1024  # tokens per KiTok, the unit of every context axis
CONTEXT_AXIS = "context (KiTok = 1,024 tokens)"


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


@dataclass(frozen=True)
class Styles:
    """Colour per method family, marker per bit width, line style per series within its family."""

    colours: dict[str, str]
    markers: dict[str | None, str]
    linestyles: dict[Series, str]

    def colour(self, method: str) -> str:
        return self.colours[method]

    def marker(self, bits: str | None) -> str:
        return self.markers[bits]

    def handle(self, s: Series, line: bool = True, marker: bool = True) -> Line2D:
        return Line2D(
            [],
            [],
            color=self.colour(s.method),
            lw=1.6 if line else 0,
            ls=self.linestyles.get(s, "-") if line else "",
            marker=self.marker(s.bits) if marker else "",
            markeredgecolor="black",
            markeredgewidth=0.4,
            label=s.label,
        )


def styles(d: ReportData) -> Styles:
    others = [m for m in d.methods if m not in FIXED_COLOURS]
    colours = {m: FIXED_COLOURS[m] for m in d.methods if m in FIXED_COLOURS}
    colours.update({m: FAMILY_COLOURS[i % len(FAMILY_COLOURS)] for i, m in enumerate(others)})
    specs = [b for b in d.bits if b is not None]
    markers = {None: FP16_MARKER} | {b: MARKERS[i % len(MARKERS)] for i, b in enumerate(specs)}
    linestyles = {}
    for m in dict.fromkeys(s.method for s in d.inputs.series):
        family = sorted((s for s in d.inputs.series if s.method == m), key=lambda s: bits_value(s.bits))
        linestyles.update({s: LINESTYLES[i % len(LINESTYLES)] for i, s in enumerate(family)})
    return Styles(colours, markers, linestyles)


def tokens(n: int) -> str:
    """134400 -> '134,400': exact, as `kvq-sim plan` prints token counts."""
    return f"{n:,}"


def _context_axis(ax, contexts, axis="x") -> None:
    """Log2 context axis in KiTok (1 KiTok = 1,024 tokens), ticks every 4x: 1, 4, 16, ..., 1,024."""
    lo, hi = min(contexts), max(contexts)
    ticks = [1 << k for k in range(0, 40, 2) if lo <= (1 << k) <= hi]
    a = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log", base=2)
    a.set_major_locator(FixedLocator(ticks))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v / KITOK:,g}"))
    a.set_minor_locator(NullLocator())


def _log_axis(axis, lo: float, hi: float) -> None:
    """Plain-number log ticks: 1-2-5 steps over less than two decades, decades only over more (no overlap)."""
    subs = (1.0, 2.0, 5.0) if hi / lo < 100 else (1.0,)
    axis.set_major_locator(LogLocator(base=10, subs=subs))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
    axis.set_minor_formatter(NullFormatter())


def _page(title: str, subtitle: str = "") -> Figure:
    fig = Figure(figsize=PAGE_SIZE_IN)
    subtitle = textwrap.fill(subtitle, 135)
    fig.suptitle(title, x=0.02, y=0.975, ha="left", fontsize=14, fontweight="bold")
    if subtitle:
        fig.text(0.02, 0.925, subtitle, ha="left", va="top", fontsize=9.5, color="#333333")
    return fig


def _explain(fig: Figure, text: str, y: float = 0.8, gid: str | None = None) -> None:
    body = "\n".join(textwrap.fill(line, 120, subsequent_indent="    ") if line else "" for line in text.splitlines())
    fig.text(0.04, y, body, ha="left", va="top", family="DejaVu Sans Mono", fontsize=9, gid=gid)


def page_text(fig: Figure) -> list[str]:
    """Every visible text of a page in artist order: titles, axis labels, notes, legends, annotations; not
    tick labels (matplotlib's locators place them, differently in another release) nor the title page's
    versions line (gid 'versions'). What the page says, for the report's fingerprint."""
    ticks = {id(t) for tick in fig.findobj(Tick) for t in (tick.label1, tick.label2)}
    return [
        t.get_text()
        for t in fig.findobj(Text)
        if t.get_visible() and t.get_text().strip() and t.get_gid() != "versions" and id(t) not in ticks
    ]


def _group_title(gpus: tuple[str, ...], usable_gib: float) -> str:
    return f"{', '.join(gpus)} ({usable_gib:.2f} GiB usable)"


def _same_memory_note(d: ReportData) -> str:
    """Why some GPUs share a panel on the memory-only pages, or '' when each has its own."""
    same = [g for g in d.memory_groups if len(g) > 1]
    return "".join(
        f" {' and '.join(g)} have the same usable memory and reserve, so the same limits: one panel." for g in same
    )


# ---- pages ------------------------------------------------------------------------------------------


def title_page(d: ReportData) -> Figure:
    inp = d.inputs
    fig = _page(
        f"kvq-sim report: {inp.model}", "memory, context limits, decode speed and quality of quantized KV caches"
    )
    hw_lines = [
        f"  {g.name:<12} {g.usable_gib:6.2f} GiB usable  {g.hbm_gb_s:6,.0f} GB/s  "
        f"{g.fp16_tflops:5,.0f} TFLOP/s fp16   latency efficiencies: {g.calibration}"
        for g in d.gpus
    ]
    lines = [
        "inputs",
        f"  model      {inp.model}   (fp16 weights, batch 1 unless a page says otherwise, 1 GPU each)",
        f"  GPUs       {', '.join(inp.gpus)}",
        f"  KV series  {', '.join(s.label for s in inp.series)}",
        f"  contexts   {tokens(min(inp.contexts))} .. {tokens(max(inp.contexts))} tokens, powers of 2 "
        f"(axes in KiTok: 1 KiTok = 1,024 tokens)",
        f"  measured   {inp.measurements_dir}/    quality: {inp.quality_dir}/",
        "",
        "hardware",
        *hw_lines,
        "",
        "pages",
        "  1 this page",
        "  2 memory breakdown at each method's max context (batch 1)",
        "  3 max context vs average KV bits per element",
        "  4 max batch vs context",
        "  5 decode step time (batch 1) and throughput (max batch) vs context, with the bounding resource",
        "  6 where each decode-time term comes from: measured on the GPU, transferred from another, or a prior",
        "  7 roofline of the decode step's operators",
        "  8 predicted vs measured latency",
        f"  9 quality: perplexity change vs the full cache ({INTERVAL_PCT}% intervals) against bits held, one panel per window",
        " 10 quality numbers: bits held, perplexity, change and its interval per cache",
        "",
        "regenerate: kvq-sim report --model "
        + inp.model
        + "".join(f" --gpu {g}" for g in inp.gpus)
        + " --methods "
        + ",".join(s.method if s.bits is None else f"{s.method}:{s.bits}" for s in inp.series)
        + " -o <file>.pdf",
    ]
    _explain(fig, "\n".join(lines), y=0.86)
    date = d.date.strftime("%Y-%m-%d (SOURCE_DATE_EPOCH)") if d.date else "omitted so that the PDF is reproducible"
    env = "versions\n  " + "   ".join(f"{k} {v}" for k, v in d.versions.items()) + f"\n  date: {date}"
    _explain(fig, env, y=0.16, gid="versions")
    return fig


def memory_page(d: ReportData) -> Figure:
    st = styles(d)
    fig = _page(
        "Memory per GPU at each method's max context (batch 1)",
        "Bars stack every byte the simulator counts; the label at the left end of each bar is the max context "
        "(tokens) and the KV average bits per element (metadata included). Dashed: usable memory."
        + _same_memory_note(d),
    )
    axes = fig.subplots(1, len(d.memory_groups), sharey=True, squeeze=False)[0]
    fig.subplots_adjust(left=0.13, right=0.98, top=0.8, bottom=0.2, wspace=0.12)
    used_parts = set()
    for ax, group in zip(axes, d.memory_groups):
        bars = d.memory[group[0]]
        y = list(range(len(bars)))[::-1]
        left = [0.0] * len(bars)
        for (label, _), colour in zip(MEMORY_PARTS, PART_COLOURS):
            w = [b.gib[label] for b in bars]
            if any(x > 0 for x in w):
                used_parts.add(label)
            ax.barh(y, w, left=left, color=colour, height=0.7, label=label, edgecolor="white", linewidth=0.3)
            left = [a + b for a, b in zip(left, w)]
        usable = bars[0].usable_gib
        ax.axvline(usable, color="black", lw=0.8, ls="--")
        for yi, b in zip(y, bars):
            ctx = "sliding window" if b.max_context is None else f"{tokens(b.max_context)} tokens"
            ax.text(
                usable * 0.02,
                yi,
                f"{ctx}, {b.avg_bits:.2f} bits",
                va="center",
                ha="left",
                fontsize=7.5,
                color="white",
                fontweight="bold",
            )
        ax.set_xlim(0, usable * 1.04)
        ax.set_title(_group_title(group, usable), fontsize=10)
        ax.set_xlabel("memory per GPU (GiB)")
        ax.grid(axis="y", visible=False)
        ax.set_yticks(y)
        ax.set_yticklabels([b.series.label for b in bars])
        for tick, b in zip(ax.get_yticklabels(), bars):
            tick.set_color(st.colour(b.series.method))
    handles = [
        Line2D([], [], color=c, lw=8, label=label)
        for (label, _), c in zip(MEMORY_PARTS, PART_COLOURS)
        if label in used_parts
    ]
    fig.legend(handles=handles, loc="lower center", ncol=5, frameon=False, bbox_to_anchor=(0.5, 0.01))
    return fig


def _series_legend(
    fig: Figure, d: ReportData, line: bool = True, marker: bool = True, extra=(), y=0.85, tags=None
) -> None:
    """The KV series' legend; `tags` (series -> text) adds a second line to each entry."""
    st = styles(d)
    handles = [st.handle(s, line, marker) for s in d.inputs.series]
    if tags:
        for h, s in zip(handles, d.inputs.series):
            h.set_label(f"{s.label}\n{tags[s]}")
    leg = fig.legend(handles=handles, title="KV series", loc="upper left", bbox_to_anchor=(0.81, y))
    if extra:
        fig.add_artist(leg)
        fig.legend(handles=list(extra), title=extra[0].get_gid(), loc="lower left", bbox_to_anchor=(0.81, 0.1))


def max_context_page(d: ReportData) -> Figure:
    st = styles(d)
    fig = _page(
        "Max context at batch 1 vs KV bits per element",
        "Average bits at the max context, metadata included; dashed line: fp16 KV." + _same_memory_note(d),
    )
    axes = fig.subplots(1, len(d.memory_groups), sharey=True, squeeze=False)[0]
    fig.subplots_adjust(left=0.08, right=0.79, top=0.82, bottom=0.12, wspace=0.08)
    all_ctx = [b.max_context for bars in d.memory.values() for b in bars if b.max_context]
    if not all_ctx:  # a sliding window caps every cache: no context is too long for memory
        for ax in axes:
            ax.set_axis_off()
        axes[0].text(0.02, 0.5, "Any context fits in memory at batch 1: the model's sliding window caps the KV cache.",
                     transform=axes[0].transAxes, fontsize=11)  # fmt: skip
        return fig
    for ax, group in zip(axes, d.memory_groups):
        bars = d.memory[group[0]]
        # (bits, context) order; series that tie on both keep the methods' order (series do not compare)
        pts = sorted(((b.avg_bits, b.max_context, b.series) for b in bars if b.max_context), key=lambda p: p[:2])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="#999999", lw=0.8, ls=":", zorder=1)
        for x, c, s in pts:
            ax.scatter(
                [x],
                [c],
                color=st.colour(s.method),
                marker=st.marker(s.bits),
                s=60,
                zorder=3,
                edgecolor="black",
                linewidth=0.4,
            )
        fp16 = next((b for b in bars if b.series.method == "fp16"), None)
        if fp16 and fp16.max_context:
            ax.axhline(fp16.max_context, color="black", lw=0.7, ls="--", zorder=0)
            ax.annotate(
                f"fp16: {tokens(fp16.max_context)} tokens",
                (0.3, fp16.max_context),
                textcoords="offset points",
                xytext=(0, 3),
                ha="left",
                va="bottom",
                fontsize=8,
            )
        ax.set_title(_group_title(group, bars[0].usable_gib), fontsize=10)
        ax.set_xlim(0, 17)
        ax.set_xlabel("KV average bits per element\n(codes + metadata + fp16 window)")
        _context_axis(ax, [min(all_ctx) / 2, max(all_ctx) * 2], axis="y")
        ax.set_ylim(min(all_ctx) / 1.6, max(all_ctx) * 1.6)
    axes[0].set_ylabel("max context at batch 1 (KiTok, log scale; 1 KiTok = 1,024 tokens)")
    _series_legend(fig, d, line=False)
    return fig


def _per_gpu_axes(fig: Figure, n: int, rows: int = 1, **adjust):
    axes = fig.subplots(rows, n, sharex=True, sharey="row", squeeze=False)
    fig.subplots_adjust(**{"left": 0.08, "right": 0.79, "top": 0.82, "bottom": 0.1, "wspace": 0.08} | adjust)
    return axes


def max_batch_page(d: ReportData) -> Figure:
    st = styles(d)
    inp = d.inputs
    fig = _page(
        "Max batch vs context",
        "Sequences of the given length that fit at once on one GPU (log axes); the batch that fits depends on "
        "memory alone." + _same_memory_note(d),
    )
    axes = _per_gpu_axes(fig, len(d.memory_groups))[0]
    for ax, group in zip(axes, d.memory_groups):
        for s in inp.series:
            sw = d.sweeps[group[0], s]
            ax.plot(
                sw.contexts,
                sw.max_batch,
                color=st.colour(s.method),
                ls=st.linestyles[s],
                lw=1.6,
                marker=st.marker(s.bits),
                ms=5,
                markeredgecolor="black",
                markeredgewidth=0.3,
                label=s.label,
            )
        _context_axis(ax, inp.contexts)
        ax.set_yscale("log")
        _log_axis(ax.yaxis, 1, max(max(sw.max_batch, default=1) for sw in d.sweeps.values()))
        ax.set_title(_group_title(group, d.memory[group[0]][0].usable_gib), fontsize=10)
        ax.set_xlabel(CONTEXT_AXIS, fontsize=9)
    axes[0].set_ylabel("max batch (sequences, log scale)")
    _series_legend(fig, d)
    return fig


def latency_page(d: ReportData) -> Figure:
    st = styles(d)
    inp = d.inputs
    fig = _page(
        "Decode speed vs context",
        "Top: one decode step at batch 1. Bottom: generated tokens/s at the max batch that fits that context. "
        "Line style: the series within its method's colour; marker: the resource with the largest share of the step. "
        "Legend: whether kvq has a measured kernel for the series' KV read; page 6 names the source of every term. "
        "Under each GPU: where its efficiencies come from.",
    )
    axes = _per_gpu_axes(fig, len(inp.gpus), rows=2, hspace=0.12, top=0.79)
    for col, g in enumerate(inp.gpus):
        top, bottom = axes[0][col], axes[1][col]
        for s in inp.series:
            sw = d.sweeps[g, s]
            c, ls = st.colour(s.method), st.linestyles[s]
            top.plot(sw.contexts, sw.step_ms, color=c, ls=ls, lw=1.4, label=s.label, zorder=2)
            bottom.plot(sw.contexts, sw.tokens_per_s, color=c, ls=ls, lw=1.4, label=s.label, zorder=2)
            for ax, ys, bounds in ((top, sw.step_ms, sw.bound), (bottom, sw.tokens_per_s, sw.bound_at_max_batch)):
                for bound, m in BOUND_MARKERS.items():
                    pts = [(x, y) for x, y, b in zip(sw.contexts, ys, bounds) if b == bound]
                    if pts:
                        ax.scatter(
                            *zip(*pts),
                            marker=m,
                            s=16,
                            color=c,
                            zorder=3,
                            facecolor="none" if m != "x" else c,
                            linewidth=0.9,
                        )
        top.set_title(f"{g}\n{d.gpus[col].calibration}", fontsize=8)
        for ax in (top, bottom):
            ax.set_yscale("log")
            _context_axis(ax, inp.contexts)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
        bottom.set_xlabel(CONTEXT_AXIS, fontsize=8)
    axes[0][0].set_ylabel("decode step, batch 1 (ms)")
    axes[1][0].set_ylabel("tokens/s at max batch")
    used = {b for sw in d.sweeps.values() for b in sw.bound + sw.bound_at_max_batch}
    bound_handles = [
        Line2D([], [], color="black", marker=m, ls="", markerfacecolor="none", label=b, gid="bound (largest term)")
        for b, m in BOUND_MARKERS.items()
        if b in used
    ]
    _series_legend(fig, d, marker=False, extra=bound_handles, tags=d.kv_read_tags)
    return fig


#: text colour of each provenance kind on the provenance page
KIND_COLOURS = {"measured": "#1a7f37", "transferred": "#9a6700", "prior": "#cf222e", "none": "#6e7781"}


def provenance_page(d: ReportData) -> Figure:
    inp = d.inputs
    fig = _page(
        "Where each decode-time term comes from",
        "measured: fitted to this GPU's own measurements; transferred: another GPU's fit carried over by the "
        "named rule (docs/validation.md, docs/transfer-rules.md); prior: a default, not measured; none: the term "
        "does not apply. The texts are those `kvq-sim plan` prints for the same deployment (fp16 weights, 1 GPU). "
        "A KV series without a measured kvq kernel says so on its KV read line and in the legend of page 5.",
    )
    rows = {g: provenance_rows(d, g) for g in inp.gpus}
    width = max(len(label) for r in rows.values() for label, _ in r) + 2
    # one line per row (wrapped texts take more) and 1.5 per GPU heading share 0.77 of the page height
    size = 6.5
    char = 0.602 * size / (PAGE_SIZE_IN[0] * 72)  # DejaVu Sans Mono advance, as a fraction of the page width
    wrap = int(0.93 / char) - width - 13
    lines = {g: [(label, src, textwrap.wrap(src.text, wrap) or [""]) for label, src in r] for g, r in rows.items()}
    n = sum(len(w) for r in lines.values() for _, _, w in r) + 1.5 * len(inp.gpus)
    step = min(0.0165, 0.77 / n)
    size *= step / 0.0165
    char *= step / 0.0165
    mono = dict(family="DejaVu Sans Mono", fontsize=size, va="top")
    y = 0.79
    for g, facts in zip(inp.gpus, d.gpus):
        fig.text(0.03, y, f"{g}  (latency efficiencies: {facts.calibration})", **mono | {"fontsize": size + 1.5},
                 fontweight="bold")  # fmt: skip
        y -= step
        for label, src, wrapped in lines[g]:
            fig.text(0.04, y, label, **mono)
            fig.text(0.04 + char * width, y, src.kind, color=KIND_COLOURS[src.kind], fontweight="bold", **mono)
            for line in wrapped:
                fig.text(0.04 + char * (width + 13), y, line, **mono)
                y -= step
        y -= step / 2
    return fig


def roofline_page(d: ReportData) -> Figure:
    import numpy as np

    st = styles(d)
    inp = d.inputs
    fig = _page(
        "Roofline of the decode step",
        f"Solid: datasheet HBM bandwidth and fp16 dense peak; dashed: with the efficiencies kvq-sim uses. Attention "
        f"at {tokens(ROOFLINE_CONTEXT)} tokens, batch 1; GEMMs (all weight matrices) at batch "
        f"{', '.join(map(str, ROOFLINE_BATCHES))}.",
    )
    axes = _per_gpu_axes(fig, len(inp.gpus), right=0.76)[0]
    x = np.logspace(-1, 3.5, 200)
    for ax, g in zip(axes, inp.gpus):
        r = d.rooflines[g]
        ax.plot(x, np.minimum(r.peak_tflops, x * r.hbm_tb_s), color="#444444", lw=1.2)
        ax.plot(x, np.minimum(r.eff_peak_tflops, x * r.eff_weight_tb_s), color="#444444", lw=1.0, ls="--")
        for p in r.points:
            if p.series is None:
                ax.scatter(
                    [p.intensity], [p.tflops], marker="s", color="#bbbbbb", s=30, zorder=3, edgecolor="black", lw=0.4
                )
                ax.annotate(
                    f"b={p.batch}",
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
                    marker=st.marker(p.series.bits),
                    color=st.colour(p.series.method),
                    s=30,
                    zorder=4,
                    edgecolor="black",
                    linewidth=0.4,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(0.05, r.peak_tflops * 2.5)
        ax.set_title(f"{g}\n{r.hbm_tb_s:.2f} TB/s, {r.peak_tflops:,.0f} TFLOP/s", fontsize=9)
        ax.set_xlabel("arithmetic intensity\n(FLOP/byte)", fontsize=9)
    axes[0].set_ylabel("attainable TFLOP/s (log scale)")
    extra = [
        Line2D([], [], color="#bbbbbb", marker="s", ls="", markeredgecolor="black", label="weight GEMMs\n(b = batch)"),
        Line2D([], [], color="#444444", lw=1.2, label="datasheet roof"),
        Line2D([], [], color="#444444", lw=1.0, ls="--", label="effective roof"),
    ]
    leg = fig.legend(
        handles=[st.handle(s, line=False) for s in inp.series],
        title="attention of",
        loc="upper left",
        bbox_to_anchor=(0.78, 0.85),
    )
    fig.add_artist(leg)
    fig.legend(handles=extra, loc="lower left", bbox_to_anchor=(0.78, 0.1))
    return fig


def _comparison_axes(ax_scatter, ax_leg, ax_err, comp: Comparison, st: Styles) -> str:
    lo = min(min(g.predicted_us + g.measured_us) for g in comp.groups) / 1.5
    hi = max(max(g.predicted_us + g.measured_us) for g in comp.groups) * 1.5
    scale, unit = (1e3, "ms") if lo >= 1e3 else (1.0, "us")  # whole steps in ms, kernels in us
    lo, hi = lo / scale, hi / scale
    band = comp.band_factor
    ax_scatter.fill_between([lo, hi], [lo / band, hi / band], [lo * band, hi * band], color="#cccccc", alpha=0.6, lw=0)
    ax_scatter.plot([lo, hi], [lo, hi], color="black", lw=0.8)
    handles = [
        Line2D([], [], color="#cccccc", lw=6, label=f"{SPREAD_PCT}% of points within a factor {band:.2f}"),
        Line2D([], [], color="black", lw=0.8, label="predicted = measured"),
    ]
    for i, g in enumerate(comp.groups):
        # a second implementation of the same format (sdpa beside kvq fp16) is drawn hollow
        hollow = any((h.method, h.bits) == (g.method, g.bits) for h in comp.groups[:i])
        kw = dict(
            marker=st.marker(g.bits),
            s=16,
            zorder=3,
            linewidth=0.8 if hollow else 0.3,
            edgecolor=st.colour(g.method) if hollow else "black",
            facecolor="none" if hollow else st.colour(g.method),
        )
        ax_scatter.scatter([p / scale for p in g.predicted_us], [m / scale for m in g.measured_us], **kw)
        ax_err.scatter(g.context, [100 * (p / m - 1) for p, m in zip(g.predicted_us, g.measured_us)], **kw)
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker=kw["marker"],
                markerfacecolor=kw["facecolor"],
                markeredgecolor=kw["edgecolor"],
                markeredgewidth=kw["linewidth"],
                label=g.label,
            )
        )
    ax_scatter.set_xscale("log")
    ax_scatter.set_yscale("log")
    ax_scatter.set_xlim(lo, hi)
    ax_scatter.set_ylim(lo, hi)
    _log_axis(ax_scatter.xaxis, lo, hi)
    _log_axis(ax_scatter.yaxis, lo, hi)
    ax_scatter.set_aspect("equal")
    ax_scatter.set_xlabel(f"predicted ({unit}, log scale)")
    ax_scatter.set_ylabel(f"measured ({unit}, log scale)")
    ax_scatter.set_title(comp.title, fontsize=10)
    ax_leg.axis("off")
    ax_leg.legend(handles=handles, loc="center left", fontsize=7.5, frameon=False)
    ax_err.axhline(0, color="black", lw=0.8)
    ax_err.set_xlabel(CONTEXT_AXIS, fontsize=8)
    ax_err.set_ylabel("error (%)")
    ax_err.set_title("error vs context", fontsize=10)
    ctxs = [c for g in comp.groups for c in g.context]
    _context_axis(ax_err, ctxs)
    ax_err.set_xlim(min(ctxs) / 1.5, max(ctxs) * 1.5)
    return (
        f"{comp.path.name}: {len(comp.rel_errors)} points, error = predicted / measured - 1, "
        f"median |error| {comp.median_abs_error_pct:.1f}%, "
        f"{SPREAD_PCT}th percentile {comp.p90_abs_error_pct:.1f}%. {comp.model_note}"
    )


def measured_page(d: ReportData) -> Figure:
    st = styles(d)
    fig = _page(
        "Predicted vs measured decode latency",
        f"Grey band: the factor either way that holds {SPREAD_PCT}% of the points; hollow markers: a second "
        "implementation of the same format.",
    )
    usable = [c for c in d.comparisons if c.missing is None]
    notes = [c.missing for c in d.comparisons if c.missing]
    gs = fig.add_gridspec(
        len(usable) or 1,
        3,
        width_ratios=(1.0, 0.85, 1.5),
        left=0.07,
        right=0.98,
        top=0.86,
        bottom=0.2,
        wspace=0.35,
        hspace=0.55,
    )
    for i, comp in enumerate(usable):
        axes = (fig.add_subplot(gs[i, 0]), fig.add_subplot(gs[i, 1]), fig.add_subplot(gs[i, 2]))
        notes.insert(i, _comparison_axes(*axes, comp, st))
    if not usable:
        notes.insert(0, "No measurement file could be used:")
    _explain(fig, "\n".join(notes), y=0.12 if usable else 0.8)
    return fig


def _change_axis(axis, values: list[float]) -> None:
    """Symmetric-log percent axis: linear within +-1%, decades beyond; ticks 0, +-1, +-10, ... over the data."""
    hi, lo = max(max(values), 1.0), min(min(values), 0.0)
    ticks = (
        [0.0]
        + [10.0**k for k in range(0, 6) if 10.0 ** (k - 1) < hi]
        + [-(10.0**k) for k in range(0, 6) if 10.0 ** (k - 1) < -lo]
    )
    axis.set_major_locator(FixedLocator(sorted(ticks)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: "0%" if v == 0 else f"{v:+,g}%"))
    axis.set_minor_locator(NullLocator())


def quality_page(d: ReportData) -> Figure:
    q = d.quality
    models = sorted({p.model for p in q.panels})
    fig = _page(
        "Quality vs KV bits held",
        f"Pooled perplexity change against the full cache (lower is better), error bars its {INTERVAL_PCT}% interval (paired "
        "window bootstrap), against the bits per K/V element held while scoring; line: Pareto front; the change "
        "axis is linear within +-1%, logarithmic beyond. One panel per protocol and window length (tokens in the "
        "cache when scored)" + (f"; model {models[0]}." if len(models) == 1 else ".") + " Page 10 lists the numbers.",
    )
    if q.missing:
        _explain(fig, q.missing, y=0.8)
        return fig
    st = styles(d)
    axes = fig.subplots(1, len(q.panels), squeeze=False)[0]
    fig.subplots_adjust(left=0.07, right=0.74, top=0.8, bottom=0.2, wspace=0.3)
    for ax, p in zip(axes, q.panels):
        ax.step(*zip(*p.front), where="post", color="black", lw=0.9, zorder=2)
        for r in p.rows:
            if r.interval_pct is not None:
                low, high = r.interval_pct
                ax.errorbar([r.held_bits], [r.change_pct], yerr=[[r.change_pct - low], [high - r.change_pct]],
                            color=st.colour(r.method), lw=0.9, capsize=2, zorder=2.5, ls="")  # fmt: skip
            ax.scatter(
                [r.held_bits],
                [r.change_pct],
                color=st.colour(r.method),
                marker=st.marker(r.bits),
                s=30,
                zorder=3,
                edgecolor="black",
                linewidth=0.4,
            )
        ax.set_yscale("symlog", linthresh=1.0, linscale=0.6)
        _change_axis(ax.yaxis, [v for r in p.rows for v in (r.change_pct, *(r.interval_pct or ()))])
        ax.set_xlabel("bits held per K/V element")
        model = "" if len(models) == 1 else f"{p.model}, "
        ax.set_title(f"{model}{p.title}", fontsize=10)
        if p.without_interval:
            note = f"no interval: {', '.join(p.without_interval)}"
            if p.reference:
                note += f"; change from perplexity against the {p.reference}"
            ax.text(0, -0.2, textwrap.fill(note, 45), transform=ax.transAxes, fontsize=7, va="top", color="#555555")
    axes[0].set_ylabel("perplexity change vs full cache")
    methods = [m for m in d.methods if any(r.method == m for p in q.panels for r in p.rows)]
    bits = [b for b in d.bits if any(r.bits == b for p in q.panels for r in p.rows)]
    method_handles = [Line2D([], [], color=st.colour(m), lw=6, label=m) for m in methods]
    no_spec = [m for m in methods if any(r.method == m and r.bits is None for p in q.panels for r in p.rows)]
    bits_handles = [
        Line2D(
            [], [], color="white", marker=st.marker(b), markeredgecolor="black", ls="",
            label=b or f"none ({', '.join(no_spec)})",
        )
        for b in bits
    ]  # fmt: skip
    leg = fig.legend(
        handles=method_handles, title="method (colour)", ncol=2, loc="upper left", bbox_to_anchor=(0.75, 0.82),
        fontsize=8,
    )  # fmt: skip
    fig.add_artist(leg)
    fig.legend(handles=bits_handles, title="bits (marker)", loc="lower left", bbox_to_anchor=(0.75, 0.06), fontsize=8)
    return fig


def quality_table_page(d: ReportData) -> Figure:
    q = d.quality
    fig = _page(
        "Quality numbers",
        "Per panel of page 9, by bits held: bits per K/V element held while scoring, perplexity, and the pooled "
        f"perplexity change against the full cache with its {INTERVAL_PCT}% interval (paired window bootstrap); '-' where the "
        "file reports no interval (the change is then computed from perplexity against the named reference row).",
    )
    if q.missing:
        _explain(fig, q.missing, y=0.8)
        return fig
    blocks = []
    for p in q.panels:
        head = [f"{p.model + ', ' if p.model else ''}{p.title}", f"  {', '.join(p.files)}"]
        if p.reference:
            head.append(f"  reference for rows without change: {p.reference}")
        width = max(len(r.label) for r in p.rows) + 1
        head.append(f"  {'cache':<{width}} {'held':>6} {'ppl':>9} {'change':>8}  {INTERVAL_PCT}% interval")
        body = [
            f"  {r.label:<{width}} {r.held_bits:6.2f} {r.ppl:9.3f} {r.change_pct:+7.2f}%  "
            + ("-" if r.interval_pct is None else f"[{r.interval_pct[0]:+.2f}%, {r.interval_pct[1]:+.2f}%]")
            for r in sorted(p.rows, key=lambda r: (r.held_bits, r.label))
        ]
        blocks.append(head + body)
    # the panels side by side, each a column of monospaced lines, scaled so the longest fits the page
    column = 0.95 / len(blocks)
    longest_line = max(len(line) for b in blocks for line in b)
    longest_block = max(len(b) for b in blocks)
    size = min(
        8.0,
        column * PAGE_SIZE_IN[0] * 72 / (0.602 * longest_line),
        0.78 * PAGE_SIZE_IN[1] * 72 / (1.25 * longest_block),
    )
    for i, b in enumerate(blocks):
        fig.text(0.03 + i * column, 0.82, "\n".join(b), family="DejaVu Sans Mono", fontsize=size, va="top",
                 linespacing=1.1)  # fmt: skip
    return fig


PAGES = (
    title_page,
    memory_page,
    max_context_page,
    max_batch_page,
    latency_page,
    provenance_page,
    roofline_page,
    measured_page,
    quality_page,
    quality_table_page,
)


def build_pages(d: ReportData) -> list[Figure]:
    """Every page, in order (call inside `matplotlib.rc_context(rc())`)."""
    return [page(d) for page in PAGES]
