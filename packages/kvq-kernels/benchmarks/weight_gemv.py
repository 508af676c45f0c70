"""GPU benchmark (not a test): decode-shaped weight-only matmuls, fp16 against int8 and int4 weights.

What kvq-sim needs from it: the fraction of the measured streaming read that a decode GEMV/GEMM reaches per
weight format, so quantized weights are costed from measurements rather than at the fp16 efficiency. The
kernels are the ones torch itself ships and gpt-fast-style decoders call:
  fp16   F.linear(x, W) (cuBLAS)
  int8   torch._weight_int8pack_mm(x, W_int8, scales)      per-output-channel scales
  int8-compile  torch.compile of F.linear(x, W_int8.to(bf16)) * scales (gpt-fast's int8 path)
  int4   torch._weight_int4pack_mm(x, W_packed, 128, sz)    tinygemm layout, bf16, group 128
Shapes are LLaMA-7B's four projections (configs/models/llama-7b.yaml through kvq_sim: qkv 12288x4096,
o 4096x4096, gate+up 22016x4096, down 4096x11008) at 1, 8 and 64 tokens. Each point replays a CUDA graph over enough weight copies that no read hits the 50 MB L2,
with L2 flushed by reading 256 MB between replays (kvq_kernels.benchmarking.time_rotation). Correctness first: every
format against an fp32 matmul of its own dequantized weight.

    PYTHONPATH=packages/kvq-core/src:packages/kvq-kernels/src:packages/kvq-sim/src \\
        python packages/kvq-kernels/benchmarks/weight_gemv.py --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch
import torch.nn.functional as F

from kvq_core.provenance import CSV_FIELDS, provenance
from kvq_kernels.benchmarking import hbm_read_tb_s, time_rotation
from kvq_sim.models import load_model

MODEL = "llama-7b"
TOKENS = (1, 8, 64)
INT4_GROUP = 128


def projection_shapes(model: str) -> dict[str, tuple[int, int]]:
    """(N, K) of a decoder layer's four weight GEMVs, fused as a decode step runs them: QKV, O, gate + up, down."""
    m = load_model(model)
    h = m.hidden_size
    return {"qkv": (m.q_size + 2 * m.kv_size, h), "o": (h, m.q_size), "gate_up": (2 * m.intermediate_size, h),
            "down": (h, m.intermediate_size)}  # fmt: skip


def _int8(n: int, k: int):
    w = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8)
    scales = (torch.rand(n, device="cuda") * 0.01 + 0.005).to(torch.bfloat16)
    deq = w.float() * scales.float()[:, None]
    return (w, scales), deq, w.nbytes + scales.nbytes


def _int4(n: int, k: int):
    q = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.int32)
    packed_u8 = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    w = torch._convert_weight_to_int4pack(packed_u8, 8)
    groups = k // INT4_GROUP
    scale = torch.rand(groups, n, device="cuda") * 0.01 + 0.005
    zero = torch.randn(groups, n, device="cuda") * 0.01
    sz = torch.stack([scale, zero], dim=2).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
    # tinygemm dequantizes (q - 8) * scale + zero; which nibble of a byte holds the even column is not
    # documented, so the check accepts either order (the reference returned second is the swapped one)
    s = sz[..., 0].float().repeat_interleave(INT4_GROUP, 0).t()
    z = sz[..., 1].float().repeat_interleave(INT4_GROUP, 0).t()
    swapped = torch.stack([q[:, 1::2], q[:, ::2]], dim=2).reshape(n, k)
    deq = ((q.float() - 8) * s + z, (swapped.float() - 8) * s + z)
    return (w, sz), deq, packed_u8.nbytes + sz.nbytes


# One compiled graph per (shape, tokens) point: 12 per format, past dynamo's default limit of 8 recompiles
# (beyond it the call silently runs eager, which is not the path being measured).
torch._dynamo.config.recompile_limit = 64


@torch.compile(dynamic=False)
def _int8_compiled(x, w, scales):
    """gpt-fast's int8 weight-only linear: the int8 read, cast and scale fused by the compiler."""
    return F.linear(x, w.to(x.dtype)) * scales


def _call(fmt: str, x, weights):
    if fmt == "fp16":
        return F.linear(x, weights[0])
    if fmt == "int8":
        return torch._weight_int8pack_mm(x, *weights)
    if fmt == "int8-compile":
        return _int8_compiled(x, *weights)
    return torch._weight_int4pack_mm(x, weights[0], INT4_GROUP, weights[1])


def _make(fmt: str, n: int, k: int):
    if fmt == "fp16":
        w = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        return (w,), w.float(), w.nbytes, torch.float16
    made = _int8(n, k) if fmt.startswith("int8") else _int4(n, k)
    return (*made, torch.bfloat16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--commit", default=None, help="default: this checkout's (KVQ_COMMIT outside one)")
    ap.add_argument("--formats", default="fp16,int8,int8-compile,int4")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    prov = provenance(args.commit, CSV_FIELDS)
    read_tb_s = hbm_read_tb_s()
    print(f"streaming read ceiling {read_tb_s:.3f} TB/s on {prov['device']}")
    rows, failed = [], []
    for fmt in args.formats.split(","):
        for name, (n, k) in projection_shapes(MODEL).items():
            for m in TOKENS:
                try:
                    weights, deq, wbytes, dtype = _make(fmt, n, k)
                    x = torch.randn(m, k, device="cuda", dtype=dtype)
                    out = _call(fmt, x, weights).float()
                    refs = [x.float() @ d.t() for d in (deq if isinstance(deq, tuple) else (deq,))]
                    err = min(((out - ref).norm() / ref.norm()).item() for ref in refs)
                    if not err < 2e-2:  # bf16/fp16 operands with fp32 accumulation land near 1e-3 .. 1e-2
                        raise RuntimeError(f"relative error {err:.2e} against the dequantized fp32 matmul")

                    def make_fn(fmt=fmt, n=n, k=k, m=m, dtype=dtype):
                        w, _, _, _ = _make(fmt, n, k)
                        xi = torch.randn(m, k, device="cuda", dtype=dtype)
                        return lambda: _call(fmt, xi, w)

                    us = time_rotation(make_fn, wbytes)
                except Exception as e:  # a format this torch build lacks is reported, the sweep goes on
                    failed.append(f"{fmt} {name} m={m}: {str(e).splitlines()[0][:160]}")
                    continue
                bw = wbytes / (us * 1e-6) / 1e12
                rows.append(
                    dict(**prov, format=fmt, proj=name, tokens=m, n=n, k=k, weight_bytes=wbytes, rel_err=f"{err:.2e}",
                         time_us=round(us, 2), eff_bw_tb_s=round(bw, 4), hbm_read_tb_s=round(read_tb_s, 4),
                         frac_of_hbm_read=round(bw / read_tb_s, 4))
                )  # fmt: skip
    path = os.path.join(args.out, "weight_gemv.csv")
    if rows:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    for line in failed:
        print(f"FAILED {line}")
    print(f"{'format':6s} {'proj':8s} {'tokens':>6s} {'time_us':>9s} {'TB/s':>6s} {'of read':>7s}")
    for r in rows:
        print(f"{r['format']:6s} {r['proj']:8s} {r['tokens']:6d} {r['time_us']:9.1f} {r['eff_bw_tb_s']:6.2f} "
              f"{r['frac_of_hbm_read']:7.0%}")  # fmt: skip
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
