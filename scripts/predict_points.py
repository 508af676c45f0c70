"""Write kvq-sim's predictions for points about to be measured, before they are measured.

Two kinds of plan:

  multigpu  the multi-GPU decode-step grid of benchmarks/multigpu_decode.py (TP and CP at 1, 2 and 4 GPUs of a
            node, --node, default 8x-h100; llama-7b and llama-2-70b; batch 1/8/64; 4K/32K/128K tokens; fp16, KIVI-4,
            KIVI-2 KV): `plan`'s fused-engine step and the benchmark's own step as `kvq-sim validate --multigpu`
            costs it (`kvq_sim.multigpu.predict`: the node's collective fits, or the priors where it has none);
  like      the points of an existing measurement CSV (kernel sweep or e2e step) predicted for another GPU, e.g.
            the H100 sweep's points on the H200 with the calibration the H200 file has now (transferred);
  kernels   a kernel sweep's grid (`bench_decode.py --heads ... --batches ... --contexts ... --bits ...`: SDPA
            flash and kvq's fp16 kernel at 16 bits, KIVI at the others) on a GPU, before it is measured: head
            layouts and batches its fit never saw, say.

    python scripts/predict_points.py multigpu -o reports/predictions/multigpu_h100_prior.csv
    python scripts/predict_points.py multigpu --node 8x-h200 -o reports/predictions/multigpu_h200_cold.csv
    python scripts/predict_points.py like --gpu h200 --kernel reports/measurements/kernel_decode_h100_v5.csv \
        --e2e reports/measurements/e2e_decode_h100_v4.csv -o reports/predictions/h200_cold.csv
    python scripts/predict_points.py kernels --gpu h200 --heads 32/4,64/8,28/4 --batches 1,4,16 \
        --contexts 8192,32768,131072 --bits 16,8,4,3,2 -o reports/predictions/kernels_h200_new_heads.csv

Each row carries the commit and whether the tree was clean, so the file proves what the model said beforehand.
Once the points are measured, `compare` matches a predictions file with a kernel sweep by point id and prints the
error per kernel family (predicted / measured - 1), families listed with --changed apart (their kernels changed
after the prediction):

    python scripts/predict_points.py compare reports/predictions/h200_cold_v2.csv \
        reports/measurements/kernel_decode_h200_partial.csv --changed kvq_kivi_3b_mha,kvq_kivi_4b_mha
    python scripts/predict_points.py compare reports/predictions/h200_cold_v3.csv \
        reports/measurements/kernel_decode_h200.csv --e2e reports/measurements/e2e_decode_h200.csv
    python scripts/predict_points.py compare-multigpu reports/predictions/multigpu_h200_cold.csv \
        reports/measurements/multigpu_decode_h200.csv
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import pandas as pd

from kvq_core.provenance import commit_of, utc_now
from kvq_sim import api
from kvq_sim.configs import CONFIG_DIR, read_yaml
from kvq_sim.errors import SimInputError
from kvq_sim.hardware import load_hardware
from kvq_sim.latency import decode_step
from kvq_sim.measurements import KIVI_KERNEL_BITS, KernelPoint, read_e2e_csv, read_kernel_csv
from kvq_sim.memory import memory
from kvq_sim.multigpu import StepPoint, read_steps
from kvq_sim.multigpu import predict as predict_benchmark_step
from kvq_sim.validate import predict_e2e, predict_kernel

MODELS = ("llama-7b", "llama-2-70b")
BATCHES = (1, 8, 64)
CONTEXTS = (4096, 32768, 131072)
KV = {"fp16": ("fp16", "16"), "kivi4": ("kivi", "4"), "kivi2": ("kivi", "2")}
LAYOUTS = (("tp", 1), ("tp", 2), ("tp", 4), ("cp", 2), ("cp", 4))


def _provenance() -> dict:
    """The predictions' provenance columns (kvq_core.provenance): commit, whether the tree was clean, date."""
    sha, dirty = commit_of()
    return {"predicted_at_commit": sha, "tree_clean": dirty is False, "predicted_date": utc_now()}


def multigpu_rows(node: str = "8x-h100", models=MODELS, layouts=LAYOUTS) -> list[dict]:
    """`plan`'s step (step_us and its terms) and the benchmark's step (bench_step_us) at every grid point of `node`
    (its single GPU, the node's `base`, for 1-GPU points), for `models` and (parallel, gpus) `layouts`."""
    hw = load_hardware(node)
    single = read_yaml(CONFIG_DIR / "hardware" / f"{node}.yaml").get("base", node)
    rows = []
    for model, (parallel, gpus), kv, batch, context in itertools.product(models, layouts, KV, BATCHES, CONTEXTS):
        method, bits = KV[kv]
        dep = api.deployment(
            model, single if gpus == 1 else node, bits=bits, method=method, gpus=gpus, parallel=parallel
        )
        st, mem = decode_step(dep, batch, context), memory(dep, batch, context)
        point = StepPoint(model, parallel, gpus, batch, context, kv, 1.0)
        rows.append(
            dict(
                point_id=point.point_id,
                model=model,
                parallel=parallel,
                gpus=gpus,
                batch=batch,
                context=context,
                kv=kv,
                fits=mem.fits,
                memory_gib_per_gpu=round(mem.total_bytes / 2**30, 2),
                step_us=round(st.step_s * 1e6, 2),
                weights_us=round(st.weights_s * 1e6, 2),
                kv_us=round(st.kv_s * 1e6, 2),
                compute_us=round(st.compute_s * 1e6, 2),
                interconnect_us=round(st.interconnect_s * 1e6, 2),
                launch_us=round(st.launch_s * 1e6, 2),
                bench_step_us=round(predict_benchmark_step(hw, point), 2),
                calibration=dep.hardware.calibration.status,
            )
        )
    return rows


def compare_multigpu(predictions: str, measured: str) -> str:
    """Per-layout MAPE / signed / median error of a multigpu predictions file's benchmark step (bench_step_us) at
    the measured CUDA-graph steps of a benchmarks/multigpu_decode.py CSV: error = predicted / measured - 1."""
    pred = pd.read_csv(predictions).set_index("point_id")["bench_step_us"]
    points, prov = read_steps(measured)
    rows = [(p.layout, p.model, pred[p.point_id] / p.step_us - 1) for p in points if p.point_id in pred]
    if not rows:
        return "no measured point has a prediction"
    d = pd.DataFrame(rows, columns=["layout", "model", "err"])
    lines = [
        f"{len(d)} measured steps with a prediction ({prov['device']})",
        "layout  model          n  MAPE%  signed%",
    ]
    for (layout, model), e in d.groupby(["layout", "model"])["err"]:
        lines.append(f"{layout:<7} {model:<12} {len(e):>3} {100 * e.abs().mean():6.2f} {100 * e.mean():+8.2f}")
    e = d.err
    lines.append(
        f"all: {len(e)} steps, MAPE {100 * e.abs().mean():.2f}%, signed {100 * e.mean():+.2f}%, "
        f"median |error| {100 * e.abs().median():.2f}%, worst {100 * e.abs().max():.2f}%"
    )
    return "\n".join(lines)


def like_rows(gpu: str, kernel_csv: str | None, e2e_csv: str | None) -> list[dict]:
    hw = load_hardware(gpu)
    rows = []
    if kernel_csv:
        src = pd.read_csv(kernel_csv, nrows=1)["device"][0]
        for p in read_kernel_csv(kernel_csv, src)[0]:
            t = predict_kernel(hw, p)
            rows.append(dict(kind="kernel", point_id=p.point_id, family=p.family, predicted_us=t))
    if e2e_csv:
        src = pd.read_csv(e2e_csv, nrows=1)["device"][0]
        for p in read_e2e_csv(e2e_csv, src)[0]:
            t, mem = predict_e2e(hw, p)
            rows.append(dict(kind="e2e", point_id=p.point_id, family="e2e", predicted_us=t, predicted_memory=mem))
    for r in rows:
        r["gpu"], r["calibration"] = gpu, hw.calibration.status
    return rows


def kernel_grid_rows(gpu: str, heads, batches, contexts, bits_list, group: int) -> list[dict]:
    """kvq-sim's time for each point of a kernel sweep's grid, with the bytes the benchmark will record for it
    (`kvq_kernels.benchmarking.row_bytes`)."""
    from kvq_kernels.benchmarking import HEAD_DIM, kv_bytes, row_bytes

    hw = load_hardware(gpu)
    rows = []
    for (hq, hkv), b, t, bits in itertools.product(heads, batches, contexts, bits_list):
        impls = ("sdpa_flash_fp16", "kvq_fp16") if bits == 16 else ("kvq_kivi",)
        nbytes = row_bytes(kv_bytes(bits, b, hkv, t, group), b, hq)
        for impl in impls:
            p = KernelPoint(impl, bits, 0 if bits == 16 else group, b, hq, hkv, HEAD_DIM, t, nbytes, 1.0)
            rows.append(dict(kind="kernel", point_id=p.point_id, family=p.family, predicted_us=predict_kernel(hw, p)))
    for r in rows:
        r["gpu"], r["calibration"] = gpu, hw.calibration.status
    return rows


def _int_list(text: str, what: str, least: int = 1) -> list[int] | None:
    """'1,4,16' -> [1, 4, 16], each an integer >= least (None after printing the error)."""
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        out = []
    if not out or min(out) < least:
        print(f"error: --{what} must be comma-separated integers >= {least}, got {text!r}", file=sys.stderr)
        return None
    return out


def _heads(text: str) -> list[tuple[int, int]] | None:
    """'32/4,64/8' -> [(32, 4), (64, 8)]: query heads a positive multiple of KV heads (None after the error)."""
    out = []
    for item in (t for t in text.split(",") if t.strip()):
        q, _, kv = item.partition("/")
        if not (q.strip().isdigit() and kv.strip().isdigit()) or int(kv) < 1 or int(q) % int(kv):
            print(f"error: --heads takes query/kv pairs whose query heads a multiple of kv heads, got {item!r}",
                  file=sys.stderr)  # fmt: skip
            return None
        out.append((int(q), int(kv)))
    if not out:
        print("error: --heads names no head layout", file=sys.stderr)
    return out or None


def compare(predictions: str, measured: str, changed: set[str], e2e: str | None = None) -> str:
    """Per-family and overall MAPE / signed / median error of the predictions at the measured points (a kernel
    sweep, and optionally an e2e decode-step CSV, family "e2e"): error = predicted / measured - 1."""
    pred = pd.read_csv(predictions).set_index("point_id")["predicted_us"]
    device = pd.read_csv(measured, nrows=1)["device"][0]
    rows = [
        (p.family, pred[p.point_id] / p.time_us - 1) for p in read_kernel_csv(measured, device)[0] if p.point_id in pred
    ]
    if e2e:
        e2e_device = pd.read_csv(e2e, nrows=1)["device"][0]
        rows += [
            ("e2e", pred[p.point_id] / p.step_us - 1) for p in read_e2e_csv(e2e, e2e_device)[0] if p.point_id in pred
        ]
    if not rows:
        return "no measured point has a prediction"
    d = pd.DataFrame(rows, columns=["family", "err"])
    lines = [
        f"{len(d)} measured points with a prediction ({device})",
        "family                n  MAPE%  signed%  median|%|",
    ]
    for fam, e in d.groupby("family")["err"]:
        lines.append(
            f"{fam:<20} {len(e):>2} {100 * e.abs().mean():6.2f} {100 * e.mean():+8.2f} {100 * e.abs().median():9.2f}"
        )
    kernels = d[d.family != "e2e"]
    for name, e in (
        ("unchanged kernels", kernels[~kernels.family.isin(changed)].err),
        ("changed kernels", kernels[kernels.family.isin(changed)].err),
        ("decode steps", d[d.family == "e2e"].err),
    ):
        if len(e):
            lines.append(
                f"{name}: {len(e)} points, MAPE {100 * e.abs().mean():.2f}%, signed {100 * e.mean():+.2f}%, "
                f"median |error| {100 * e.abs().median():.2f}%, worst {100 * e.abs().max():.2f}%"
            )
    return "\n".join(lines)


def _names(text: str) -> tuple[str, ...] | None:
    """Model names checked against configs/models (None after printing the error)."""
    from kvq_sim.errors import SimInputError
    from kvq_sim.models import load_model

    names = tuple(n for n in text.split(",") if n)
    try:
        for n in names:
            load_model(n)
    except SimInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not names:
        print("error: --models names no model", file=sys.stderr)
        return None
    return names


def _layouts(text: str) -> tuple[tuple[str, int], ...] | None:
    """'tp1,cp2' -> (("tp", 1), ("cp", 2)), each one of the grid's LAYOUTS (None after printing the error)."""
    valid = {f"{p}{g}": (p, g) for p, g in LAYOUTS}
    items = [t for t in text.split(",") if t]
    bad = [t for t in items if t not in valid]
    if bad or not items:
        print(
            f"error: unknown layout(s) {', '.join(bad) or '(none given)'}; valid: {', '.join(valid)}", file=sys.stderr
        )
        return None
    return tuple(valid[t] for t in items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="plan", required=True)
    mg = sub.add_parser("multigpu")
    mg.add_argument("--node", default="8x-h100", help="the node's hardware config (default 8x-h100)")
    mg.add_argument("--models", default=",".join(MODELS), help=f"comma-separated (default {','.join(MODELS)})")
    mg.add_argument(
        "--layouts",
        default=",".join(f"{p}{g}" for p, g in LAYOUTS),
        help="comma-separated tp<N> / cp<N> (default every layout of the grid)",
    )
    mg.add_argument("-o", "--out", required=True)
    cmg = sub.add_parser("compare-multigpu")
    cmg.add_argument("predictions")
    cmg.add_argument("measured")
    like = sub.add_parser("like")
    like.add_argument("--gpu", required=True)
    like.add_argument("--kernel")
    like.add_argument("--e2e")
    like.add_argument("-o", "--out", required=True)
    kg = sub.add_parser("kernels")
    kg.add_argument("--gpu", required=True)
    kg.add_argument("--heads", required=True, help="query/kv head layouts, e.g. 32/4,64/8")
    kg.add_argument("--batches", default="1,4,16")
    kg.add_argument("--contexts", default="8192,32768,131072")
    kg.add_argument("--bits", default="16,8,4,3,2", help="16 (SDPA flash and kvq fp16) and KIVI 2/3/4/8")
    kg.add_argument("--group", type=int, default=128, help="KIVI group (bench_decode.py --group)")
    kg.add_argument("-o", "--out", required=True)
    cmp_ = sub.add_parser("compare")
    cmp_.add_argument("predictions")
    cmp_.add_argument("measured")
    cmp_.add_argument("--changed", default="", help="comma-separated kernel families changed since the prediction")
    cmp_.add_argument("--e2e", help="a decode-step CSV measured on the same GPU")
    args = ap.parse_args(argv)
    if args.plan == "compare":
        print(compare(args.predictions, args.measured, {f for f in args.changed.split(",") if f}, args.e2e))
        return 0
    if args.plan == "compare-multigpu":
        print(compare_multigpu(args.predictions, args.measured))
        return 0
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; predictions are written once, before measuring", file=sys.stderr)
        return 2
    if args.plan == "multigpu":
        models, layouts = _names(args.models), _layouts(args.layouts)
        if models is None or layouts is None:
            return 2
        rows = multigpu_rows(args.node, models, layouts)
    elif args.plan == "kernels":
        heads = _heads(args.heads)
        batches, contexts = _int_list(args.batches, "batches"), _int_list(args.contexts, "contexts")
        bits = _int_list(args.bits, "bits", 2)
        if bits and not set(bits) <= {*KIVI_KERNEL_BITS, 16}:
            print(f"error: --bits takes 2, 3, 4, 8 and 16, got {args.bits!r}", file=sys.stderr)
            bits = None
        if None in (heads, batches, contexts, bits):
            return 2
        try:
            load_hardware(args.gpu)
        except SimInputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        rows = kernel_grid_rows(args.gpu, heads, batches, contexts, bits, args.group)
    else:
        rows = like_rows(args.gpu, args.kernel, args.e2e)
    prov = _provenance()
    df = pd.DataFrame([{**r, **prov} for r in rows])
    out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"wrote {len(df)} predictions to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
