"""Fits of the data files kvq-sim's model reads beside the kernel calibration: the quantized weight-GEMV ratios
(reports/measurements/weight_gemv_h100.csv -> configs/hardware/fits/h100-80g-weight-gemv.yaml), and, from the
calibration part of reports/published/points.csv only, the engine presets' free parameters
(configs/engines/fits/engines-fit.yaml) and the fitted transfer rules (configs/hardware/fits/transfer-rules.yaml).
docs/transfer-rules.md lists which points fitted which parameter.

    python -m kvq_sim.fitpresets            # print the three files
    python -m kvq_sim.fitpresets --write    # write them
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import yaml

from .configs import CONFIG_DIR, display_path
from .errors import SimInputError
from .fitting import nnls

REPO = CONFIG_DIR.parent
GEMV_CSV = REPO / "reports" / "measurements" / "weight_gemv_h100.csv"
#: the measured GPU's kvq-sim name (the CSV carries its torch device name)
GEMV_GPU = "h100-80g"
#: benchmark format -> (kvq-sim kernel, what it is). The compiled int8 path is gpt-fast's
#: (F.linear(x, W_int8.to(bf16)) * scales under torch.compile); torch's int8pack kernel (under 6% of the read)
#: is slower at every shape and token count, so the compiled one stands for int8.
#: Its time is 2.2-2.5x fp16's at every shape (qkv 96.3 vs 38.8 us at 1 token): the 5 bytes moved per weight
#: of a separate dequantize pass (int8 read, bf16 write, bf16 read by the GEMM) against fp16's 2, so it is
#: recorded as "separate"; tinygemm unpacks inside the GEMV ("fused").
GEMV_FORMATS = {
    "int8-compile": ("int8", "torch.compile of F.linear(x, W_int8.to(bf16)) * scales, per-row scale", "separate"),
    "int4": ("int4", "torch._weight_int4pack_mm (tinygemm), group 128 bf16 scale + zero", "fused"),
}
#: rows of the committed run that did not measure the named kernel: the compiled int8 function was compiled
#: once per (shape, tokens) and dynamo's recompile limit was 8 at that commit (the log's warning at gate_up,
#: 64 tokens), so the 9th shape onwards ran outside the compiled path
GEMV_EXCLUDED = {("int8-compile", "gate_up", 64), ("int8-compile", "down", 1), ("int8-compile", "down", 8),
                 ("int8-compile", "down", 64)}  # fmt: skip

FIT_HEADER = (
    "# Written by `python -m kvq_sim.fitpresets --write`; do not edit. Read by kvq_sim.weightgemv.\n"
    "# ratio_to_fp16: (quantized weight bytes / time) / (fp16 weight bytes / time), summed over LLaMA-7B's four\n"
    "# decode projections at each token count, both formats of one benchmark run; a decode step streams\n"
    "# quantized weights at weight_gemv_efficiency x this ratio (measured on measured_on, transferred by the\n"
    "# same ratio elsewhere: docs/transfer-rules.md).\n"
)


def _rows(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise SimInputError(f"{display_path(path)}: cannot read ({e.strerror})") from None
    return list(csv.DictReader(text.splitlines()))


def fit_weight_gemv(path: Path = GEMV_CSV) -> dict:
    """The weight-GEMV fit file's mapping: per kernel and token count, the byte-weighted streaming rate over the
    projections divided by fp16's at the same token count (only projections valid for both are summed)."""
    rows = _rows(path)
    if not rows:
        raise SimInputError(f"{display_path(path)}: no rows")
    rate: dict[tuple[str, str, int], tuple[float, float]] = {}
    for r in rows:
        rate[(r["format"], r["proj"], int(r["tokens"]))] = (float(r["weight_bytes"]), float(r["time_us"]))
    devices = {r["device"] for r in rows}
    if len(devices) != 1:
        raise SimInputError(f"{display_path(path)}: rows from several devices: {', '.join(sorted(devices))}")
    kernels = {}
    for fmt, (kernel, what, how) in GEMV_FORMATS.items():
        ratios = {}
        for t in sorted({k[2] for k in rate if k[0] == fmt}):
            projs = [p for (f, p, n) in rate if f == fmt and n == t and (fmt, p, t) not in GEMV_EXCLUDED]
            q = sum(rate[(fmt, p, t)][0] for p in projs) / sum(rate[(fmt, p, t)][1] for p in projs)
            f16 = sum(rate[("fp16", p, t)][0] for p in projs) / sum(rate[("fp16", p, t)][1] for p in projs)
            ratios[t] = round(q / f16, 4)
        kernels[kernel] = {"what": what, "benchmark_format": fmt, "dequant": how, "ratio_to_fp16": ratios}
    r0 = rows[0]
    return {
        "measured_on": GEMV_GPU,
        "torch_device_name": r0["device"],
        "source": f"{display_path(path)} (commit {r0['commit']}, {r0['date']}; driver {r0['driver']}, "
        f"torch {r0['torch']})",
        "excluded": [f"{f} {p} {t} tokens: past dynamo's recompile limit (log)" for f, p, t in sorted(GEMV_EXCLUDED)],
        "kernels": kernels,
    }


RULES_HEADER = (
    "# Written by `python -m kvq_sim.fitpresets --write`; do not edit. Read by kvq_sim.hardware.with_transfer_rules.\n"
    "# Each rule replaces the transferred weight-GEMV efficiency of the GPUs it names, fitted on the calibration\n"
    "# part of reports/published/points.csv (points listed); docs/transfer-rules.md explains each.\n"
)
ENGINE_HEADER = (
    "# Written by `python -m kvq_sim.fitpresets --write`; do not edit. Read by kvq_sim.engines: the values of the\n"
    "# fields configs/engines/engines.yaml lists under `fitted:`, fitted by non-negative least squares of relative\n"
    "# error on the calibration-part points listed (reports/published/points.csv); held-out points are not read.\n"
)
#: A100 weight-GEMV rule: NeMo's A100 TP1 rows, with NeMo's request cost fitted on its H100 rows (where the
#: GEMV efficiency is measured); TP > 1 rows are left out because their all-reduce costs are priors on the A100
A100_GPUS = ("a100-80g", "8x-a100-80g")
A100_GRID = np.round(np.arange(0.50, 1.0001, 0.0005), 4)


def _calibration() -> list:
    from .published import load

    return [p for p in load() if p.split == "calibration" and p.metric != "peak_memory"]


def _predict(points, engines=None, hardware=None) -> np.ndarray:
    from .published import predict

    return np.array([predict(p, engines, hardware).predicted for p in points], dtype=float)


def _fit_linear(points, engine, fields_: tuple[str, ...], hardware=None) -> tuple[dict, dict]:
    """NNLS of an engine's linear overheads on `points`: residual time / measured against each field's time per
    unit / measured (the prediction is linear in every overhead, so one evaluation per field gives its column)."""
    from dataclasses import replace

    base = replace(engine, **dict.fromkeys(fields_, 0.0))
    y0 = _predict(points, {engine.name: base}, hardware)
    meas = np.array([p.measured for p in points])
    cols = [(_predict(points, {engine.name: replace(base, **{f: 1.0})}, hardware) - y0) / meas for f in fields_]
    x = nnls(np.column_stack(cols), (meas - y0) / meas)
    fitted = replace(base, **{f: float(v) for f, v in zip(fields_, x)})
    after = _predict(points, {engine.name: fitted}, hardware) / meas - 1
    before = y0 / meas - 1
    info = {
        "points": [p.point_id for p in points],
        "mape_pct_before": round(float(np.mean(np.abs(before))) * 100, 2),
        "mape_pct_after": round(float(np.mean(np.abs(after))) * 100, 2),
    }
    return {f: float(f"{v:.4g}") for f, v in zip(fields_, x)}, info


def fit_published() -> tuple[dict, dict]:
    """(engine fit file, transfer-rule file) from the calibration part, in dependency order: NeMo's request cost
    on its H100 rows; the A100 weight-GEMV efficiency on NeMo's A100 TP1 rows given that cost; the A100 node's
    all-reduce latency per extra GPU on NeMo's A100 TP2-8 rows given both; hf-eager's per-layer launch cost
    (A100 rows at the fitted A100 efficiency); TensorRT-LLM's step cost on the H200 blog (recorded, rejected)."""
    from dataclasses import replace

    from .configs import read_yaml
    from .engines import ENGINES_FILE, read_engines
    from .hardware import load_hardware
    from .published import ENGINES

    spec = read_yaml(ENGINES_FILE)["engines"]
    fitted = {name: list((e or {}).get("fitted") or {}) for name, e in spec.items()}
    presets = read_engines(fit={n: dict.fromkeys(f, 0.0) for n, f in fitted.items()})
    points = _calibration()

    def of(engine: str, sources, keep=lambda p: True):
        return [p for p in points if ENGINES[p.engine] == engine and p.source in sources and keep(p)]

    out_engines: dict = {}
    # 1. NeMo: a fixed cost per request, on the H100 rows (their GEMV efficiency is measured)
    nemo_pts = of("nemo", spec["nemo"]["fitted"]["request_overhead_ms"], lambda p: p.gpu in ("h100-80g", "8x-h100"))
    v, info = _fit_linear(nemo_pts, presets["nemo"], ("request_overhead_ms",))
    presets["nemo"] = replace(presets["nemo"], **v)
    out_engines["nemo"] = {**v, "fit": info}
    # 2. the A100 weight-GEMV efficiency: NeMo's A100 TP1 rows at the fitted NeMo cost, a 1-D search
    a100_pts = of("nemo", ("nemo-llama2-inference",), lambda p: p.gpu == "a100-80g" and p.tp == 1)
    meas = np.array([p.measured for p in a100_pts])
    base = {g: load_hardware(g, transfer_rules=False) for g in A100_GPUS}  # the rules are what is fitted

    def at(eff: float) -> dict:
        return {g: replace(h, calibration=replace(h.calibration, weight_bandwidth_efficiency=float(eff)))
                for g, h in base.items()}  # fmt: skip

    def sse(eff: float) -> float:
        return float(np.sum((_predict(a100_pts, presets, at(eff)) / meas - 1) ** 2))

    coarse = min(A100_GRID[::20], key=sse)
    eff = min((e for e in A100_GRID if abs(e - coarse) <= 0.01), key=sse)
    before = _predict(a100_pts, presets, at(base["a100-80g"].calibration.weight_bandwidth_efficiency)) / meas - 1
    after = _predict(a100_pts, presets, at(eff)) / meas - 1
    was = base["a100-80g"].calibration.weight_bandwidth_efficiency
    rules = {
        "weight_gemv": {
            "a100": {
                "gpus": list(A100_GPUS),
                "efficiency": float(eff),
                "what": f"{eff:g} fitted on NeMo's A100 TP1 rows of the calibration part, over {was:g} from h100-80g",
                "fit": {
                    "points": [p.point_id for p in a100_pts],
                    "given": f"nemo request_overhead_ms {presets['nemo'].request_overhead_ms:g}",
                    "mape_pct_before": round(float(np.mean(np.abs(before))) * 100, 2),
                    "mape_pct_after": round(float(np.mean(np.abs(after))) * 100, 2),
                },
            }
        }
    }
    hardware = at(eff)
    # 3. the A100 node's all-reduce latency per extra GPU: NeMo's A100 TP2-8 rows (not used above), given the
    # NeMo cost and the A100 efficiency; a ring all-reduce's latency grows with its N - 1 steps
    tp_pts = of("nemo", ("nemo-llama2-inference",), lambda p: p.gpu == "8x-a100-80g" and p.tp > 1)
    tp_meas = np.array([p.measured for p in tp_pts])
    node = hardware["8x-a100-80g"]
    y0 = _predict(tp_pts, presets, hardware)
    y1 = _predict(tp_pts, presets, {**hardware, "8x-a100-80g": replace(node, interconnect_hop_latency_us=1.0)})
    hop = float(nnls(((y1 - y0) / tp_meas)[:, None], (tp_meas - y0) / tp_meas)[0])
    hop = float(f"{hop:.4g}")
    hardware = {**hardware, "8x-a100-80g": replace(node, interconnect_hop_latency_us=hop)}
    after = _predict(tp_pts, presets, hardware) / tp_meas - 1
    rules["collectives"] = {
        "a100": {
            "gpus": ["8x-a100-80g"],
            "hop_latency_us": hop,
            "what": f"+{hop:g} us per all-reduce per GPU beyond the first, fitted on NeMo's A100 TP2-8 rows "
            "of the calibration part",
            "fit": {
                "points": [p.point_id for p in tp_pts],
                "given": f"nemo request_overhead_ms {presets['nemo'].request_overhead_ms:g}, A100 GEMV {eff:g}",
                "mape_pct_before": round(float(np.mean(np.abs(y0 / tp_meas - 1))) * 100, 2),
                "mape_pct_after": round(float(np.mean(np.abs(after))) * 100, 2),
            },
        }
    }
    # 4. eager PyTorch: a host cost per layer per forward pass, on every eager row whose weights kvq-sim can
    # stream (NF4 is dequantized by bitsandbytes, a kernel kvq-sim has no measurement of)
    hf_src = spec["hf-eager"]["fitted"]["layer_launch_us"]
    hf_pts = of("hf-eager", hf_src, lambda p: not p.weight_precision.startswith("nf4") and p.pp == 1)
    v, info = _fit_linear(hf_pts, presets["hf-eager"], ("layer_launch_us",), hardware)
    presets["hf-eager"] = replace(presets["hf-eager"], **v)
    out_engines["hf-eager"] = {**v, "fit": info}
    # 5. TensorRT-LLM: a cost per decode step on the H200 blog's TP1 rows (its one TP2 row is the
    # long-generation tensor-parallel gap, which a per-step constant does not describe). Recorded, not used:
    # engines.yaml keeps a step cost only if it is below a whole batch-1 step of a 7B model (6-7 ms on an H100)
    trt_pts = of("trtllm", ("trtllm-h200-blog",), lambda p: p.tp == 1)
    v, info = _fit_linear(trt_pts, presets["trtllm"], ("step_overhead_us",), hardware)
    out_engines["trtllm"] = {"rejected": {**v, "fit": info}}
    return {"engines": out_engines}, rules


def dump(header: str, doc: dict) -> str:
    return header + yaml.safe_dump(doc, sort_keys=False, width=4096)


def main(argv=None) -> int:
    from .weightgemv import FIT_FILE, parse_fit

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the fit files (default: print them)")
    args = ap.parse_args(argv)
    gemv = fit_weight_gemv()
    parse_fit(gemv, "weight GEMV fit")  # what is written must load
    files = [(FIT_FILE, dump(FIT_HEADER, gemv))]
    from .engines import ENGINE_FIT_FILE
    from .hardware import TRANSFER_RULES_FILE

    engines, rules = fit_published()
    files += [(TRANSFER_RULES_FILE, dump(RULES_HEADER, rules)), (ENGINE_FIT_FILE, dump(ENGINE_HEADER, engines))]
    for path, text in files:
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {display_path(path)}")
        else:
            print(f"# {display_path(path)}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
