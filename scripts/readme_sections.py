"""Regenerate the generated sections of kvq's docs from the code: `python scripts/readme_sections.py [name ...]`.

A section sits between `<!-- name:start -->` and `<!-- name:end -->` in one file of `DOCS`; the text between the
markers is what `SECTIONS[name]()` returns now. An `<name>-output` section of `EXAMPLES` holds what the python block
of the hand-written `<name>-example` section of the same file prints when run. tests/test_readme.py regenerates
every section and fails when the committed text differs. With names, only those sections are regenerated.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from kvq_core.formats import METHODS, bits_label, get_format
from kvq_sim import report_data

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "reports" / "measurements"
QUALITY = ROOT / "reports" / "quality"
KERNEL_CSV = MEASURED / report_data.KERNEL_CSV
SUMMARIZE = ROOT / "packages" / "kvq-kernels" / "benchmarks" / "summarize.py"
NOISE = ROOT / "scripts" / "measurement_noise.py"
TOKENS, HEADS, HEAD_DIM = 32768, 32, 128


def _run(cmd: list[str], cwd: Path = ROOT, check: bool = True, stderr: bool = False) -> str:
    """stdout of `cmd` run in `cwd` (the repository root unless said otherwise); with `stderr`, its warnings on
    stderr first, as a terminal shows them before the table."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=cwd)
    return (r.stderr if stderr else "") + r.stdout


@functools.cache
def _script(*args: str) -> str:
    """stdout of this interpreter running `args` (a repository script and its arguments), once per generation: the
    README headline and a doc section quote the same comparison."""
    return _run([sys.executable, *args])


def _shown(cmd: list[str], out: str) -> str:
    """A text block showing `$ cmd` and its output."""
    return "```text\n$ " + " ".join(cmd) + "\n" + out.rstrip("\n") + "\n```\n"


# --- README.md ------------------------------------------------------------------------------------------------------

PLAN = ["kvq-sim", "plan", "--model", "llama-7b", "--gpu", "a100-80g", "--bits", "2"]


def plan_output() -> str:
    """What `make plan` prints."""
    return _shown(PLAN, _run(PLAN, stderr=True))


REPORT = ["kvq-sim", "report", "--model", "llama-7b", "--gpu", "h100-80g", "--gpu", "l40s", "-o", "llama-7b.pdf"]


def report_output() -> str:
    """`kvq-sim report` run as from the repository root (its default --measurements and --quality folders), writing
    into a temporary folder so the committed reports are not touched."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "reports").mkdir()
        for name in ("measurements", "quality"):
            os.symlink(ROOT / "reports" / name, Path(tmp) / "reports" / name)
        out = _run(REPORT, cwd=Path(tmp))
    return _shown(REPORT, out)


#: (method, bits, cache name in reports/quality) of the headline table.
HEADLINE = [
    ("fp16", None), ("int", 4), ("kivi", 4), ("kivi", 2), ("kvquant", 3), ("skvq", "k2v1.5"), ("million", 2),
]  # fmt: skip


def headline_table() -> str:
    """What each method buys for LLaMA-7B on one A100-80GB (kvq-sim) and what it costs in quality (SmolLM2)."""
    from kvq_sim import published
    from kvq_sim.api import plan

    quality = {r["cache"]: r for r in _paired_rows(QUALITY_4K)}  # one window length: the 4K-token windows
    full_4k = quality["full"]["ppl"]
    lines = [
        "| KV cache | bits/element at 32K | max context, batch 1 | max batch at 32K | tokens/s at that batch | "
        "SmolLM2, 4K-token windows: bits held, ppl change vs full [95% interval] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    gains = []
    for method, bits in HEADLINE:
        r = plan("llama-7b", "a100-80g", bits=bits, method=method, context=32768)
        name = get_format(method, bits).name
        q = quality.get(name)
        cell = "-" if q is None else f"{q['held']:.2f}, {_interval(q)}"
        lines.append(
            f"| `{name}` | {r.kv_avg_bits:.2f} | {r.max_context_batch1:,} | {r.batch} | "
            f"{r.decode.tokens_per_s:,.0f} | {cell} |"
        )
        gains.append((r.kv_avg_bits, r.max_context_batch1 / r.fp16_max_context_batch1))
    low = [g for b, g in gains if b <= 3.5]
    best_low = min((r for r in _decode_rows(("decode_4k.csv",)) if r[0] == "kvq" and r[2] < 3.0), key=lambda r: r[3])
    kernels = dict(
        re.findall(r"^\| (\d)-bit \(group 128\) vs SDPA fp16 \| [^|]+ \| ([\d.]+x) \|", kernel_table(), re.M)
    )
    mape = re.search(r"^PASS kernel: (\d+) held-out points.*?MAPE ([\d.]+%)", _run(VALIDATE, check=False), re.M)
    held = published.validate().overall("held_out")
    vs = _vs_dispatched()
    frag = {k: _gqa_speedups_128k(ROOT / csv) for k, csv in (("new", H200_KERNEL), ("old", H200_KERNEL_COLD))}
    out = _script(*H200_COLD[1:])
    cold = dict(
        kernels=re.search(r"^unchanged kernels: .*median \|error\| ([\d.]+%)", out, re.M).group(1),
        steps=re.search(r"^decode steps: .*median \|error\| ([\d.]+%)", out, re.M).group(1),
        worst=re.search(r"^unchanged kernels: .*worst ([\d.]+%)", out, re.M).group(1),
    )
    mg = re.search(
        r"^all: (\d+) steps, MAPE ([\d.]+%), signed ([-+\d.]+%)",
        _script(*MULTIGPU_H200_COLD[1:]),
        re.M,
    )
    all_line = r"^all: (\d+) steps, MAPE ([\d.]+%), signed [-+\d.]+%, median \|error\| [\d.]+%, worst ([\d.]+%)"
    l3 = re.search(all_line, _script(*LLAMA3_H200_COLD[1:]), re.M)
    runs = [(LLAMA3_V2, r) for r in LLAMA3_V2_RUNS] + [(LLAMA3_4GPU_PRED, LLAMA3_4GPU)]
    l3_again = [re.search(all_line, _script("scripts/predict_points.py", "compare-multigpu", *r), re.M) for r in runs]
    l3_now = re.search(
        all_line, _script("scripts/predict_points.py", "compare-multigpu", LLAMA3_V7, LLAMA3_V7_RUN), re.M
    )
    heads_out = _script(*H200_NEW_HEADS[1:])
    fam = dict(re.findall(r"^(\w+)\s+\d+\s+([\d.]+)\s", heads_out, re.M))
    kivi_gqa = [float(v) for k, v in fam.items() if k.startswith("kvq_kivi") and k.endswith("_gqa")]
    heads_all = re.search(r"^unchanged kernels: (\d+) points, MAPE ([\d.]+%)", heads_out, re.M)
    lines += [
        "",
        f"- At 3.5 bits or fewer per element, the same GPU holds {min(low):.1f}-{max(low):.1f}x the context of fp16 "
        "KV, and a decode step reads that much less.",
        f"- Below 3 bits stored, the best kvq cache at 4K tokens costs SmolLM2 {100 * (best_low[3] / full_4k - 1):+.1f}% "
        f"perplexity (`{best_low[1]}`). The papers report their results on 7B and larger models; this evaluation runs "
        "only SmolLM2-135M (3 KV heads of 64 channels).",
        f"- kvq's fused kernels decode attention {kernels['4']} (4-bit) and {kernels['2']} (2-bit) as fast as fp16 SDPA "
        f"flash on an H100 at batch 1 and 128K tokens, {vs['mha4']:.2f}x and {vs['mha2']:.2f}x as fast as the cuDNN "
        f"attention torch picks by itself; with GQA (32/8 heads) only {vs['gqa4']:.2f}x and {vs['gqa2']:.2f}x, and on "
        f"an H200 with GQA {vs['h200gqa4']:.2f}x and {vs['h200gqa2']:.2f}x: slower ([docs/kernels.md](docs/kernels.md); "
        "measured with the word kernel). Since then GQA 4-bit and 2-bit run the fragment kernel, which dequantizes in "
        "the matrix units' operand registers, the codes the M side of its products (a GQA group pads to 8 columns, "
        f"not 16 rows; MHA runs it too): on the H200 {frag['new'][4]:.2f}x and {frag['new'][2]:.2f}x SDPA flash "
        f"at batch 1 and 128K tokens, where the word kernel was {frag['old'][4]:.2f}x and {frag['old'][2]:.2f}x; "
        f"3-bit GQA too, since its high-bit plane pairs nibbles for the fragment kernel's loads: {frag['new'][3]:.2f}x, "
        f"from {frag['old'][3]:.2f}x ([docs/kernel-performance.md](docs/kernel-performance.md)); against cuDNN, "
        f"GQA 4-bit and 2-bit now run {vs['h200nowgqa4']:.2f}x and {vs['h200nowgqa2']:.2f}x as fast on the H200 "
        "([docs/kernels.md](docs/kernels.md)). "
        f"kvq-sim predicts {mape.group(1)} held-out kernel launches with a mean absolute error of {mape.group(2)} "
        "([docs/validation.md](docs/validation.md)).",
        f"- Predicted for an H200 from the H100 fit before it was measured, kernel launches were off by a median "
        f"{cold['kernels']} and decode steps by {cold['steps']} (worst {cold['worst']}, bandwidth-bound kernels "
        "predicted too fast); the A100 and L40S numbers are transferred by the same rules. The H200 is now "
        "calibrated on its own measurements ([docs/validation.md](docs/validation.md#the-h200-predicted-cold-then-"
        "measured-and-calibrated)). On a 4x H200 NVLink node, where nothing multi-GPU had been measured, "
        f"{mg.group(1)} decode steps (TP 1-4, CP 2-4) of Llama-7B and Llama-2-70B predicted beforehand were off by "
        f"{mg.group(2)} (signed {mg.group(3)}) ([docs/validation.md](docs/validation.md#several-gpus-of-a-second-type-"
        f"4x-h200-nvlink)); {l3.group(1)} steps of Llama-3-8B (GQA; no fit has seen it) on one H200, by {l3.group(2)} "
        f"(worst {l3.group(3)}), after the H200's recalibration {sum(int(m.group(1)) for m in l3_again)} more on "
        f"1, 2 and 4 H200s by {', '.join(m.group(2) for m in l3_again)} (worst "
        f"{max(float(m.group(3)[:-1]) for m in l3_again):.2f}%), and {l3_now.group(1)} more on one H200 with the "
        f"current kernels by {l3_now.group(2)} (worst {l3_now.group(3)}) ([docs/validation.md](docs/validation.md#a-"
        "model-it-was-not-fitted-on-llama-3-8b-on-one-h200)). At head layouts the H200's fit had not seen (32/4, 64/8 "
        f"and 28/4 heads), {heads_all.group(1)} kernel launches predicted beforehand were off by {heads_all.group(2)}: "
        f"SDPA flash {fam['sdpa_flash_fp16']}% and kvq's fp16 kernel {fam['kvq_fp16']}%, its quantized GQA kernels "
        f"{min(kivi_gqa):.1f}-{max(kivi_gqa):.1f}% (the fit had seen one query group, of 4; fitted on both sweeps, "
        f"their held-out points at those layouts are off by {_layout_gqa_mape():.2f}% on average) ([docs/validation.md]"
        "(docs/validation.md#head-layouts-the-fit-never-saw-h200)).",
        f"- That is the closed loop: kvq's own kernels on the GPU it was fitted on. On published measurements of other "
        f"serving systems that no parameter was fitted on, kvq-sim's mean absolute error is {held.mape_pct:.1f}% over "
        f"{held.n} points (signed {held.signed_pct:+.1f}%: it predicts {'faster' if held.signed_pct < 0 else 'slower'} "
        "than measured); "
        f"[reports/published](reports/published/README.md) shows where and why.",
    ]
    return "\n".join(lines) + "\n"


def _vs_dispatched() -> dict:
    """KIVI-4/2 speedups over SDPA as torch dispatches it, batch 1 and 128K tokens (bench_sdpa_backends.py CSVs)."""
    out = {}
    for gpu, name in (("h100", "sdpa_backends_h100.csv"), ("h200", "sdpa_backends_h200.csv"),
                      ("h200now", "sdpa_backends_h200_v2.csv")):  # fmt: skip
        d = pd.read_csv(MEASURED / name)
        d = d[(d.batch == 1) & (d.context == 131072)]
        for heads, kv in (("mha", 32), ("gqa", 8)):
            at = d[d.kv_heads == kv]
            base = at[at.impl == "sdpa_default_fp16"].time_us.iloc[0]
            for bits in (4, 2):
                us = at[(at.impl == "kvq_kivi") & (at.bits == bits)].time_us.iloc[0]
                out[f"{'' if gpu == 'h100' else gpu}{heads}{bits}"] = base / us
    return out


# --- examples: a hand-written python block and what it prints ---------------------------------------------------------

#: output section -> (file, needs the SmolLM2 model). The python block is in the `<name>-example` section.
EXAMPLES = {
    "kvqcache": ("README.md", True),
    "calibration": ("packages/kvq-core/README.md", True),
    "sim-api": ("packages/kvq-sim/README.md", False),
}


def example_code(name: str) -> str:
    """The python code of the `<name>-example` section of its file."""
    text = (ROOT / EXAMPLES[name][0]).read_text()
    i, j = section(text, f"{name}-example")
    m = re.search(r"```python\n(.*?)```", text[i:j], re.S)
    if m is None:
        raise ValueError(f"{EXAMPLES[name][0]}: no python block in section {name}-example")
    return m.group(1)


def example_output(name: str) -> str:
    """What the `<name>-example` code prints, run by the current interpreter in a fresh process."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONHASHSEED": "0"}
    out = subprocess.run(
        [sys.executable, "-c", example_code(name)], capture_output=True, text=True, check=True, cwd=ROOT, env=env
    ).stdout
    return "```text\n" + out.rstrip("\n") + "\n```\n"


# --- docs/kernels.md ------------------------------------------------------------------------------------------------


def kernel_table() -> str:
    """The kernel targets and timing tables `summarize.py` prints from the committed H100 sweep."""
    return _run([sys.executable, str(SUMMARIZE), str(KERNEL_CSV)]).rstrip("\n") + "\n"


BENCH_DECODE = ROOT / "packages" / "kvq-kernels" / "benchmarks" / "bench_decode.py"


def _gqa_speedups_128k(csv: Path) -> dict[int, float]:
    """KIVI over SDPA flash per bit width, 32/8 heads, batch 1, 128K tokens, in one sweep CSV."""
    d = pd.read_csv(csv)
    rows = d[(d.impl == "kvq_kivi") & (d.q_heads == 32) & (d.kv_heads == 8) & (d.batch == 1) & (d.context == 131072)]
    return {int(b): float(sp) for b, sp in zip(rows.bits, rows.speedup_vs_sdpa)}


def kernel_table_h200() -> str:
    """`summarize.py`'s tables from the committed H200 sweep."""
    return _run([sys.executable, str(SUMMARIZE), H200_KERNEL]).rstrip("\n") + "\n"


def kernel_targets_h200() -> str:
    """The issue's kernel targets checked on the committed H200 sweep (`bench_decode.py --targets`)."""
    cmd = ["python", str(BENCH_DECODE.relative_to(ROOT)), "--targets", H200_KERNEL]
    return _shown(cmd, _run([sys.executable, *cmd[1:]]))


def _launch(tag: str) -> str:
    """A sweep's config tag without what the launch recorded about itself (-r<resident>, -sp<splits>)."""
    return re.sub(r"-r\d+|-sp\d+", "", tag)


def _splits(tag: str, batch: int, kv_heads: int, context: int, sms: int) -> int:
    """The splits a tagged launch ran: recorded (-sp<N>), or for tags from before the sweeps recorded them, the
    rule of that time (one program per SM: kvq_core.splits.split_count without `resident`; the CUDA-core kernel 8
    waves without fill, the others 4 with), rounded to whole tiles as the launchers round it. The sweeps' contexts
    are whole multiples of BLOCK_N and of the 128-token flush block, so the quantized capacity is the context."""
    from kvq_core.splits import split_count

    recorded = re.search(r"-sp(\d+)", tag)
    if recorded:
        return int(recorded.group(1))
    simt, bn = tag.startswith("simt"), int(re.search(r"bn(\d+)", tag).group(1))
    s = split_count(batch * kv_heads, -(-context // bn), sms, 8 if simt else 4, fill=not simt)
    per_split = math.ceil(math.ceil(context / s) / bn) * bn  # whole tiles a split, as the launchers round it
    return math.ceil(context / per_split)


def _sweep_change(old_csv: str, new_csv: str, impls: tuple[str, ...] = ("kvq_kivi",)) -> str:
    """Per bit width and head layout of two H200 sweeps (kvq's kernels `impls`): the points whose kernel, launch
    config or split count changed and the ratio of their times, and the ratio elsewhere."""
    from kvq_sim.hardware import load_hardware

    key = ["impl", "bits", "group_size", "batch", "q_heads", "kv_heads", "head_dim", "context"]
    old, new = (pd.read_csv(ROOT / f) for f in (old_csv, new_csv))
    m = old[old.impl.isin(impls)].merge(new[new.impl.isin(impls)], on=key, suffixes=("_old", "_new"))
    m["ratio"] = m.time_us_new / m.time_us_old
    sms = load_hardware("h200").sm_count  # what the split rule counts
    lines = [
        f"`{new_csv}` (commit {new.commit.iloc[0]}) against `{old_csv}` (commit {old.commit.iloc[0]}), "
        "time ratio new / old:",
        "",
        "| heads | bits | points | launch changed | ratio there (min / median / max) | ratio elsewhere "
        "(min / median / max) | 128K batch 1 (us) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (hq, hkv, bits), g in m.groupby(["q_heads", "kv_heads", "bits"]):
        changed = (g.config_old.map(_launch) != g.config_new.map(_launch)) | pd.Series(
            [
                _splits(o, r.batch, r.kv_heads, r.context, sms) != _splits(n, r.batch, r.kv_heads, r.context, sms)
                for o, n, r in zip(g.config_old, g.config_new, g.itertuples())
            ],
            index=g.index,
        )
        ch, rest = g[changed], g[~changed]
        there = f"{ch.ratio.min():.2f} / {ch.ratio.median():.2f} / {ch.ratio.max():.2f}" if len(ch) else "-"
        elsewhere = f"{rest.ratio.min():.2f} / {rest.ratio.median():.2f} / {rest.ratio.max():.2f}" if len(rest) else "-"
        p = g[(g.batch == 1) & (g.context == 131072) & ((g.group_size == 128) | g.group_size.isna())]
        point = f"{p.time_us_old.iloc[0]:.1f} -> {p.time_us_new.iloc[0]:.1f}" if len(p) else "-"
        lines.append(f"| {hq}/{hkv} | {bits} | {len(g)} | {len(ch)} | {there} | {elsewhere} | {point} |")
    return "\n".join(lines) + "\n"


def kernel_change_h200() -> str:
    """The committed H200 sweep against the first (the word kernel for every GQA cache beyond 4096 tokens)."""
    return _sweep_change(H200_KERNEL_COLD, H200_KERNEL)


def split_change_h200() -> str:
    """The fifth H200 sweep (splits sized by occupancy) against the third (the same kernels, splits sized for one
    program per SM)."""
    return _sweep_change(H200_KERNEL_V3, H200_KERNEL_V5)


def layout_change_h200() -> str:
    """The sixth H200 sweep (3-bit high bits in nibble pairs, 3-bit GQA on the fragment kernel) against the
    fifth."""
    return _sweep_change(H200_KERNEL_V5, H200_KERNEL_V6)


def prefetch_change_h200() -> str:
    """The seventh H200 sweep (the fragment kernel's 4-warp launches load value scales a tile ahead) against the
    sixth."""
    return _sweep_change(H200_KERNEL_V6, H200_KERNEL_V7)


def launch_change_h200() -> str:
    """The eighth H200 sweep (2/4-bit GQA launches retuned) against the seventh."""
    return _sweep_change(H200_KERNEL_V7, H200_KERNEL_V8)


def mha_change_h200() -> str:
    """The tenth H200 sweep (MHA 8-bit over few rows and short MHA caches on the fragment kernel) against the
    eighth."""
    return _sweep_change(H200_KERNEL_V8, H200_KERNEL_V10)


def transpose_change_h200() -> str:
    """The eleventh H200 sweep (the fragment kernel with the codes as the M side of both products, for GQA and
    MHA) against the tenth."""
    return _sweep_change(H200_KERNEL_V10, H200_KERNEL_V11)


def dispatch_change_h200() -> str:
    """The committed H200 sweep (few rows of short caches on (64, 4, 3); the fp16 kernel's splits for one wave
    of 2 programs an SM) against the eleventh, kvq's fp16 kernel (16 bits) included."""
    return _sweep_change(H200_KERNEL_V11, H200_KERNEL_V12, ("kvq_kivi", "kvq_fp16"))


def onewarp_change_h200() -> str:
    """The fourteenth H200 sweep (3-bit as two half tiles; one warp a program for 2/3/4-bit beyond few rows and
    small launches) against the twelfth."""
    return _sweep_change(H200_KERNEL_V12, H200_KERNEL_V14, ("kvq_kivi", "kvq_fp16"))


def combine_change_h200() -> str:
    """The fifteenth H200 sweep (the split merge reads up to 64 splits a step) against the fourteenth, kvq's fp16
    kernel included (it runs the same merge)."""
    return _sweep_change(H200_KERNEL_V14, H200_KERNEL_V15, ("kvq_kivi", "kvq_fp16"))


def offsets_change_h200() -> str:
    """The committed H200 sweep (the fragment kernel's codes keep a power-of-two offset the scores and
    accumulators subtract once) against the fifteenth, kvq's fp16 kernel included (unchanged: the run-to-run
    spread)."""
    return _sweep_change(H200_KERNEL_V15, H200_KERNEL, ("kvq_kivi", "kvq_fp16"))


PEERS_H200 = "reports/measurements/peers_decode_h200_v3.csv"
PEER_IMPLS = (
    ("sdpa_flash_fp16", "SDPA flash, fp16"),
    ("kvq_fp16", "kvq fp16"),
    ("kvq_kivi4", "kvq KIVI-4"),
    ("kvq_kivi2", "kvq KIVI-2"),
    ("flashinfer_fp16", "FlashInfer fp16"),
    ("flashinfer_fp8", "FlashInfer fp8"),
)


def peers_h200() -> str:
    """bench_peers.py's H200 run: time and speedup over SDPA flash per implementation and point."""
    d = pd.read_csv(ROOT / PEERS_H200)
    log = (ROOT / PEERS_H200.replace(".csv", "_log.txt")).read_text()
    version = re.search(r"^flashinfer (\S+), streaming read ([\d.]+) TB/s", log, re.M)
    r0 = d.iloc[0]
    lines = [
        f"Measured {r0.date} on {r0.device} (driver {r0.driver}, torch {r0.torch}, triton {r0.triton}, commit "
        f"{r0.commit}), flashinfer-python {version.group(1)}, {r0.q_heads}/{r0.kv_heads} heads, head_dim "
        f"{r0.head_dim}; us, speedup over SDPA flash fp16, % of the streaming read ({version.group(2)} TB/s):",
        "",
        "| batch | context | " + " | ".join(name for _, name in PEER_IMPLS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in PEER_IMPLS) + " |",
    ]
    for (batch, context), g in d.groupby(["batch", "context"], sort=False):
        got = g.set_index("impl")
        cells = [
            f"{got.time_us[i]:.1f}, {got.speedup_vs_sdpa[i]:.2f}x, {100 * got.frac_of_hbm_read[i]:.0f}%"
            if i in got.index
            else "-"
            for i, _ in PEER_IMPLS
        ]
        lines.append(f"| {batch} | {context // 1024}K | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SDPA_BACKEND_CSVS = ("sdpa_backends_h100.csv", "sdpa_backends_h200_v2.csv")


def sdpa_backends_table() -> str:
    """kvq against every torch SDPA backend and torch's own pick, from bench_sdpa_backends.py's CSVs."""
    lines = []
    for name in SDPA_BACKEND_CSVS:
        d = pd.read_csv(MEASURED / name)
        r0 = d.iloc[0]
        d["col"] = d.impl.where(d.impl != "kvq_kivi", "kivi-" + d.bits.astype(str))
        key = ["q_heads", "kv_heads", "batch", "context"]
        t = d.pivot_table(index=key, columns="col", values="time_us")
        picks = d[d.impl == "sdpa_default_fp16"].set_index(key)["config"]
        lines += [
            f"`{name}`: {r0['device']} (driver {r0['driver']}, torch {r0['torch']}, triton {r0['triton']}, commit "
            f"{r0['commit']}, {r0['date']}); times in us, KIVI group 128; x = SDPA as dispatched / kvq's time.",
            "",
            "| heads | batch | tokens | torch picks | SDPA dispatched | SDPA flash | kvq fp16 | KIVI-4 | KIVI-2 |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for (hq, hkv, b, n), r in t.iterrows():
            base = r["sdpa_default_fp16"]
            cells = [f"{r[c]:.1f} ({base / r[c]:.2f}x)" for c in ("kvq_fp16", "kivi-4", "kivi-2")]
            lines.append(
                f"| {hq}/{hkv} | {b} | {n // 1024}K | {picks[(hq, hkv, b, n)]} | {base:.1f} | "
                f"{r['sdpa_flash_fp16']:.1f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


HF_CSVS = ("hf_cache_decode_smollm2_h100.csv", "hf_cache_decode_llama7b_h100.csv")
#: a second run of the same script and commit on another machine start, shown beside the first
HF_REPEATS = {"hf_cache_decode_llama7b_h100.csv": "hf_cache_decode_llama7b_h100_repeat.csv"}


def hf_table() -> str:
    """One decode step through transformers with each cache, from benchmarks/hf_cache_decode.py's CSVs."""
    lines = []
    label = {"dynamic": "transformers DynamicCache fp16", "kvq-kernel": "KVQCache kivi-{b}, kernels",
             "kvq-torch": "KVQCache kivi-{b}, torch path", "hf-hqq": "transformers QuantizedCache HQQ {b}-bit",
             "hf-quanto": "transformers QuantizedCache quanto int{b}"}  # fmt: skip
    for name in HF_CSVS:
        with open(MEASURED / name, newline="") as f:
            rows = list(csv.DictReader(f))
        again = {}
        if name in HF_REPEATS:
            with open(MEASURED / HF_REPEATS[name], newline="") as f:
                again = {(r["cache"], r["bits"], r["prompt"]): r["step_ms"] for r in csv.DictReader(f)}
        r0 = rows[0]
        shape = r0.get("shape") or "smollm2-135m"  # the SmolLM2 CSV has no shape column
        lines += [
            f"`{shape}` (random weights), batch 1: measured {r0['date']} on {r0['device']} (driver {r0['driver']}, "
            f"torch {r0['torch']}, triton {r0['triton']}, transformers {r0['transformers']}, commit {r0['commit']}; "
            f"`reports/measurements/{name}`"
            + (f", and again in `{HF_REPEATS[name]}`, second column)." if again else ")."),
            "",
            "| prompt | cache | ms per decode step | peak GiB | cache MiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in rows:
            ms = f"{float(r['step_ms']):.1f}"
            if again:
                ms += f" / {float(again[(r['cache'], r['bits'], r['prompt'])]):.1f}"
            lines.append(
                f"| {int(r['prompt']) // 1024}K | {label[r['cache']].format(b=r['bits'])} | {ms} | "
                f"{int(r['max_allocated_bytes']) / 2**30:.2f} | {int(r['cache_bytes']) / 2**20:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


#: committed `kvq-bench --quick` runs: directory -> the device slug kvq-bench named its files with
QUICK_RUNS = {
    "reports/measurements/kvq_bench_h100_quick_7564859": "nvidia-h100-80gb-hbm3",
    "reports/measurements/kvq_bench_h200_quick_8a55093": "nvidia-h200",
}


def _validate_quick(run: str) -> list[str]:
    slug = QUICK_RUNS[run]
    return [
        "kvq-sim", "validate", "--gpu", f"{run}/{slug}.yaml", "--measurements", f"{run}/kernel_decode_{slug}.csv",
        "--e2e", f"{run}/e2e_decode_{slug}.csv",
    ]  # fmt: skip


def kvq_bench_validate() -> str:
    """`kvq-sim validate` on the committed H100 `kvq-bench --quick` run (it exits 1: the quick sweep misses the
    kernel gates)."""
    cmd = _validate_quick("reports/measurements/kvq_bench_h100_quick_7564859")
    return _shown(cmd, _run(cmd, check=False))


def kvq_bench_validate_h200() -> str:
    """The same on the H200 run: its summary lines."""
    cmd = _validate_quick("reports/measurements/kvq_bench_h200_quick_8a55093")
    out = _run(cmd, check=False)
    return _shown(cmd, "\n".join(line for line in out.splitlines() if line.startswith(("PASS", "FAIL"))))


# --- docs/validation.md ---------------------------------------------------------------------------------------------

VALIDATE = [
    "kvq-sim", "validate", "--gpu", "h100-80g",
    "--measurements", f"reports/measurements/{report_data.KERNEL_CSV}",
    "--e2e", f"reports/measurements/{report_data.E2E_CSV}",
]  # fmt: skip


def validation_output() -> str:
    """`kvq-sim validate` on the committed H100 measurements, whole (it exits 1 on a FAIL, shown as printed)."""
    return _shown(VALIDATE, _run(VALIDATE, check=False))


# the H200 is calibrated on its latest sweep (the fragment kernel for GQA 4/8-bit); the cold predictions were made
# for (and compare against) the first (the word kernel)
H200_KERNEL, H200_E2E = "reports/measurements/kernel_decode_h200_v16.csv", "reports/measurements/e2e_decode_h200_v7.csv"
H200_KERNEL_V15 = "reports/measurements/kernel_decode_h200_v15.csv"
H200_KERNEL_V14 = "reports/measurements/kernel_decode_h200_v14.csv"
H200_E2E_COLD = "reports/measurements/e2e_decode_h200.csv"
H200_KERNEL_V12 = "reports/measurements/kernel_decode_h200_v12.csv"
H200_KERNEL_V11 = "reports/measurements/kernel_decode_h200_v11.csv"
H200_KERNEL_V10 = "reports/measurements/kernel_decode_h200_v10.csv"
H200_KERNEL_V8 = "reports/measurements/kernel_decode_h200_v8.csv"
H200_KERNEL_V7 = "reports/measurements/kernel_decode_h200_v7.csv"
H200_KERNEL_V6 = "reports/measurements/kernel_decode_h200_v6.csv"
H200_KERNEL_V5 = "reports/measurements/kernel_decode_h200_v5.csv"
H200_KERNEL_V3 = "reports/measurements/kernel_decode_h200_v3.csv"
H200_KERNEL_COLD = "reports/measurements/kernel_decode_h200.csv"
H200_LAYOUTS = "reports/measurements/kernel_decode_h200_new_heads.csv"
VALIDATE_H200 = ["kvq-sim", "validate", "--gpu", "h200", "--measurements", H200_KERNEL, "--measurements", H200_LAYOUTS,
                 "--e2e", H200_E2E]  # fmt: skip
H200_COLD = ["python", "scripts/predict_points.py", "compare", "reports/predictions/h200_cold_v3.csv",
             H200_KERNEL_COLD, "--e2e", H200_E2E_COLD]  # fmt: skip


def h200_cold() -> str:
    """The H200 measurements against the predictions committed before them (transferred from the H100 fit)."""
    return _shown(H200_COLD, _script(*H200_COLD[1:]))


H200_NEW_HEADS = ["python", "scripts/predict_points.py", "compare", "reports/predictions/kernels_h200_new_heads.csv",
                  "reports/measurements/kernel_decode_h200_new_heads.csv"]  # fmt: skip


def _layout_gqa_mape() -> float:
    """Mean absolute error (%) of the H200 fit on the head-layout sweep's held-out quantized GQA points >= 64 MiB."""
    from kvq_sim.hardware import load_hardware
    from kvq_sim.measurements import read_kernel_csv, split
    from kvq_sim.validate import predict_kernel

    hw = load_hardware("h200")
    held = split(read_kernel_csv(ROOT / H200_NEW_HEADS[-1], "NVIDIA H200")[0])[1]
    pts = [p for p in held if p.impl == "kvq_kivi" and p.q_heads > p.kv_heads and p.bytes_read >= 64 * 2**20]
    return sum(abs(predict_kernel(hw, p) / p.time_us - 1) * 100 for p in pts) / len(pts)


def h200_new_heads() -> str:
    """Kernel times at head layouts the H200 fit never saw against the predictions committed before them."""
    return _shown(H200_NEW_HEADS, _script(*H200_NEW_HEADS[1:]))


def h200_validation() -> str:
    """`kvq-sim validate` on the H200's own held-out points after calibrating it (shown as printed, FAILs too)."""
    out = _run(VALIDATE_H200, check=False)
    summary = [line for line in out.splitlines() if line.startswith(("PASS", "FAIL", "NOT"))]
    return _shown(VALIDATE_H200, "\n".join(summary) + "\n")


VALIDATE_MULTIGPU = [
    "kvq-sim", "validate", "--gpu", "8x-h100", "--multigpu", "reports/measurements/multigpu_decode_h100.csv",
]  # fmt: skip


def multigpu_table() -> str:
    """`kvq-sim validate --multigpu` on the committed 4x H100 sweep: prior and fitted held-out errors per layout."""
    return _shown(VALIDATE_MULTIGPU, _run(VALIDATE_MULTIGPU, check=False))


MULTIGPU_H200 = "reports/measurements/multigpu_decode_h200.csv"
MULTIGPU_H200_COLD = ["python", "scripts/predict_points.py", "compare-multigpu",
                      "reports/predictions/multigpu_h200_cold.csv", MULTIGPU_H200]  # fmt: skip
VALIDATE_MULTIGPU_H200 = ["kvq-sim", "validate", "--gpu", "8x-h200", "--multigpu", MULTIGPU_H200]


def multigpu_h200() -> str:
    """The 4x H200 sweep against the predictions committed before it, then `validate --multigpu` after its fit."""
    cold = _script(*MULTIGPU_H200_COLD[1:])
    fitted = _run(VALIDATE_MULTIGPU_H200, check=False)
    return _shown(MULTIGPU_H200_COLD, cold).rstrip("\n") + "\n" + _shown(VALIDATE_MULTIGPU_H200, fitted)


LLAMA3_H200 = "reports/measurements/multigpu_decode_llama3_8b_h200_tp1.csv"
LLAMA3_H200_COLD = ["python", "scripts/predict_points.py", "compare-multigpu",
                    "reports/predictions/llama3_8b_h200_tp1.csv", LLAMA3_H200]  # fmt: skip
LLAMA3_V2 = "reports/predictions/llama3_8b_h200_v2.csv"
LLAMA3_V2_RUNS = [f"reports/measurements/multigpu_decode_llama3_8b_h200_v2_{n}.csv" for n in ("tp1", "2gpu")]
LLAMA3_V3 = "reports/predictions/llama3_8b_h200_v3.csv"
LLAMA3_V3_RUN = "reports/measurements/multigpu_decode_llama3_8b_h200_v3_tp1.csv"
LLAMA3_V4 = "reports/predictions/llama3_8b_h200_v4.csv"
LLAMA3_V4_RUN = "reports/measurements/multigpu_decode_llama3_8b_h200_v4_tp1.csv"
LLAMA3_V5 = "reports/predictions/llama3_8b_h200_v5.csv"
LLAMA3_V5_RUN = "reports/measurements/multigpu_decode_llama3_8b_h200_v5_tp1.csv"
LLAMA3_V6 = "reports/predictions/llama3_8b_h200_v6.csv"
LLAMA3_V6_RUN = "reports/measurements/multigpu_decode_llama3_8b_h200_v6_tp1.csv"
LLAMA3_V7 = "reports/predictions/llama3_8b_h200_v7.csv"
LLAMA3_V7_RUN = "reports/measurements/multigpu_decode_llama3_8b_h200_v7_tp1.csv"
LLAMA3_4GPU_PRED = "reports/predictions/llama3_8b_h200_4gpu.csv"
LLAMA3_4GPU = "reports/measurements/multigpu_decode_llama3_8b_h200_4gpu.csv"


def llama3_h200() -> str:
    """Llama-3-8B steps on H200s against the predictions committed before each run, and the last one-GPU run's
    steps by KV format beside the last run of the fragment kernel with the query group as padded rows."""
    from kvq_sim.multigpu import read_steps

    out = _shown(LLAMA3_H200_COLD, _script(*LLAMA3_H200_COLD[1:]))
    runs = [(LLAMA3_V2, r) for r in LLAMA3_V2_RUNS] + [(LLAMA3_4GPU_PRED, LLAMA3_4GPU), (LLAMA3_V3, LLAMA3_V3_RUN)]
    runs += [
        (LLAMA3_V4, LLAMA3_V4_RUN),
        (LLAMA3_V5, LLAMA3_V5_RUN),
        (LLAMA3_V6, LLAMA3_V6_RUN),
        (LLAMA3_V7, LLAMA3_V7_RUN),
    ]
    for pred, run in runs:
        cmd = ["python", "scripts/predict_points.py", "compare-multigpu", pred, run]
        out += _shown(cmd, _script(*cmd[1:]))

    def steps(csv):
        return {(p.kv, p.batch, p.context): p.step_us for p in read_steps(ROOT / csv)[0] if p.gpus == 1}

    first, now = steps(LLAMA3_V3_RUN), steps(LLAMA3_V7_RUN)
    lines = [
        "",
        f"One GPU (`{LLAMA3_V7_RUN}`; in brackets the last run with the padded-rows fragment kernel, "
        f"`{LLAMA3_V3_RUN}`):",
        "",
        "| batch | context | fp16 KV (ms) | KIVI-4 (ms, vs fp16) | KIVI-2 (ms, vs fp16) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for batch, context in sorted({(b, t) for _, b, t in now}):
        fp16, fp16_first = now[("fp16", batch, context)], first[("fp16", batch, context)]
        cells = [
            f"{now[(kv, batch, context)] / 1e3:.1f}, {fp16 / now[(kv, batch, context)]:.2f}x "
            f"({first[(kv, batch, context)] / 1e3:.1f}, {fp16_first / first[(kv, batch, context)]:.2f}x)"
            for kv in ("kivi4", "kivi2")
        ]
        lines.append(
            f"| {batch} | {context // 1024}K | {fp16 / 1e3:.1f} ({fp16_first / 1e3:.1f}) | {cells[0]} | {cells[1]} |"
        )
    return out + "\n".join(lines) + "\n"


def noise_output() -> str:
    """Run-to-run noise: the committed sweeps against their repeats (`measurement_noise.py`)."""
    out = []
    for a, b in (("kernel_decode_h100.csv", "kernel_decode_h100_repeat.csv"),
                 ("e2e_decode_h100.csv", "e2e_decode_h100_repeat.csv")):  # fmt: skip
        cmd = ["python", str(NOISE.relative_to(ROOT)), f"reports/measurements/{a}", f"reports/measurements/{b}"]
        out.append(_shown(cmd, _run([sys.executable, *cmd[1:]])))
    return "\n".join(out)


# --- docs/quality.md ------------------------------------------------------------------------------------------------


def _quality_csv(names):
    """Rows (dicts) of the named reports/quality CSVs, in order."""
    for name in names:
        with open(QUALITY / name, newline="") as f:
            yield from csv.DictReader(f)


def _decode_rows(names=("hf_peers_decode.csv", "kvq_decode.csv", "kvq_decode_more_methods.csv")) -> list[tuple]:
    """(who, cache, stored bits, decode ppl) of every row of the named reports/quality CSVs."""
    rows = []
    for r in _quality_csv(names):
        bits = float(r["avg_bits"]) if r.get("avg_bits") else float(r["held_bits_per_element"])
        who = "kvq" if r["cache"].startswith("kvq:") else "transformers"
        rows.append((who, r["cache"].removeprefix("kvq:"), bits, float(r["ppl"])))
    return rows


def _ppl_table(rows, first_column: str = "cache", tf: dict | None = None) -> list[str]:
    """Markdown rows of `_decode_rows` output, most stored bits first, with the increase over `full`; with `tf`
    (cache -> teacher-forced ppl), a teacher-forced column."""
    full = next(p for _, c, _, p in rows if c == "full")
    head = f"| {first_column} | from | bits/element stored | decode ppl | vs full fp32 |"
    lines = [head + (" teacher-forced ppl |" if tf is not None else ""), "| --- " * (6 if tf is not None else 5) + "|"]
    full_tf = tf.get("full") if tf else None
    for who, cache, bits, ppl in sorted(rows, key=lambda r: (-r[2], r[3])):
        line = f"| `{cache}` | {who} | {bits:.2f} | {ppl:.3f} | {100 * (ppl / full - 1):+.1f}% |"
        if tf is not None:
            t = tf.get(cache)
            line += " " + (
                "-" if t is None else f"{t:.3f}" + (f" ({100 * (t / full_tf - 1):+.1f}%)" if full_tf else "")
            )
            line += " |"
        lines.append(line)
    return lines


#: the 512-token tables: decode (16 windows of prefill 384 + 128 scored) and teacher-forced (4 windows of 512)
QUALITY_512 = ("hf_peers_decode.csv", "kvq_decode.csv", "kvq_decode_more_methods.csv")
QUALITY_512_TF = ("hf_peers_teacher_forced.csv", "kvq_teacher_forced.csv")


def _windows_note(rows: list[dict], what: str) -> str:
    """E.g. "16 windows of 512 tokens, prefill=384 scored=128", from the rows' window counts and params."""
    counts = sorted({r["windows"] for r in rows})
    params = sorted({r["params"] for r in rows if r["params"]})
    n = "/".join(map(str, counts))
    return f"{n} window{'s' if counts != [1] else ''} of {what}" + (f", {'; '.join(params)}" if params else "")


def quality_table() -> str:
    """The 512-token windows (reports/quality/*decode*.csv but the 4K one): per cache the bits held while scoring,
    the format's bits, the pooled perplexity and its change against the full cache with the 95% window-bootstrap
    interval; then the teacher-forced change (reports/quality/*teacher_forced.csv) where that protocol ran. Rows
    without interval columns (tables from before the windowed protocol) show n/a."""
    rows = _paired_rows(QUALITY_512)
    tf = {r["cache"]: r for r in _paired_rows(QUALITY_512_TF)}
    lines = [
        f"Decode: {_windows_note(rows, '512 tokens')}, "
        + ", ".join(f"`reports/quality/{n}`" for n in QUALITY_512)
        + f". Teacher-forced: {_windows_note(list(tf.values()), '512 tokens')}.",
        "",
        "| cache (512-token windows) | from | bits held while scoring | format bits at 512 | decode ppl | decode change "
        "vs full [95% interval] | teacher-forced change [95% interval] |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (-r["held"], r["change"])):
        t = tf.get(r["cache"])
        lines.append(
            f"| `{r['cache']}` | {r['who']} | {r['held']:.2f} | {r['bits']:.2f} | {r['ppl']:.3f} | {_interval(r)} | "
            f"{'-' if t is None else _interval(t)} |"
        )
    return "\n".join(lines) + "\n"


#: Quality targets on the decode protocol, by bits per element *stored*: (band label, low bits exclusive, high bits
#: inclusive, max perplexity increase % of the band's best kvq cache; the naive int baselines sit in the same bands
#: and are listed as the band's worst).
QUALITY_TARGETS = (
    ("~4-bit (3.75-4.75 stored)", 3.75, 4.75, 0.5),
    ("~3-bit (2.75-3.75 stored)", 2.75, 3.75, 2.0),
    ("~2-bit (up to 2.75 stored)", 0.0, 2.75, 8.0),
)


def _targets(rows) -> list[str]:
    full = next(p for _, c, _, p in rows if c == "full")
    kvq = [r for r in rows if r[0] == "kvq"]

    def inc(r) -> float:
        return 100 * (r[3] / full - 1)

    lines = [
        "| target (decode ppl vs full) | kvq caches in band | best kvq cache (bits, ppl, increase) | worst in band | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, lo, hi, tol in QUALITY_TARGETS:
        band = sorted((r for r in kvq if lo < r[2] <= hi), key=lambda r: r[3])
        if not band:
            lines.append(f"| {label}: best <= {tol:g}% | 0 | - | - | - |")
            continue
        best, worst = band[0], band[-1]
        lines.append(
            f"| {label}: best <= {tol:g}% | {len(band)} | `{best[1]}` ({best[2]:.2f}, {best[3]:.3f}, "
            f"{inc(best):+.1f}%) | `{worst[1]}` ({inc(worst):+.1f}%) | {'yes' if inc(best) <= tol else 'no'} |"
        )
    lines += ["", "| transformers backend (bits, ppl) | best kvq cache at equal or fewer bits (bits, ppl) | kvq better |",
              "| --- | --- | --- |"]  # fmt: skip
    peers = sorted((r for r in rows if r[0] == "transformers" and r[1] != "full"), key=lambda r: -r[2])
    for _, cache, bits, ppl in peers:
        best = min((r for r in kvq if r[2] <= bits), key=lambda r: r[3])
        lines.append(
            f"| `{cache}` ({bits:.2f}, {ppl:.3f}) | `{best[1]}` ({best[2]:.2f}, {best[3]:.3f}) | "
            f"{'yes' if best[3] < ppl else 'no'} |"
        )
    return lines


#: the 4K-token decode windows (prefill 3968, 128 scored, 8 windows spread over the text): kvq's caches and
#: transformers' backends, each row paired with the full cache's on the same windows
QUALITY_4K = ("decode_4k.csv",)


def _paired_rows(names) -> list[dict]:
    """Rows of kvq-eval CSVs with paired changes, one per cache (the full cache once): who, cache, held bits,
    format bits, ppl, and the change against the full cache with its 95% window-bootstrap interval (percent).

    Tables from before the windowed protocol (one window, no change columns): the change is ppl / full ppl - 1 (the
    pooled change of one window), the interval None (shown n/a), the format bits the held bits where not recorded.
    """
    raw = list(_quality_csv(names))
    full = next((float(r["ppl"]) for r in raw if r["cache"] == "full"), None)
    rows = {}
    for r in raw:
        cache = r["cache"].removeprefix("kvq:")
        held = float(r["held_bits_per_element"])
        if r.get("change"):
            change, low, high = (100 * float(r[k]) for k in ("change", "change_low", "change_high"))
        else:
            change, low, high = 100 * (float(r["ppl"]) / full - 1), None, None
        rows.setdefault(cache, {
            "who": "kvq" if r["cache"].startswith("kvq:") else "transformers", "cache": cache, "held": held,
            "bits": float(r["avg_bits"]) if r.get("avg_bits") else held, "ppl": float(r["ppl"]),
            "change": change, "low": low, "high": high, "windows": int(r.get("windows") or 1),
            "params": r.get("params", ""),
        })  # fmt: skip
    return list(rows.values())


def _interval(r: dict) -> str:
    if r["low"] is None:
        return f"{r['change']:+.1f}% [n/a]"
    return f"{r['change']:+.1f}% [{r['low']:+.1f}, {r['high']:+.1f}]"


def _paired_targets(rows: list[dict]) -> list[str]:
    """The targets per held-bits band (met: the best's pooled change within the target and its interval's upper
    end below twice it), then each transformers backend against kvq's best cache at equal or fewer held bits."""
    kvq = [r for r in rows if r["who"] == "kvq"]
    lines = [
        "| target (pooled decode ppl change vs full) | kvq caches in band | best kvq cache (held bits, change "
        "[95% interval]) | worst in band | met |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, lo, hi, tol in QUALITY_TARGETS:
        label = label.replace("stored", "held")
        band = sorted((r for r in kvq if lo < r["held"] <= hi), key=lambda r: r["change"])
        if not band:
            lines.append(f"| {label}: best <= {tol:g}%, upper end < {2 * tol:g}% | 0 | - | - | - |")
            continue
        best, worst = band[0], band[-1]
        met = best["change"] <= tol and best["high"] < 2 * tol
        lines.append(
            f"| {label}: best <= {tol:g}%, upper end < {2 * tol:g}% | {len(band)} | `{best['cache']}` "
            f"({best['held']:.2f}, {_interval(best)}) | `{worst['cache']}` ({worst['change']:+.1f}%) | "
            f"{'yes' if met else 'no'} |"
        )
    peers = [r for r in rows if r["who"] == "transformers" and r["cache"] != "full"]
    if not peers:
        return [*lines, "", "(no transformers backend on these windows)"]
    lines += ["", "| transformers backend (held bits, change [95% interval]) | best kvq cache at equal or fewer held "
              "bits | kvq better | intervals apart |", "| --- | --- | --- | --- |"]  # fmt: skip
    for peer in sorted(peers, key=lambda r: -r["held"]):
        fits = [r for r in kvq if r["held"] <= peer["held"]]
        if not fits:
            lines.append(f"| `{peer['cache']}` ({peer['held']:.2f}, {_interval(peer)}) | - | - | - |")
            continue
        best = min(fits, key=lambda r: r["change"])
        lines.append(
            f"| `{peer['cache']}` ({peer['held']:.2f}, {_interval(peer)}) | `{best['cache']}` ({best['held']:.2f}, "
            f"{_interval(best)}) | {'yes' if best['change'] < peer['change'] else 'no'} | "
            f"{'yes' if best['high'] < peer['low'] else 'no'} |"
        )
    return lines


def quality_targets() -> str:
    """The 4K-token windows (reports/quality/decode_4k*.csv): targets per held-bits band with intervals, each
    transformers backend against kvq's best cache at equal or fewer held bits, and every cache; then the
    512-token single window of the quality table above."""
    rows = _paired_rows(QUALITY_4K)
    n = max(r["windows"] for r in rows)
    lines = [
        f"4K-token windows ({n} windows of prefill 3968 + 128 scored, spread over the evaluation text; "
        + ", ".join(f"`reports/quality/{name}`" for name in QUALITY_4K)
        + "):",
        "",
        *_paired_targets(rows),
        "",
        "| cache (4K windows) | from | bits held while scoring | format bits at 4K | pooled ppl | change vs full "
        "[95% interval] |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (-r["held"], r["change"])):
        lines.append(
            f"| `{r['cache']}` | {r['who']} | {r['held']:.2f} | {r['bits']:.2f} | {r['ppl']:.3f} | {_interval(r)} |"
        )
    rows_512 = _paired_rows(QUALITY_512)
    lines += ["", f"512-token windows ({_windows_note(rows_512, '512 tokens')}; the quality table above):", ""]
    if all(r["low"] is not None for r in rows_512):
        lines += _paired_targets(rows_512)
    else:  # tables from before the windowed protocol: no intervals, targets by the format's stored bits
        lines += _targets(_decode_rows(QUALITY_512))
    return "\n".join(lines) + "\n"


def calibration_ablation() -> str:
    """Each cache of ablation_unweighted_calibration.csv against the same cache Fisher-fitted in the 512-token tables
    on the same windows: both changes against the full cache, and unweighted against Fisher, paired per window."""
    from kvq_core.eval import paired_change

    ablation = [r for r in _quality_csv(["ablation_unweighted_calibration.csv"]) if r["cache"] != "full"]
    fisher = {r["cache"]: r for r in _quality_csv(["kvq_decode.csv", "kvq_decode_more_methods.csv"])}
    lines = [
        "| cache | Fisher-weighted (kvq): held bits, change vs full | unweighted (the paper's k-means): held bits, "
        "change vs full | unweighted vs Fisher, paired |",
        "| --- | --- | --- | --- |",
    ]
    for u in ablation:
        f = fisher[u["cache"]]
        if f["window_starts"] != u["window_starts"] or f["params"] != u["params"]:
            raise ValueError(f"{u['cache']}: the ablation and the table ran on different windows")
        n = int(u["windows"])
        tokens = [int(u["scored_tokens"]) // n] * n
        pc = paired_change(
            [float(x) for x in u["window_nll"].split()], [float(x) for x in f["window_nll"].split()], tokens
        )
        cells = [
            f"{float(r['held_bits_per_element']):.2f}, {100 * float(r['change']):+.1f}% "
            f"[{100 * float(r['change_low']):+.1f}, {100 * float(r['change_high']):+.1f}]"
            for r in (f, u)
        ]
        lines.append(
            f"| `{u['cache'].removeprefix('kvq:')}` | {cells[0]} | {cells[1]} | "
            f"{100 * pc.change:+.1f}% [{100 * pc.low:+.1f}, {100 * pc.high:+.1f}] |"
        )
    return f"{_windows_note(ablation, '512 tokens')}\n\n" + "\n".join(lines) + "\n"


def generate_table() -> str:
    """`kvq-eval generate` per cache (reports/quality/generate.csv): greedy continuations of one prompt."""
    lines = [
        "| cache | bits/element | same tokens as full | ppl of the text under the full model | distinct 3-grams | "
        "continuation (start) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in _quality_csv(("generate.csv",)):
        text = " ".join(r["text"].split())[:70].replace("|", "\\|").replace("`", "'")
        bits = r["avg_bits"] or "-"
        lines.append(
            f"| `{r['cache'].removeprefix('kvq:')}` | {bits} | {float(r['agree_with_full']):.2f} | "
            f"{float(r['ppl_under_full']):.2f} | {float(r['distinct_3grams']):.2f} | {text} |"
        )
    return "\n".join(lines) + "\n"


# --- packages/kvq-core/README.md ------------------------------------------------------------------------------------


def methods_table() -> str:
    """One row per registered method: its bit widths with the bits per element they store at 32K tokens."""
    lines = [
        f"| method | bits (K/V) -> avg bits stored at {TOKENS // 1024}K tokens | storage | source |",
        "| --- | --- | --- | --- |",
    ]
    for name, spec in METHODS.items():
        widths = ", ".join(
            f"{bits_label(kv)} -> {get_format(name, kv).avg_bits(TOKENS, HEADS, HEAD_DIM):.3f}" for kv in spec.bits
        )
        lines.append(f"| `{name}` | {widths} | {spec.summary} | {spec.citation} |")
    return "\n".join(lines) + "\n"


def quickstart() -> str:
    """examples/quickstart.py and what it prints."""
    path = ROOT / "examples" / "quickstart.py"
    out = _run([sys.executable, str(path)])
    return (
        "```python\n" + path.read_text().rstrip("\n") + "\n```\n\n"
        "```text\n$ python examples/quickstart.py\n" + out.rstrip("\n") + "\n```\n"
    )


#: Systems kvq covers -> (kvq-core method or kvq-sim recipe / option, note). Ticks are computed: kvq-core = a
#: registered format; kvq-sim = `kvq-sim plan --method` / `--recipe` accepts it (tested for every method and recipe in
#: packages/kvq-sim/tests/test_serving.py); quality = a decode row in reports/quality.
SEEDS = [
    ("KIVI", "kivi", ""), ("KVQuant", "kvquant", ""), ("SKVQ", "skvq", ""), ("MILLION", "million", ""),
    ("RotateKV", "rotatekv", ""), ("GEAR", "gear", ""), ("ZipCache", "zipcache", ""), ("MiKV", "mikv", ""),
    ("Scissorhands / Locret / KVCrush (eviction)", "h2o", "one faithful training-free policy (heavy hitters + recent window)"),
    ("VidKV", "vidkv", ""), ("XQuant / XQuant-CL", "xquant", ""), ("CSKV", "cskv", ""), ("MiniCache", "minicache", ""),
    ("Block floating point + channel rearrangement", "bfp", ""), ("Staircase / age-based precision", "staircase", ""),
    ("QServe W4A8KV4", "qserve-w4a8kv4", "changes weights: simulator only"),
    ("AccLLM W2A8KV4", "accllm-w2a8kv4", "changes weights and hardware: simulator only"),
    ("EdgeQAT", "edgeqat-w4a4kv4", "needs training: costed by bit widths only"),
    ("RoSTE", "roste-w4a4kv4", "needs training: costed by bit widths only"),
    ("SCBench shared prefix", "--shared-prefix-tokens", "a workload, not a cache format: simulator only"),
    ("Reasoning-model serving (long generation)", "--gen-tokens", "a workload: simulator only"),
]  # fmt: skip


def seed_coverage() -> str:
    from kvq_sim.recipes import RECIPES

    decode_csvs = sorted(p.name for p in QUALITY.glob("*decode*.csv"))
    rated = {r["method"] for r in _quality_csv(decode_csvs) if r.get("method")}
    lines = [
        "| system | kvq name | kvq-core | kvq-sim | quality row | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for system, name, note in SEEDS:
        core = name in METHODS
        sim = core or name in RECIPES or name.startswith("--")
        tick = lambda ok: "yes" if ok else "-"  # noqa: E731
        lines.append(f"| {system} | `{name}` | {tick(core)} | {tick(sim)} | {tick(name in rated)} | {note} |")
    return "\n".join(lines) + "\n"


# --- packages/kvq-sim/README.md -------------------------------------------------------------------------------------

PLAN_BATCH = [
    "kvq-sim", "plan", "--model", "llama-3-8b", "--gpu", "h100-80g", "--method", "skvq", "--bits", "k2v1.5",
    "--context", "8192",
]  # fmt: skip
LIST_GPUS = ["kvq-sim", "list", "gpus"]


def plan_batch_output() -> str:
    return _shown(PLAN_BATCH, _run(PLAN_BATCH, stderr=True))


def list_gpus_output() -> str:
    return _shown(LIST_GPUS, _run(LIST_GPUS))


def claims_table() -> str:
    """The seed papers' capacity claims (docs/references.md §4) as kvq-sim computes them; the assertions are in
    packages/kvq-sim/tests/test_claims.py."""
    from kvq_sim.api import deployment
    from kvq_sim.memory import memory
    from kvq_sim.planner import max_context

    def ctx(gpu, bits, method, weight_bits, gpus=None, parallel="tp") -> str:
        return f"{max_context(deployment('llama-7b', gpu, bits, method, weight_bits, gpus, parallel)):,}"

    kv = {
        m: memory(deployment("llama-7b", "a100-80g", 2, m, 4), 1, 1 << 20).kv_bytes
        for m in ("kvquant-dense", "kvquant")
    }
    rows = [
        ("KVQuant: ~64 GB of KV for LLaMA-7B at 1M tokens, 2-bit",
         f"{kv['kvquant-dense'] / 1e9:.1f} GB for nuq2 (no outliers), {kv['kvquant'] / 1e9:.1f} GB for nuq2-1%",
         "counting codes without the 1% outliers"),
        ("KVQuant: 1M tokens on one A100-80GB",
         f"nuq2-1%: {ctx('a100-80g', 2, 'kvquant', 4)} with 4-bit weights, {ctx('a100-80g', 2, 'kvquant', 16)} with "
         f"fp16 weights; nuq2: {ctx('a100-80g', 2, 'kvquant-dense', 16)} with fp16 weights",
         "4-bit weights, or no outliers"),
        ("KVQuant: 10M tokens on 8 GPUs",
         f"nuq2: {ctx('8x-a100-80g', 2, 'kvquant-dense', 4, 8, 'cp')}; "
         f"nuq2-1%: {ctx('8x-a100-80g', 2, 'kvquant', 4, 8, 'cp')}",
         "context parallel over 8x A100-80GB, 4-bit weights, no outliers (within 10%)"),
        ("SKVQ: 1M tokens, 7B model, 80 GB GPU, K2V1.5",
         f"A100-80GB {ctx('a100-80g', 'k2v1.5', 'skvq', 16)}, H100 {ctx('h100-80g', 'k2v1.5', 'skvq', 16)}",
         "fp16 weights"),
    ]  # fmt: skip
    lines = ["| claim | kvq-sim, LLaMA-7B | holds with |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


# --- docs/transfer-rules.md -----------------------------------------------------------------------------------------


def fit_table() -> str:
    """The published-data fits in the order `kvq_sim.fitpresets.fit_published` runs them, values and calibration
    MAPE read from the fit files it writes."""
    from kvq_sim.configs import read_yaml
    from kvq_sim.engines import ENGINE_FIT_FILE
    from kvq_sim.hardware import TRANSFER_RULES_FILE, load_hardware

    eng, rules = read_yaml(ENGINE_FIT_FILE)["engines"], read_yaml(TRANSFER_RULES_FILE)
    gemv, hop = rules["weight_gemv"]["a100"], rules["collectives"]["a100"]
    trt = eng["trtllm"]["rejected"]
    h100 = load_hardware("h100-80g").calibration.weight_bandwidth_efficiency

    def mape(fit) -> str:
        return f"{fit['mape_pct_before']:.1f}% -> {fit['mape_pct_after']:.1f}%"

    rows = [
        ("`nemo.request_overhead_ms`", f"{eng['nemo']['request_overhead_ms']:g} ms",
         f"`nemo-llama2-inference`, the {len(eng['nemo']['fit']['points'])} H100 rows (TP 1-8, batch 1-8)",
         "NNLS of relative error, one cost per request", mape(eng["nemo"]["fit"])),
        ("A100 weight-GEMV efficiency (`a100-80g`, `8x-a100-80g`)", f"{gemv['efficiency']:g} (was {h100:.4g} from the H100)",
         f"`nemo-llama2-inference`, the {len(gemv['fit']['points'])} A100 TP1 rows, given #1",
         "1-D least squares of relative error over 0.50..1.00", mape(gemv["fit"])),
        ("`8x-a100-80g` all-reduce latency per GPU beyond the first", f"+{hop['hop_latency_us']:g} us per call per extra GPU",
         f"`nemo-llama2-inference`, the {len(hop['fit']['points'])} A100 TP2-8 rows, given #1 and #2",
         "NNLS, call latency = 10 us prior + hop x (N - 1)", mape(hop["fit"])),
        ("`hf-eager.layer_launch_us`", f"{eng['hf-eager']['layer_launch_us']:g} us per layer per forward pass",
         f"`hf-quant-bench` (bf16, AWQ, torchao int4, FP8 rows; not the pipeline-parallel one) and "
         f"`litgpt-resource-tables` bf16 rows: {len(eng['hf-eager']['fit']['points'])} points, given #2",
         "NNLS of relative error", mape(eng["hf-eager"]["fit"])),
        ("`trtllm.step_overhead_us`", f"**rejected** (fit: {trt['step_overhead_us'] / 1e3:.4g} ms)",
         "`trtllm-h200-blog` TP1 rows", "NNLS", mape(trt["fit"]) + ", not used"),
    ]  # fmt: skip
    out = [
        "| # | parameter | value | fitted on (calibration part only) | form | calibration MAPE of those points |",
        "|---|---|---:|---|---|---|",
    ]
    out += [f"| {i} | {' | '.join(r)} |" for i, r in enumerate(rows, start=1)]
    return "\n".join(out) + "\n"


SECTIONS = {
    "headline": headline_table,
    "plan-output": plan_output,
    "report-output": report_output,
    "kernel-table": kernel_table,
    "kernel-table-h200": kernel_table_h200,
    "kernel-targets-h200": kernel_targets_h200,
    "kernel-change-h200": kernel_change_h200,
    "split-change-h200": split_change_h200,
    "layout-change-h200": layout_change_h200,
    "prefetch-change-h200": prefetch_change_h200,
    "launch-change-h200": launch_change_h200,
    "mha-change-h200": mha_change_h200,
    "transpose-change-h200": transpose_change_h200,
    "dispatch-change-h200": dispatch_change_h200,
    "onewarp-change-h200": onewarp_change_h200,
    "combine-change-h200": combine_change_h200,
    "offsets-change-h200": offsets_change_h200,
    "peers-h200": peers_h200,
    "hf-table": hf_table,
    "sdpa-backends": sdpa_backends_table,
    "validation-output": validation_output,
    "multigpu-table": multigpu_table,
    "multigpu-h200": multigpu_h200,
    "llama3-h200": llama3_h200,
    "h200-cold": h200_cold,
    "h200-validation": h200_validation,
    "h200-new-heads": h200_new_heads,
    "noise-output": noise_output,
    "quality-table": quality_table,
    "quality-targets": quality_targets,
    "generate-table": generate_table,
    "calibration-ablation": calibration_ablation,
    "methods-table": methods_table,
    "quickstart": quickstart,
    "seed-coverage": seed_coverage,
    "plan-batch-output": plan_batch_output,
    "list-gpus-output": list_gpus_output,
    "claims-table": claims_table,
    "kvq-bench-validate": kvq_bench_validate,
    "kvq-bench-validate-h200": kvq_bench_validate_h200,
    "fit-table": fit_table,
    **{f"{name}-output": (lambda name=name: example_output(name)) for name in EXAMPLES},
}

#: file (relative to the repository root) -> the generated sections it holds, in order.
DOCS = {
    "README.md": ("headline", "plan-output", "report-output", "kvqcache-output"),
    "docs/kernels.md": ("kernel-table", "sdpa-backends", "hf-table"),
    "docs/validation.md": (
        "validation-output",
        "h200-cold",
        "h200-validation",
        "h200-new-heads",
        "multigpu-table",
        "multigpu-h200",
        "llama3-h200",
        "noise-output",
    ),
    "docs/transfer-rules.md": ("fit-table",),
    "docs/quality.md": ("quality-table", "quality-targets", "calibration-ablation", "generate-table"),
    "packages/kvq-core/README.md": ("quickstart", "methods-table", "seed-coverage", "calibration-output"),
    "packages/kvq-sim/README.md": ("plan-batch-output", "list-gpus-output", "sim-api-output", "claims-table"),
    "packages/kvq-kernels/README.md": (
        "kvq-bench-validate",
        "kvq-bench-validate-h200",
        "kernel-table",
        "kernel-table-h200",
    ),
    "docs/kernel-performance.md": (
        "kernel-change-h200",
        "split-change-h200",
        "layout-change-h200",
        "prefetch-change-h200",
        "launch-change-h200",
        "mha-change-h200",
        "transpose-change-h200",
        "dispatch-change-h200",
        "onewarp-change-h200",
        "combine-change-h200",
        "offsets-change-h200",
        "kernel-targets-h200",
        "peers-h200",
    ),
}


def section(text: str, name: str) -> tuple[int, int]:
    """(start, end) offsets of the text between the section's markers."""
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    i = text.index(start) + len(start)
    return i, text.index(end, i)


def main(names: list[str]) -> int:
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        print(f"unknown section {', '.join(unknown)}; valid: {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    for rel, sections in DOCS.items():
        path = ROOT / rel
        text = path.read_text()
        for name in sections:
            if names and name not in names:
                continue
            i, j = section(text, name)
            text = text[:i] + SECTIONS[name]() + text[j:]
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
