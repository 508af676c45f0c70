"""CPU checks of benchmarks/multigpu_decode.py: tp and cp steps against the single-process fp32 reference.

The script runs under torchrun (gloo, fp32, Triton's CPU interpreter) on tiny GQA and MHA shapes; its
--check-only mode compares layer 0 of every point with `reference_layer` and exits 1 on a mismatch.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "multigpu_decode.py"
sys.path.insert(0, str(SCRIPT.parent))


def interpreter_env() -> dict[str, str]:
    src = os.pathsep.join(str(ROOT / "packages" / p / "src") for p in ("kvq-core", "kvq-kernels", "kvq-sim"))
    return dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_check(tmp_path: Path, nproc: int, model: str, kv: str) -> list[dict]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(SCRIPT),
        "--model", model, "--batch", "3", "--context", "512", "--kv", kv, "--check-only", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=interpreter_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / f"multigpu_decode_{model}_{nproc}gpu.csv") as f:
        return list(csv.DictReader(f))


# GQA shards KV heads and query groups together (the harder case) in `make test`; MHA under `make test-slow`
@pytest.mark.parametrize("model", ["tiny-gqa", pytest.param("tiny-mha", marks=pytest.mark.slow)])
def test_tp_and_cp_on_two_processes_match_the_reference(tmp_path, model):
    """Batch 3 (rows 0 and 2 checked), 512 tokens (cp: 256 per process, 2 KIVI residual blocks)."""
    rows = run_check(tmp_path, 2, model, "fp16,kivi4,kivi2")
    got = {(r["parallel"], r["kv"]): r for r in rows}
    assert set(got) == {(p, kv) for p in ("tp", "cp") for kv in ("fp16", "kivi4", "kivi2")}
    for (parallel, _), r in got.items():
        assert r["status"] == "ok" and r["gpus"] == "2" and r["layers_run"] == "2"
        assert float(r["check_rel_err"]) < 1e-4  # fp32 throughout: ~1e-6 measured
        # tp: 2 all-reduces per layer; cp: 1 all-gather per layer
        assert r["collectives_per_step"] == ("4" if parallel == "tp" else "2")


def test_one_process_is_the_baseline_without_collectives(tmp_path):
    (row,) = run_check(tmp_path, 1, "tiny-gqa", "fp16")
    assert (row["parallel"], row["gpus"], row["status"], row["collectives_per_step"]) == ("tp", "1", "ok", "0")


MERGE_SCRIPT = """
import torch
from kvq_kernels.decode_fp16 import decode_reference
from multigpu_attention import KvSpec, LayerCache, merge_ranks, merge_splits

torch.manual_seed(0)
q = torch.randn(3, 4, 16)
shards = [LayerCache(KvSpec("fp16", 3, 2, 16, 200, i == 1), 4, i, "cpu", torch.float32) for i in range(2)]
states = torch.stack([merge_splits(*c.state(q)) for c in shards])  # [GPUs, rows, D + 2]
k = torch.cat([c.k for c in shards], 2)
v = torch.cat([c.v for c in shards], 2)
ref = decode_reference(q, k, v, torch.full((3,), k.shape[2], dtype=torch.int32))
err = lambda out: float((out.double() - ref).norm() / ref.norm())
print(err(merge_ranks(states, torch.empty_like(q))), err(merge_ranks(states[:1], torch.empty_like(q))))
"""


def test_context_parallel_merge_is_exact_and_needs_every_shard():
    """Two shards of 200 and 201 tokens merged with kvq's combine equal attention over all 401; one shard alone
    does not (so the distributed check can fail)."""
    proc = subprocess.run(
        [sys.executable, "-c", MERGE_SCRIPT], env=interpreter_env(), cwd=SCRIPT.parent, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged, one_shard = map(float, proc.stdout.split())
    assert merged < 1e-5
    assert one_shard > 0.1


@pytest.mark.parametrize("kv", ["fp16", "kivi4", "kivi2"])
def test_memory_plan_counts_the_bytes_the_cache_allocates(kv):
    from multigpu_attention import KvSpec, LayerCache

    spec = KvSpec(kv, 3, 2, 32, 256, True)
    assert LayerCache(spec, 4, 0, "cpu").nbytes == spec.layer_bytes()


def test_dry_run_plans_llama_2_70b_whole_in_fp16_over_four_gpus(capsys):
    import multigpu_decode

    argv = [
        "--dry-run",
        "--gpus",
        "4",
        "--model",
        "llama-2-70b",
        "--mem-gib",
        "79",
        "--kv",
        "fp16",
        "--batch",
        "1",
        "--layers",
        "80",
    ]
    assert multigpu_decode.main([*argv, "--context", "4096,1048576", "--parallel", "tp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split()[:5] == ["tp", "1", "4096", "fp16", "80"]  # all 80 layers fit in 4 x 79 GiB
    assert lines[3].split()[:4] == ["tp", "1", "1048576", "fp16"] and "skip: needs" in lines[3]


def test_unknown_model_lists_the_valid_names(capsys):
    import multigpu_decode

    with pytest.raises(SystemExit):
        multigpu_decode.main(["--dry-run", "--model", "llama7b"])
    err = capsys.readouterr().err
    assert "unknown model 'llama7b'" in err and "llama-7b" in err and "tiny-gqa" in err
