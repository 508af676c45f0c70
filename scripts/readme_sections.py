"""Regenerate the README's generated sections from the code: `python scripts/readme_sections.py`.

Each section sits between `<!-- name:start -->` and `<!-- name:end -->`; tests/test_readme.py checks
that the README holds what this script produces now.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvq_core.formats import METHODS, bits_label, get_format

ROOT = Path(__file__).resolve().parents[1]
TOKENS, HEADS, HEAD_DIM = 32768, 32, 128
KERNEL_CSV = ROOT / "reports" / "measurements" / "kernel_decode_h100.csv"
PLAN = ["kvq-sim", "plan", "--model", "llama-7b", "--gpu", "a100-80g", "--bits", "2"]


def methods_table() -> str:
    lines = ["| method | bits (K/V) | avg bits @ 32K | storage | source |", "| --- | --- | --- | --- | --- |"]
    for name, spec in METHODS.items():
        for kv in spec.bits:
            avg = get_format(name, kv).avg_bits(TOKENS, HEADS, HEAD_DIM)
            lines.append(f"| `{name}` | {bits_label(kv)} | {avg:.3f} | {spec.summary} | {spec.citation} |")
    return "\n".join(lines) + "\n"


def plan_output() -> str:
    out = subprocess.run(PLAN, capture_output=True, text=True, check=True).stdout
    return "```text\n$ " + " ".join(PLAN) + "\n" + out.rstrip("\n") + "\n```\n"


def kernel_table() -> str:
    out = subprocess.run(
        [sys.executable, str(ROOT / "packages/kvq-kernels/benchmarks/summarize.py"), str(KERNEL_CSV)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.rstrip("\n") + "\n"


VALIDATE = [
    "kvq-sim", "validate", "--gpu", "h100-80g",
    "--measurements", "reports/measurements/kernel_decode_h100.csv",
    "--e2e", "reports/measurements/e2e_decode_h100.csv",
]  # fmt: skip


def validation_table() -> str:
    """`kvq-sim validate`'s per-family table and verdicts on the committed H100 measurements (it exits 1 on a FAIL)."""
    out = subprocess.run(VALIDATE, capture_output=True, text=True, cwd=ROOT).stdout
    lines = out.splitlines()
    head = [ln for ln in lines if ln.startswith("| kernel family")][:1]
    sep = [lines[lines.index(head[0]) + 1]] if head else []
    table = [ln for ln in lines if ln.startswith(("| kvq_", "| sdpa_"))]
    verdicts = [ln for ln in lines if ln.startswith(("PASS ", "FAIL ", "NOT "))]
    return "```text\n$ " + " ".join(VALIDATE) + "\n" + "\n".join(head + sep + table + [""] + verdicts) + "\n```\n"


VALIDATE_MULTIGPU = [
    "kvq-sim", "validate", "--gpu", "8x-h100", "--multigpu", "reports/measurements/multigpu_decode_h100.csv",
]  # fmt: skip


def multigpu_table() -> str:
    """`kvq-sim validate --multigpu` on the committed 4x H100 sweep: prior and fitted held-out errors per layout."""
    out = subprocess.run(VALIDATE_MULTIGPU, capture_output=True, text=True, cwd=ROOT).stdout
    return "```text\n$ " + " ".join(VALIDATE_MULTIGPU) + "\n" + out.rstrip("\n") + "\n```\n"


#: issue 8's seed systems -> (kvq-core method or kvq-sim recipe, note). Ticks are computed, not typed:
#: kvq-core = a registered format; kvq-sim = `kvq-sim plan --method` / `--recipe` accepts it (tested for every
#: method and recipe in packages/kvq-sim/tests/test_serving.py); quality = a decode row in reports/quality.
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

    decode_csvs = sorted(p.name for p in (ROOT / "reports" / "quality").glob("*decode*.csv"))
    rated = {r["method"] for r in _quality_csv(decode_csvs) if r.get("method")}
    lines = [
        "| seed system | kvq name | kvq-core | kvq-sim | quality row | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for system, name, note in SEEDS:
        core = name in METHODS
        sim = core or name in RECIPES or name.startswith("--")
        tick = lambda ok: "yes" if ok else "-"  # noqa: E731
        lines.append(f"| {system} | `{name}` | {tick(core)} | {tick(sim)} | {tick(name in rated)} | {note} |")
    return "\n".join(lines) + "\n"


def _quality_csv(names):
    """Rows (dicts) of the named reports/quality CSVs, in order."""
    import csv

    for name in names:
        with open(ROOT / "reports" / "quality" / name, newline="") as f:
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


def quality_table() -> str:
    """kvq's caches beside transformers' on the same decode protocol (reports/quality/*decode*.csv), with the
    teacher-forced perplexity where that protocol was run (reports/quality/*teacher_forced.csv)."""
    tf = {
        r["cache"].removeprefix("kvq:"): float(r["ppl"])
        for r in _quality_csv(("hf_peers_teacher_forced.csv", "kvq_teacher_forced.csv"))
    }
    return "\n".join(_ppl_table(_decode_rows(), tf=tf)) + "\n"


#: Issue 5's targets on the decode protocol, by bits per element *stored* (at the 512-token window):
#: (band label, low bits exclusive, high bits inclusive, max perplexity increase % of the band's best kvq cache;
#: the naive int baselines sit in the same bands and are listed as the band's worst).
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


def quality_targets() -> str:
    """Issue 5's targets against the decode rows, per stored-bits band: the best kvq cache and whether the target
    holds, then each transformers backend against kvq's best cache at equal or fewer stored bits; for the
    default 512-token window and for the 4K-token window (reports/quality/decode_4k.csv)."""
    long_rows = _decode_rows(("decode_4k.csv",))
    lines = ["512-token window (prefill 384, 128 scored; the quality table above):", ""]
    lines += _targets(_decode_rows())
    lines += ["", "4K-token window (prefill 3968, 128 scored; `reports/quality/decode_4k.csv`):", ""]
    lines += _targets(long_rows)
    lines += ["", *_ppl_table(long_rows, first_column="cache (4K window)")]
    return "\n".join(lines) + "\n"


HF_CSVS = ("hf_cache_decode_smollm2_h100.csv", "hf_cache_decode_llama7b_h100.csv")


def hf_table() -> str:
    """One decode step through transformers with each cache, from benchmarks/hf_cache_decode.py's CSVs."""
    import csv

    lines = []
    for name in HF_CSVS:
        rows = list(csv.DictReader(open(ROOT / "reports" / "measurements" / name, newline="")))
        r0 = rows[0]
        shape = r0.get("shape") or "smollm2-135m"  # the first SmolLM2 run predates the column
        lines += [
            f"`{shape}` (random weights), batch 1: measured {r0['date']} on {r0['device']} (driver {r0['driver']}, "
            f"torch {r0['torch']}, triton {r0['triton']}, transformers {r0['transformers']}, commit {r0['commit']}; "
            f"`reports/measurements/{name}`).",
            "",
            "| prompt | cache | ms per decode step | peak GiB | cache MiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        label = {"dynamic": "transformers DynamicCache fp16", "kvq-kernel": "KVQCache kivi-{b}, kernels",
                 "kvq-torch": "KVQCache kivi-{b}, torch path"}  # fmt: skip
        for r in rows:
            lines.append(
                f"| {int(r['prompt']) // 1024}K | {label[r['cache']].format(b=r['bits'])} | {float(r['step_ms']):.1f} | "
                f"{int(r['max_allocated_bytes']) / 2**30:.2f} | {int(r['cache_bytes']) / 2**20:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def generate_table() -> str:
    """`kvq-eval generate` per cache (reports/quality/generate.csv): greedy continuations of one prompt."""
    rows = list(_quality_csv(("generate.csv",)))
    lines = [
        "| cache | bits/element | same tokens as full | ppl of the text under the full model | distinct 3-grams | "
        "continuation (start) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        text = " ".join(r["text"].split())[:70].replace("|", "\\|").replace("`", "'")
        bits = r["avg_bits"] or "-"
        lines.append(
            f"| `{r['cache'].removeprefix('kvq:')}` | {bits} | {float(r['agree_with_full']):.2f} | "
            f"{float(r['ppl_under_full']):.2f} | {float(r['distinct_3grams']):.2f} | {text} |"
        )
    return "\n".join(lines) + "\n"


SECTIONS = {
    "generate-table": generate_table,
    "hf-table": hf_table,
    "quality-table": quality_table,
    "quality-targets": quality_targets,
    "methods-table": methods_table,
    "plan-output": plan_output,
    "kernel-table": kernel_table,
    "validation-table": validation_table,
    "multigpu-table": multigpu_table,
    "seed-coverage": seed_coverage,
}


def section(text: str, name: str) -> tuple[int, int]:
    start, end = f"<!-- {name}:start -->\n", f"<!-- {name}:end -->"
    i = text.index(start) + len(start)
    return i, text.index(end)


def main() -> int:
    path = ROOT / "README.md"
    text = path.read_text()
    for name, make in SECTIONS.items():
        i, j = section(text, name)
        text = text[:i] + make() + text[j:]
    path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
